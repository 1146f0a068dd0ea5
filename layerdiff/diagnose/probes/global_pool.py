"""The kind of global pooling: Caffe's global AVE pooling ported as a max, or MAX as a mean.

Ports often write global pooling as a functional reduction (``x.amax((2, 3))``,
``x.mean((2, 3))``, ``F.adaptive_max_pool2d(x, 1)``). When it reduces the other way than
Caffe's Pooling, the layers before and after it are right and the error enters at the pooling.
``global_pool_kind`` replaces the torch reduction with Caffe's own Pooling layer (re-run by the
reference engine on the torch values, reshaped to what the port's op returned) and reports the
reduction when that makes the pair match. It works whether the pooling is aligned (the pair
itself) or not (it lies on the path into the next pair, e.g. the InnerProduct after it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import Fixed, check_fix, finding
from layerdiff.diagnose.probes.graph_path import path_case
from layerdiff.trace import Record

#: torch record kinds that reduce over H, W by the maximum / by the mean
_MAX = {"amax", "max", "adaptive_max_pool2d", "AdaptiveMaxPool2d", "max_pool2d", "MaxPool2d"}
_MEAN = {"mean", "avg_pool2d", "adaptive_avg_pool2d", "AdaptiveAvgPool2d", "AvgPool2d"}
_WORD = {"max": "takes the maximum", "ave": "averages"}


def _caffe_global(rec: Record) -> str | None:
    """``"max"``/``"ave"`` for a Caffe Pooling record whose output is 1x1 per channel."""
    layer = getattr(rec.handle, "layer", None)
    if rec.kind != "Pooling" or layer is None or not hasattr(rec.handle, "run"):
        return None
    out = rec.outputs[0] if rec.outputs else None
    if out is None or np.ndim(out) != 4 or tuple(np.shape(out)[2:]) != (1, 1):
        return None
    from layerdiff.caffe import caffe_pb2

    pool = layer.param.pooling_param.pool
    return {caffe_pb2.PoolingParameter.MAX: "max",
            caffe_pb2.PoolingParameter.AVE: "ave"}.get(pool)


def _torch_method(rec: Record) -> str | None:
    if rec.kind in _MAX:
        return "max"
    if rec.kind in _MEAN:
        return "ave"
    return None


def _as_caffe(pool: Record, like: Record) -> Any:
    """Caffe's pooling on the torch op's input, shaped like the torch op's output."""
    run = pool.handle.run
    shape = np.shape(like.outputs[0])

    def call(x: np.ndarray, *_: Any) -> np.ndarray:
        return np.asarray(run(x)[0]).reshape(shape)

    return call


def _fix_text(method: str, rec: Record) -> str:
    """The same call in Caffe's kind of reduction."""
    word = "max" if method == "max" else "avg"
    if rec.kind.startswith("Adaptive"):
        return f"nn.Adaptive{word.capitalize()}Pool2d(1)"
    if rec.kind.startswith("adaptive"):
        return f"F.adaptive_{word}_pool2d(x, 1)"
    keep = ", keepdim=True" if np.ndim(rec.outputs[0]) == 4 else ""
    return f"x.amax((2, 3){keep})" if method == "max" else f"x.mean((2, 3){keep})"


def _report(case: LayerCase, pool: Record, caffe: str, rec: Record, torch: str,
            fixed: Fixed) -> Finding:
    x = np.shape(pool.outputs[0])
    ev = (f"Caffe {pool.name} (global {caffe.upper()} pooling, output {list(x)}) "
          f"{_WORD[caffe]} over H, W; torch {rec.name} ({rec.kind}) {_WORD[torch]}; with Caffe's "
          f"pooling in its place the port matches Caffe {case.pair.ref_name}")
    return finding(case, "global_pool_kind", f"the port's global pooling {rec.name} "
                   f"{_WORD[torch]} where Caffe's {pool.name} {_WORD[caffe]}", ev,
                   f"{rec.name}: {_fix_text(caffe, rec)}", fixed, "global_pool_kind",
                   op=rec.name, op_kind=rec.kind, caffe_pool=caffe.upper(),
                   torch_pool=torch.upper())


@probe("global_pool_kind", between=True)
def global_pool_kind(case: LayerCase) -> Finding | None:
    """A torch global reduction takes the max where Caffe averages (or the reverse)."""
    aligned = _aligned(case)
    if aligned is not None:
        return aligned
    pc = path_case(case)
    if pc is None:
        return None
    for pool in pc.ref_ops:
        caffe = _caffe_global(pool)
        if caffe is None:
            continue
        for rec in pc.cand_ops:
            torch = _torch_method(rec)
            if torch is None or torch == caffe or not rec.outputs or \
                    np.size(rec.outputs[0]) != np.size(pool.outputs[0]):
                continue
            fixed = check_fix(pc.case, pc.rerun(swap={rec.index: _as_caffe(pool, rec)}))
            if fixed is not None:
                return _report(pc.case, pool, caffe, rec, torch, fixed)
    return None


def _aligned(case: LayerCase) -> Finding | None:
    """The pooling is aligned: swap it inside the pair's own group."""
    if not case.ref_inputs or case.result.local_passed is not False:
        return None
    pool = next((r for r in case.ref_records if _caffe_global(r) is not None), None)
    if pool is None:
        return None
    caffe = _caffe_global(pool)
    for k, rec in enumerate(case.cand_records):
        torch = _torch_method(rec)
        if torch is None or torch == caffe or not rec.outputs or \
                np.size(rec.outputs[0]) != np.size(pool.outputs[0]):
            continue
        fixed = check_fix(case, case.rerun(replace={k: _as_caffe(pool, rec)}))
        if fixed is not None:
            return _report(case, pool, caffe, rec, torch, fixed)
    return None

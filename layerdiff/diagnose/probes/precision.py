"""Probes: reduced precision (float16, bfloat16, TF32 on CUDA) explains a layer's error.

Not a bug, but it must be told apart from one: the candidate group is re-run in float32 (TF32
off) on the reference's own inputs; when that passes, the error is the format's rounding and
the finding says so with the numbers (relative error against the format's machine epsilon).
A layer whose float32 re-run still fails is left to the other probes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from layerdiff.align.kinds import families
from layerdiff.diagnose.audit import captured_training, module_fn
from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import probe
from layerdiff.metrics import measure

#: machine epsilon (spacing at 1) of each reduced format
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "tf32": 2.0 ** -10}
LABEL = {"float16": "float16", "bfloat16": "bfloat16", "tf32": "TF32 (10-bit mantissa)"}
#: relative error (in eps) still called rounding when no float32 re-run is possible
FLOOR_EPS = 16.0
#: a float32 re-run may keep this many times the measured effect of parameter storage rounding
STORAGE_K = 4.0
#: beyond this many eps a float32-fixable error is range (overflow/underflow), not rounding
RANGE_EPS = 64.0
_TF32_FAMILIES = {"conv": "allow_tf32_cudnn", "deconv": "allow_tf32_cudnn",
                  "linear": "allow_tf32_matmul"}


def reduced_format(meta: dict[str, Any], records: list[Any]) -> str | None:
    """``float16``/``bfloat16``/``tf32`` when these candidate records ran in reduced precision."""
    for rec in records:
        d = rec.attrs.get("dtype")
        if d in ("float16", "bfloat16"):
            return d
    if meta.get("dtype") in ("float16", "bfloat16"):
        return str(meta["dtype"])
    if str(meta.get("device", "")).startswith("cuda"):
        for rec in records:
            for fam in families(rec.kind) or _module_families(rec):
                flag = _TF32_FAMILIES.get(fam)
                if flag and meta.get(flag):
                    return "tf32"
    return None


def _module_families(rec: Any) -> set[str]:
    fn = getattr(rec.handle, "fn", None)
    try:
        from torch import nn
    except ImportError:  # pragma: no cover
        return set()
    if isinstance(fn, nn.modules.conv._ConvNd):
        return {"conv"}
    if isinstance(fn, nn.Linear):
        return {"linear"}
    return set()


def precision_slack(case: LayerCase) -> float:
    """Error a counterfactual re-run may keep because the candidate computes in reduced
    precision (0 in float32/float64): other probes can accept fixes up to this."""
    fmt = reduced_format(case.cand_trace.meta, case.cand_records)
    if fmt is None:
        return 0.0
    return FLOOR_EPS * EPS[fmt] * float(np.abs(case.ref_output.astype(np.float64)).max())


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    from layerdiff.adapters.torch_capture import tf32_disabled

    with tf32_disabled():
        yield


def float32_rerun(case: LayerCase, jitter: float = 0.0, seed: int = 0) -> np.ndarray | None:
    """The candidate group re-run in float32 with TF32 off, on the reference's inputs.

    Parameters stay as the candidate stored them (a float16 model's weights are already
    rounded). ``jitter`` > 0 multiplies every parameter by ``1 + jitter * U(-1, 1)``: the
    spread of such runs measures what storage rounding of that size does to this layer.
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    replace: dict[int, Any] = {}
    for k, rec in enumerate(case.cand_records):
        if hasattr(rec.handle, "float32"):  # an ONNX node: its own float32 copy
            replace[k] = rec.handle.float32(jitter, seed)
            continue
        fn = getattr(rec.handle, "fn", None)
        if fn is None:
            return None
        if isinstance(fn, nn.Module):
            mod = copy.deepcopy(fn).float()
            if jitter:
                with torch.no_grad():
                    for t in (*mod.parameters(), *mod.buffers()):
                        if t.is_floating_point():
                            noise = torch.rand(t.shape, generator=gen, dtype=t.dtype) * 2 - 1
                            t.mul_(1 + jitter * noise.to(t.device))
            n = max(1, len(getattr(rec.handle, "input_tops", []) or [0]))
            replace[k] = module_fn(mod, captured_training(case.cand_trace,
                                                          rec.name.split("#", 1)[0]), n)
        else:
            replace[k] = _op_float32(rec.handle)
    with tf32_off():
        return case.rerun(replace=replace)


def storage_rounding(case: LayerCase, fmt: str, base: np.ndarray, samples: int = 3) -> float:
    """How far rounding the group's parameters to ``fmt`` moves its output (Monte Carlo: max
    over ``samples`` runs with every parameter jittered by up to the format's unit roundoff)."""
    stored = [getattr(r.handle, "fn", None) for r in case.cand_records]
    reduced = any(t.dtype in _reduced_dtypes() for m in stored if hasattr(m, "parameters")
                  for t in (*m.parameters(), *m.buffers())) or \
        any(getattr(r.handle, "reduced_params", False) for r in case.cand_records)
    if not reduced:
        return 0.0  # float32 parameters (TF32): nothing was rounded in storage
    worst = 0.0
    for s in range(samples):
        out = float32_rerun(case, EPS[fmt] / 2, seed=s + 1)
        if out is None or np.shape(out) != np.shape(base):
            return 0.0
        worst = max(worst, float(np.abs(np.asarray(out, np.float64) - base).max()))
    return worst


def _reduced_dtypes() -> set[Any]:
    import torch

    return {torch.float16, torch.bfloat16}


def _op_float32(handle: Any) -> Any:
    """Call a recorded torch op again on other inputs, every floating tensor in float32."""
    import torch

    def cast(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.float() if o.is_floating_point() else o
        if isinstance(o, (list, tuple)):
            return type(o)(cast(x) for x in o)
        if isinstance(o, dict):
            return {k: cast(v) for k, v in o.items()}
        return o

    def run(*xs: np.ndarray) -> np.ndarray:
        repl = [np.asarray(x, np.float32) for x in xs]
        # _resolve: the handle's own way of putting new values where the recorded ones were
        args = cast(handle._resolve(handle.args, repl))
        kwargs = cast(handle._resolve(handle.kwargs, repl))
        with torch.no_grad():
            out = handle.fn(*args, **kwargs)
        t = out if isinstance(out, torch.Tensor) else next(
            x for x in (out if isinstance(out, (list, tuple)) else [out])
            if isinstance(x, torch.Tensor))
        return t.detach().float().cpu().numpy()

    return run


def _fan_in(case: LayerCase) -> int | None:
    for rec in case.cand_records:
        fn = getattr(rec.handle, "fn", None)
        w = getattr(fn, "weight", None)
        if w is not None and getattr(w, "dim", lambda: 0)() >= 2:
            return int(np.prod(w.shape[1:]))
    return None


def _fix(fmt: str, rel: float) -> str:
    rtol = 10 ** math.ceil(math.log10(max(rel, 1e-7)))
    if fmt == "tf32":
        return ("not a bug; for exact float32: torch.backends.cudnn.allow_tf32 = False; "
                "torch.backends.cuda.matmul.allow_tf32 = False (or accept it: "
                f"--rtol {rtol:g})")
    return (f"not a bug; compare the float32 model (--cand-dtype float32, model.float()) or "
            f"accept {fmt} rounding: --rtol {rtol:g}")


@probe("reduced_precision")
def reduced_precision(case: LayerCase) -> Finding | None:
    fmt = reduced_format(case.cand_trace.meta, case.cand_records)
    if fmt is None:
        return None
    eps = EPS[fmt]
    ref_max = float(np.abs(case.ref_output.astype(np.float64)).max())
    before = case.error
    if not math.isfinite(before) or ref_max == 0:
        return None
    rel = before / ref_max
    fan = _fan_in(case)
    fan_txt = (f"; fan-in {fan}, so rounding alone reaches about u*sqrt(fan-in) = "
               f"{eps / 2 * math.sqrt(fan):.2g} relative") if fan else ""
    head = (f"the candidate computes {case.pair.cand_name} in {LABEL[fmt]} (machine epsilon "
            f"{eps:.2g}); its error here is max|d| = {before:.3g} = {rel:.3g} of max|ref| "
            f"{ref_max:.3g} ({rel / eps:.2g} eps){fan_txt}")
    out = float32_rerun(case)
    if out is None:
        if rel > FLOOR_EPS * eps:
            return None
        return Finding("precision", case.name, f"{LABEL[fmt]} rounding, not a bug: the error "
                       f"is within {FLOOR_EPS:g} eps of the format", head + "; the layer "
                       "could not be re-run in float32 to confirm", _fix(fmt, rel), None,
                       before, None, "reduced_precision", {"format": fmt, "rel": rel})
    m = measure(case.ref_output, out)
    if not m.shape_match:
        return None
    b, after = before, m.max_abs
    # What remains in float32 is the parameters' own rounding to the format (a float16 model's
    # weights were rounded when it was cast): allowed up to STORAGE_K times its measured size.
    storage = storage_rounding(case, fmt, np.asarray(out, np.float64)) if after > \
        case.tolerance else 0.0
    if after > case.tolerance + STORAGE_K * storage:
        return None  # float32 does not make it right: something else is wrong here
    frac = 1.0 if b <= 0 else max(0.0, min(1.0, 1.0 - max(0.0, after - STORAGE_K * storage
                                                               - case.tolerance) / b))
    evidence = (f"{head}; re-run in float32 with TF32 off on the reference's inputs: "
                f"max|d| = {after:.3g} (tolerance {case.tolerance:.3g})")
    if storage:
        evidence += (f", the rest being the parameters' own {LABEL[fmt]} storage: jittering "
                     f"them by one unit roundoff moves the output by up to {storage:.3g}")
    if rel > RANGE_EPS * eps:
        return Finding("precision_range", case.name,
                       f"{LABEL[fmt]} cannot hold this layer's values (overflow/underflow or "
                       f"cancellation): its error is {rel / eps:.3g} eps, far beyond rounding",
                       evidence, f"run this layer in float32 (e.g. autocast disabled around "
                       f"{case.pair.cand_name})", frac, b, after, "reduced_precision",
                       {"format": fmt, "rel": rel})
    return Finding("precision", case.name,
                   f"{LABEL[fmt]} rounding, not a bug: re-run in float32 the layer agrees"
                   + (f" up to its parameters' {LABEL[fmt]} storage" if storage else ""),
                   evidence, _fix(fmt, rel), frac, b, after, "reduced_precision",
                   {"format": fmt, "rel": rel, "eps": eps})


@probe("reduced_precision_model", model_wide=True)
def reduced_precision_model(report: Any) -> Finding | None:
    """The net fails, yet every layer passes on the reference's own inputs: the divergence is
    rounding accumulated through the net (only said for a reduced-precision candidate)."""
    if report or not report.results:
        return None
    fmt = reduced_format(report.candidate.meta, [c for r in report.results for c in r.pair.cand])
    failing = report.failures
    if fmt is None or not failing or any(r.local is None or r.local_passed is False
                                         for r in failing):
        return None
    eps = EPS[fmt]
    worst = max(failing, key=lambda r: r.metrics.scaled_error())
    rel = worst.metrics.scaled_error()
    if rel > RANGE_EPS * eps:
        return None
    return Finding(
        "precision", f"{worst.pair.ref_name} <-> {worst.pair.cand_name}",
        f"{LABEL[fmt]} rounding accumulated through the net, not a bug: every failing layer "
        "passes when re-run on the reference's own inputs",
        f"{len(failing)} of {len(report.results)} layers exceed the float32 tolerance; worst "
        f"{worst.pair.ref_name}: max|d| = {worst.metrics.max_abs:.3g} = {rel:.3g} of max|ref| "
        f"({rel / eps:.2g} eps of {LABEL[fmt]}); locally each passes (worst local max|d| "
        f"{max(r.local.max_abs for r in failing):.3g})",
        _fix(fmt, rel), None, worst.metrics.max_abs, None, "reduced_precision_model",
        {"format": fmt, "rel": rel})

"""Counterfactual plumbing shared by the layer probes.

A probe builds a candidate fix (a modified copy of a torch module, or the same functional call
with other arguments), re-runs the pair with it (``LayerCase.rerun``) and keeps the fix only
when it removes (almost) all the error: ``check_fix``, the one acceptance rule every probe
uses (``diagnose.accepted`` applies the same rule again to every finding).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes.precision import precision_slack
from layerdiff.metrics import measure

MIN_EXPLAINED = 0.9


# -- counterfactual plumbing ------------------------------------------------------------------
@dataclass
class Fixed:
    """A counterfactual that removes the error: errors before/after and the share explained."""

    before: float | None  # None: the shapes differed before the fix
    after: float
    explained: float

    def numbers(self) -> str:
        was = "a shape mismatch" if self.before is None else f"max|err| {self.before:.4g}"
        return f"{was} -> {self.after:.3g}"


def fix_tolerance(case: LayerCase) -> float:
    """What a fixed re-run must reach: the pair's tolerance, plus the rounding a
    reduced-precision candidate keeps whatever is fixed (0 in float32/float64)."""
    return case.tolerance + precision_slack(case)


def check_fix(case: LayerCase, out: np.ndarray | None, *, before: float | None = None,
              min_explained: float = MIN_EXPLAINED) -> Fixed | None:
    """The one acceptance rule of a counterfactual: ``out`` (the group re-run with a fix)
    matches the reference within :func:`fix_tolerance` and removes at least ``min_explained``
    of the error; else None.

    The error is ``before`` when the probe measured its own baseline (e.g. a re-run with the
    module as captured), else the layer's local error (propagated when there is none). There
    must be an error to remove: a pair that is right on its own gets no fix.
    """
    if out is None:
        return None
    tol = fix_tolerance(case)
    m = measure(case.ref_output, out)
    if not m.shape_match or m.nan_mismatch or m.inf_mismatch or not m.max_abs <= tol:
        return None
    if before is None:
        base = case.local_metrics or case.result.metrics
        if not base.shape_match:
            return Fixed(None, m.max_abs, 1.0)
        before = math.inf if base.nan_mismatch or base.inf_mismatch else base.max_abs
    if math.isnan(before) or not before > tol:
        return None
    frac = 1.0 if math.isinf(before) else max(0.0, 1.0 - m.max_abs / before)
    return Fixed(before, m.max_abs, frac) if frac >= min_explained else None


def already_reported(case: LayerCase, kind: str) -> bool:
    """The weight audit (model-wide, it runs first) already named ``kind`` at this pair, from
    the weights alone: a re-run finding of the same cause would repeat it."""
    try:
        from layerdiff.diagnose.audit import reported
    except ImportError:  # pragma: no cover - the audit is optional here
        return False
    return reported(case.report, kind, case.name)


def finding(case: LayerCase, kind: str, cause: str, evidence: str, fix: str, fixed: Fixed,
            probe_name: str, **data: Any) -> Finding:
    return Finding(kind, case.name, cause, f"{evidence}; re-run: {fixed.numbers()} "
                   f"(tolerance {case.tolerance:.3g})", fix, fixed.explained, fixed.before,
                   fixed.after, probe_name, data)


def module_call(module: Any, like: np.ndarray, device: Any = None) -> Callable[..., np.ndarray]:
    """Run ``module`` on numpy inputs in ``like``'s float dtype (the dtype the candidate used),
    so a float64 port is not judged by a float32 re-run."""
    import torch

    dtype = torch.float64 if np.asarray(like).dtype == np.float64 else torch.float32

    def call(*xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            ts = [torch.from_numpy(np.array(x)).to(device or "cpu", dtype) for x in xs]
            return module(*ts).detach().cpu().double().numpy()

    return call


def cand_module(case: LayerCase, types: tuple[type, ...]) -> tuple[int, Any] | None:
    """(position, module) of the first candidate record whose module is one of ``types``."""
    for k, m in enumerate(case.cand_modules()):
        if m is not None and isinstance(m, types):
            return k, m
    return None


def cand_op(case: LayerCase, names: Sequence[str]) -> tuple[int, Any] | None:
    """(position, record) of the first functional candidate record of one of ``names``."""
    for k, rec in enumerate(case.cand_records):
        h = rec.handle
        if rec.kind in names and h is not None and not hasattr(getattr(h, "fn", None),
                                                                 "state_dict"):
            return k, rec
    return None


def call_params(handle: Any, names: Sequence[str]) -> dict[str, Any]:
    """A functional call's arguments by parameter name (``names``: the positional order)."""
    out = {n: a for n, a in zip(names, handle.args, strict=False)}
    out.update(handle.kwargs)
    return out


def edited_call(handle: Any, names: Sequence[str], **changes: Any) -> Callable[..., np.ndarray]:
    """Re-run a functional record with some arguments changed (positional or keyword)."""
    args, kwargs = list(handle.args), dict(handle.kwargs)
    for name, value in changes.items():
        i = list(names).index(name) if name in names else -1
        if 0 <= i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    new = dataclasses.replace(handle, args=tuple(args), kwargs=kwargs)
    return lambda *xs: np.asarray(new.run(*xs)[0], np.float64)


def caffe_layer(case: LayerCase, type_: str) -> tuple[Any, Any] | None:
    """(CaffeLayer, engine impl or None) of the group's first reference layer of ``type_``."""
    for r in case.ref_records:
        h = r.handle
        if h is not None and getattr(h, "layer", None) is not None and h.layer.type == type_:
            return h.layer, getattr(h, "impl", None)
    return None


# -- pooling -----------------------------------------------------------------------------------

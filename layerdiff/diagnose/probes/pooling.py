"""Pooling geometry: ceil vs floor rounding, torchvision-style padding, the AVE divisor.

Caffe rounds a pooled extent up (``ceil((in + 2*pad - k) / s) + 1``) where torch rounds down
unless ``ceil_mode=True``; torchvision's ``MaxPool2d(3, 2, padding=1)`` gives the same size as
Caffe's ``kernel 3 stride 2 pad 0`` (ceil) on even inputs but other windows; Caffe's AVE divides
by the window clipped to ``in + pad`` (padding counts, the ceil overhang does not), which is
torch's ``count_include_pad=True``. The probe re-runs a copy of the torch pooling with the
smallest set of Caffe's settings that removes the error.

The counterfactual plumbing shared by this package's layer probes (``check_fix``,
``module_call``, ``edited_call``, ``call_params``, ``already_reported``) lives here too.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import probe
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


def check_fix(case: LayerCase, out: np.ndarray | None,
              min_explained: float = MIN_EXPLAINED) -> Fixed | None:
    """``out`` (the group re-run with a fix) matches the reference within the pair's tolerance
    and removes at least ``min_explained`` of the layer's own error; else None."""
    if out is None:
        return None
    m = measure(case.ref_output, out)
    if not m.shape_match or m.nan_mismatch or m.inf_mismatch or \
            not m.max_abs <= case.tolerance:
        return None
    before = case.local_metrics or case.result.metrics
    if not before.shape_match:
        return Fixed(None, m.max_abs, 1.0)
    if not before.max_abs > 0 or math.isnan(before.max_abs):
        return None
    frac = max(0.0, 1.0 - m.max_abs / before.max_abs)
    return Fixed(before.max_abs, m.max_abs, frac) if frac >= min_explained else None


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
_MAX_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")
_AVG_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")


def _pair(v: Any) -> tuple[int, int]:
    if v is None:
        return (0, 0)
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


@dataclass
class PoolSetting:
    """One pooling configuration in torch's terms."""

    method: str  # "max" | "ave"
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool = True
    divisor_override: int | None = None

    def module(self):
        from torch import nn

        if self.method == "max":
            return nn.MaxPool2d(self.kernel_size, self.stride, self.padding,
                                ceil_mode=self.ceil_mode)
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def code(self) -> str:
        def s(v: tuple[int, int]) -> str:
            return str(v[0]) if v[0] == v[1] else str(v)

        args = f"{s(self.kernel_size)}, stride={s(self.stride)}, padding={s(self.padding)}, " \
               f"ceil_mode={self.ceil_mode}"
        if self.method == "max":
            return f"nn.MaxPool2d({args})"
        extra = f", count_include_pad={self.count_include_pad}"
        if self.divisor_override is not None:
            extra += f", divisor_override={self.divisor_override}"
        return f"nn.AvgPool2d({args}{extra})"


def _caffe_setting(layer: Any, impl: Any) -> PoolSetting | None:
    from layerdiff.caffe import caffe_pb2

    p = layer.param.pooling_param
    if p.global_pooling or p.pool not in (caffe_pb2.PoolingParameter.MAX,
                                          caffe_pb2.PoolingParameter.AVE):
        return None
    method = "max" if p.pool == caffe_pb2.PoolingParameter.MAX else "ave"
    if impl is not None and hasattr(impl, "floor"):
        return PoolSetting(method, tuple(impl.kernel), tuple(impl.stride), tuple(impl.pad),
                           not impl.floor)
    k = (p.kernel_h or p.kernel_size, p.kernel_w or p.kernel_size)
    s = (p.stride_h or p.stride or 1, p.stride_w or p.stride or 1)
    pad = (p.pad_h or p.pad, p.pad_w or p.pad)
    return PoolSetting(method, k, s, pad, p.round_mode != caffe_pb2.PoolingParameter.FLOOR)


def _torch_setting(case: LayerCase) -> tuple[int, PoolSetting, str] | None:
    """(position, setting, how the port spells it) of the candidate's pooling."""
    from torch import nn

    found = cand_module(case, (nn.MaxPool2d, nn.AvgPool2d))
    if found is not None:
        k, m = found
        if isinstance(m, nn.MaxPool2d):
            if _pair(m.dilation) != (1, 1) or m.return_indices:
                return None
            st = PoolSetting("max", _pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                             _pair(m.padding), bool(m.ceil_mode))
        else:
            st = PoolSetting("ave", _pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                             _pair(m.padding), bool(m.ceil_mode), bool(m.count_include_pad),
                             m.divisor_override)
        return k, st, case.cand_records[k].name
    found = cand_op(case, ("max_pool2d", "avg_pool2d"))
    if found is None:
        return None
    k, rec = found
    if rec.kind == "max_pool2d":
        a = call_params(rec.handle, _MAX_ARGS)
        if _pair(a.get("dilation", 1)) != (1, 1) or a.get("return_indices"):
            return None
        st = PoolSetting("max", _pair(a["kernel_size"]),
                         _pair(a.get("stride") or a["kernel_size"]), _pair(a.get("padding", 0)),
                         bool(a.get("ceil_mode", False)))
    else:
        a = call_params(rec.handle, _AVG_ARGS)
        st = PoolSetting("ave", _pair(a["kernel_size"]),
                         _pair(a.get("stride") or a["kernel_size"]), _pair(a.get("padding", 0)),
                         bool(a.get("ceil_mode", False)), bool(a.get("count_include_pad", True)),
                         a.get("divisor_override"))
    return k, st, f"{rec.name} (F.{rec.kind})"


_FIELDS = ("method", "ceil_mode", "padding", "count_include_pad", "divisor_override",
           "kernel_size", "stride")
_KINDS = {
    ("ceil_mode",): "pool_ceil_mode",
    ("ceil_mode", "padding"): "pool_padding_vs_ceil",
    ("padding",): "pool_padding",
    ("count_include_pad",): "pool_ave_divisor",
    ("divisor_override",): "pool_ave_divisor",
    ("count_include_pad", "divisor_override"): "pool_ave_divisor",
}


def _extent(size: int, k: int, pad: int, s: int, ceil: bool) -> tuple[int, str]:
    span = size + 2 * pad - k
    out = (-(-span // s) if ceil else span // s) + 1
    rnd = "ceil" if ceil else "floor"
    formula = f"{rnd}(({size} + 2*{pad} - {k}) / {s}) + 1"
    if ceil and pad and (out - 1) * s >= size + pad:
        out -= 1
        formula += " - 1 (last window starts in the padding)"
    return out, formula


def _cause(changed: tuple[str, ...], caffe: PoolSetting, cand: PoolSetting) -> str:
    if changed == ("ceil_mode",):
        return ("the torch pooling rounds its output size down (ceil_mode=False); Caffe's "
                "Pooling rounds up")
    if changed == ("ceil_mode", "padding"):
        return (f"the torch pooling pads by {cand.padding[0]} and rounds down (torchvision "
                f"style); Caffe pads by {caffe.padding[0]} and rounds up: same output size, "
                "windows shifted by the padding")
    if set(changed) <= {"count_include_pad", "divisor_override"}:
        return ("the torch average pooling divides border windows by another count: Caffe "
                "divides by the window clipped to the padded input (the zero padding counts, "
                "the ceil overhang does not), i.e. count_include_pad=True")
    diffs = ", ".join(f"{f} {getattr(cand, f)} (Caffe: {getattr(caffe, f)})" for f in changed)
    return f"the torch pooling differs from Caffe's in {diffs}"


@probe("pooling_geometry")
def pooling_geometry(case: LayerCase) -> Finding | None:
    """Re-run the torch pooling with Caffe's rounding/padding/divisor; name the fewest changes
    that remove the error."""
    found = caffe_layer(case, "Pooling")
    if found is None or not case.ref_inputs or np.ndim(case.ref_inputs[0]) != 4:
        return None
    caffe = _caffe_setting(*found)
    torch_side = _torch_setting(case)
    if caffe is None or torch_side is None:
        return None
    pos, cand, where = torch_side
    diff = [f for f in _FIELDS if getattr(cand, f) != getattr(caffe, f)]
    if caffe.method == "max" and cand.method == "max":
        diff = [f for f in diff if f not in ("count_include_pad", "divisor_override")]
    if not diff:
        return None
    like = case.cand_records[pos].outputs[0]
    device = getattr(case.cand_records[pos].handle, "device", None)
    for n in range(1, len(diff) + 1):
        for changed in itertools.combinations(diff, n):
            trial = copy.deepcopy(cand)
            for f in changed:
                setattr(trial, f, getattr(caffe, f))
            if trial.method == "max":
                trial.count_include_pad, trial.divisor_override = True, None
            out = case.rerun(replace={pos: module_call(trial.module(), like, device)})
            fixed = check_fix(case, out)
            if fixed is not None:
                return _report(case, caffe, cand, trial, changed, where, fixed)
    return None


def _report(case: LayerCase, caffe: PoolSetting, cand: PoolSetting, trial: PoolSetting,
            changed: tuple[str, ...], where: str, fixed: Fixed) -> Finding:
    h, w = np.shape(case.ref_inputs[0])[2:]
    ch, formula = _extent(h, caffe.kernel_size[0], caffe.padding[0], caffe.stride[0],
                          caffe.ceil_mode)
    cw, _ = _extent(w, caffe.kernel_size[1], caffe.padding[1], caffe.stride[1], caffe.ceil_mode)
    _, cand_formula = _extent(h, cand.kernel_size[0], cand.padding[0], cand.stride[0],
                              cand.ceil_mode)
    local = case.local_output
    cand_hw = "x".join(map(str, np.shape(local)[2:])) if local is not None else "?"
    ev = (f"on a {h}x{w} input Caffe {case.pair.ref_name} ({caffe.method.upper()} "
          f"k{caffe.kernel_size[0]} s{caffe.stride[0]} pad {caffe.padding[0]}, "
          f"{'ceil' if caffe.ceil_mode else 'floor'}) outputs {ch}x{cw} = {formula}; torch "
          f"{where} = {cand.code()} outputs {cand_hw} ({cand_formula}); {trial.code()} re-run "
          "on Caffe's input matches")
    kind = _KINDS.get(tuple(sorted(changed)), "pool_geometry")
    return finding(case, kind, _cause(changed, caffe, cand), ev,
                   f"{case.pair.cand_name} = {trial.code()}", fixed, "pooling_geometry",
                   changed=list(changed), caffe_out=[ch, cw])

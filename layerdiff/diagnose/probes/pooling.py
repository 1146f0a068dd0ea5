"""Pooling geometry: ceil vs floor rounding, torchvision-style padding, the AVE divisor.

Caffe rounds a pooled extent up (``ceil((in + 2*pad - k) / s) + 1``) where torch rounds down
unless ``ceil_mode=True``; torchvision's ``MaxPool2d(3, 2, padding=1)`` gives the same size as
Caffe's ``kernel 3 stride 2 pad 0`` (ceil) on even inputs but other windows; Caffe's AVE divides
by the window clipped to ``in + pad`` (padding counts, the ceil overhang does not), which is
torch's ``count_include_pad=True``. The probe re-runs a copy of the torch pooling with the
smallest set of Caffe's settings that removes the error.

"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import Patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import (
    Fixed,
    caffe_layer,
    call_params,
    cand_module,
    cand_op,
    check_fix,
    finding,
    module_call,
)

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
    f = finding(case, kind, _cause(changed, caffe, cand), ev,
                f"{case.pair.cand_name} = {trial.code()}", fixed, "pooling_geometry",
                changed=list(changed), caffe_out=[ch, cw])
    return _patch(case, changed, trial).attach(f)


def _patch(case: LayerCase, changed: tuple[str, ...], trial: PoolSetting) -> Patch:
    """Caffe's settings on the torch pooling module (none for a functional pooling call: the
    call sits in forward, which no patch can edit safely)."""
    p = Patch()
    found = cand_module(case, nn_pool_types())
    if found is None:
        return p
    pos, _ = found
    rec = case.cand_records[pos]
    path = rec.attrs.get("module") or getattr(rec.handle, "module", None)
    if path is None:
        return p
    for f in changed:
        p.set_attr(path, f, getattr(trial, f))
    return p


def nn_pool_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.MaxPool2d, nn.AvgPool2d)

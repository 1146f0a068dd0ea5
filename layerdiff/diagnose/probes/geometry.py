"""Convolution geometry: the stride, padding or dilation of a torch conv is not Caffe's.

A conv with another stride or padding usually shows as a shape mismatch that the table locates
but does not explain. ``conv_geometry`` reads the reference layer's ``convolution_param``
(kernel, stride, pad, dilation) and the torch conv's attributes (or ``F.conv2d`` arguments),
re-runs a copy with the smallest set of Caffe's values that removes the error, and names the
fields. When the stride is missing here and an extra one sits in a conv connected to this one
(torchvision's ResNet v1.5 strides the 3x3 conv, Caffe's ResNet v1 the first 1x1), the finding
is ``stride_placement`` and names both convs. (Pooling fields: ``pooling_geometry``.)
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import Patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import (
    Fixed,
    call_params,
    check_fix,
    edited_call,
    finding,
    module_call,
)

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_KINDS = ("Convolution",)
_TORCH_NAMES = {"stride": "stride", "pad": "padding", "dilation": "dilation"}


def _hw(v: Any, default: int) -> tuple[int, int] | None:
    """A torch/Caffe 2-D setting as (h, w); None when it is not numeric (``padding='same'``)."""
    if v is None:
        return (default, default)
    if isinstance(v, str):
        return None
    if isinstance(v, (tuple, list)):
        if not v:
            return (default, default)
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


@dataclass(frozen=True)
class Geometry:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]

    def text(self) -> str:
        return ", ".join(f"{f.name} {_show(getattr(self, f.name))}" for f in fields(self))


def _show(v: tuple[int, int]) -> str:
    return str(v[0]) if v[0] == v[1] else f"({v[0]}, {v[1]})"


def caffe_geometry(layer: Any) -> Geometry | None:
    """A 2-D Caffe Convolution's geometry from its ``convolution_param``."""
    p = layer.param.convolution_param

    def field(name: str, default: int) -> tuple[int, int]:
        h, w = getattr(p, f"{name}_h", 0), getattr(p, f"{name}_w", 0)
        if h or w:
            return (int(h or default), int(w or default))
        rep = list(getattr(p, name if name != "kernel" else "kernel_size"))
        return (int(rep[0]), int(rep[-1])) if rep else (default, default)

    kernel = field("kernel", 0)
    if 0 in kernel or len(p.kernel_size) > 2:
        return None
    return Geometry(kernel, field("stride", 1), field("pad", 0),
                    (int(p.dilation[0]), int(p.dilation[-1])) if p.dilation else (1, 1))


@dataclass
class TorchConv:
    """The candidate's conv in a group: position, geometry, and how to re-run it changed."""

    pos: int
    name: str
    geometry: Geometry
    module: Any = None  # an nn.Conv2d, or None for F.conv2d
    handle: Any = None

    def changed(self, g: Geometry, like: np.ndarray) -> Any:
        if self.module is not None:
            trial = copy.deepcopy(self.module)
            trial.stride, trial.padding, trial.dilation = g.stride, g.pad, g.dilation
            return module_call(trial, like, getattr(self.handle, "device", None))
        return edited_call(self.handle, _CONV_ARGS, stride=g.stride, padding=g.pad,
                           dilation=g.dilation)

    def code(self, g: Geometry, changed: tuple[str, ...]) -> str:
        args = ", ".join(f"{_TORCH_NAMES[f]}={_show(getattr(g, f))}" for f in changed)
        if self.module is not None:
            return "; ".join(f"{self.name}.{_TORCH_NAMES[f]} = {getattr(g, f)}" for f in changed)
        return f"{self.name}: F.conv2d(x, weight, bias, {args})"


def torch_conv(case: LayerCase) -> TorchConv | None:
    from torch import nn

    for k, rec in enumerate(case.cand_records):
        fn = getattr(rec.handle, "fn", None)
        if isinstance(fn, nn.Conv2d):
            g = [_hw(fn.kernel_size, 1), _hw(fn.stride, 1), _hw(fn.padding, 0),
                 _hw(fn.dilation, 1)]
            if None in g or fn.padding_mode != "zeros":
                return None
            return TorchConv(k, rec.name, Geometry(*g), fn, rec.handle)
        if rec.kind == "conv2d" and rec.handle is not None and hasattr(rec.handle, "args"):
            a = call_params(rec.handle, _CONV_ARGS)
            w = a.get("weight")
            if not hasattr(w, "shape") or len(w.shape) != 4:
                return None
            g = [(int(w.shape[2]), int(w.shape[3])), _hw(a.get("stride"), 1),
                 _hw(a.get("padding"), 0), _hw(a.get("dilation"), 1)]
            if None in g:
                return None
            return TorchConv(k, rec.name, Geometry(*g), None, rec.handle)
    return None


def _caffe_conv(case: LayerCase) -> tuple[str, Geometry] | None:
    for r in case.ref_records:
        layer = getattr(r.handle, "layer", None)
        if layer is not None and layer.type in _CONV_KINDS:
            g = caffe_geometry(layer)
            return (r.name, g) if g is not None else None
    return None


@probe("conv_geometry")
def conv_geometry(case: LayerCase) -> Finding | None:
    """Re-run the torch conv with Caffe's stride/pad/dilation; name the fewest changes that
    remove the error (``stride_placement`` when the stride moved to a connected conv)."""
    if len(case.ref_inputs) != 1 or np.ndim(case.ref_inputs[0]) != 4:
        return None
    caffe, tc = _caffe_conv(case), torch_conv(case)
    if caffe is None or tc is None:
        return None
    ref_name, want = caffe
    have = tc.geometry
    diff = [f for f in ("stride", "pad", "dilation") if getattr(have, f) != getattr(want, f)]
    if not diff:
        return None
    like = case.cand_records[tc.pos].outputs[0]
    for n in range(1, len(diff) + 1):
        for changed in itertools.combinations(diff, n):
            trial = replace(have, **{f: getattr(want, f) for f in changed})
            fixed = check_fix(case, case.rerun(replace={tc.pos: tc.changed(trial, like)}))
            if fixed is not None:
                return _report(case, ref_name, want, tc, trial, changed, fixed)
    return None


def _report(case: LayerCase, ref_name: str, want: Geometry, tc: TorchConv, trial: Geometry,
            changed: tuple[str, ...], fixed: Fixed) -> Finding:
    have = tc.geometry
    x = list(np.shape(case.ref_inputs[0]))
    local = case.local_output
    got = list(np.shape(local)) if local is not None else "?"
    diffs = ", ".join(f"{f} {_show(getattr(have, f))} (Caffe: {_show(getattr(want, f))})"
                      for f in changed)
    settings = ", ".join(f"{_TORCH_NAMES[f]}={_show(getattr(trial, f))}" for f in changed)
    ev = (f"on a {x} input Caffe {ref_name} ({want.text()}) outputs "
          f"{list(case.ref_output.shape)}; torch {tc.name} ({have.text()}) outputs {got}; "
          f"re-run with {settings} matches")
    data = {"fields": list(changed), "caffe": {f: list(getattr(want, f)) for f in changed},
            "torch": {f: list(getattr(have, f)) for f in changed}}
    fix = tc.code(trial, changed)
    patch = _attr_patch(tc, {_TORCH_NAMES[f]: getattr(trial, f) for f in changed})
    if changed == ("stride",):
        partner = _stride_partner(case, want.stride, have.stride)
        if partner is not None:
            other_ref, other_cand, other_caffe, other_torch, other_tc = partner
            if have.stride < want.stride:  # Caffe strides this conv, the port the partner
                caffe_at, port_at = (ref_name, want), (other_cand, other_torch)
            else:
                caffe_at, port_at = (other_ref, other_caffe), (tc.name, have)
            hint = ""
            if _show(caffe_at[1].kernel) == "1" and _show(port_at[1].kernel) == "3":
                hint = (" (torchvision's ResNet v1.5 puts the stride on the 3x3 conv, Caffe's "
                        "ResNet v1 on the first 1x1)")
            k1, k2 = _show(caffe_at[1].kernel), _show(port_at[1].kernel)
            cause = (f"the stride moved: Caffe strides {caffe_at[0]} ({k1}x{k1}) by "
                     f"{_show(caffe_at[1].stride)}, the port strides {port_at[0]} ({k2}x{k2}) "
                     f"instead{hint}")
            ev += (f"; the connected torch {other_cand} has stride {_show(other_torch.stride)} "
                   f"where Caffe {other_ref} has {_show(other_caffe.stride)}")
            fix = f"{tc.name}.stride = {trial.stride}; {other_cand}.stride = {other_caffe.stride}"
            both = None if patch is None else \
                _attr_patch(other_tc, {"stride": other_caffe.stride}, patch)
            f = finding(case, "stride_placement", cause, ev, fix, fixed, "conv_geometry",
                        partner=other_cand, partner_ref=other_ref, **data)
            return both.attach(f) if both is not None else f
    kind = f"conv_{changed[0]}" if len(changed) == 1 else "conv_geometry"
    f = finding(case, kind, f"the torch conv {tc.name} has {diffs}", ev, fix, fixed,
                "conv_geometry", **data)
    return patch.attach(f) if patch is not None else f


def _attr_patch(tc: TorchConv, attrs: dict[str, Any], onto: Patch | None = None
                ) -> Patch | None:
    """``onto`` (if given) plus ``attrs`` set on the conv module, for ``--fix-out``; None for a
    functional conv (its arguments live in forward: a manual fix)."""
    if tc.module is None:
        return None
    p = Patch(list(onto.lines), dict(onto.arrays)) if onto is not None else Patch()
    for attr, value in attrs.items():
        p.set_attr(tc.name.split("#", 1)[0], attr, tuple(value))
    return p


def _stride_partner(case: LayerCase, want: tuple[int, int], have: tuple[int, int]
                    ) -> tuple[str, str, Geometry, Geometry, TorchConv] | None:
    """The nearest conv pair connected to this one (downstream when this conv lacks Caffe's
    stride, upstream when it has an extra one) whose stride differs the other way:
    (reference name, candidate name, Caffe geometry, torch geometry, torch conv)."""
    results = case.report.results
    me = case.result.position
    down = have < want
    order = range(me + 1, len(results)) if down else range(me - 1, -1, -1)
    for pos in order:
        res = results[pos]
        other = LayerCase(res, case.report, [])
        caffe, tc = _caffe_conv(other), torch_conv(other)
        if caffe is None or tc is None:
            continue
        cs, ts = caffe[1].stride, tc.geometry.stride
        if cs == ts or (ts > cs) != down:
            continue
        first, last = (case, other) if down else (other, case)
        if _feeds(case.report.reference, first.ref_records[-1], last.ref_records[0]):
            return caffe[0], res.pair.cand_name, caffe[1], tc.geometry, tc
    return None


def _feeds(trace: Any, src: Any, dst: Any) -> bool:
    """Whether record ``src``'s outputs reach record ``dst`` through the trace's data flow."""
    live = set(src.tops)
    for rec in trace.records[src.index + 1:dst.index + 1]:
        if rec.index == dst.index:
            return bool(live & set(rec.bottoms))
        if live & set(rec.bottoms):
            live |= set(rec.tops)
    return False

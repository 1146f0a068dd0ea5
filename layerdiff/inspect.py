"""``layerdiff inspect``: what a Caffe model contains, and the facts a port must reproduce.

The findings are the traps that make a faithful copy of the weights still disagree: the
BatchNorm moving-average scale factor, its eps, batch statistics at TEST time, a BatchNorm with
no Scale after it, pooling that rounds up, and in-place layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import Message

from layerdiff.caffe import caffe_pb2
from layerdiff.caffe.net import CaffeLayer, CaffeNet
from layerdiff.engine.plan import Plan, make_plan

_PARAM_FIELDS = [f.name for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields
                 if f.name.endswith("_param") and f.name not in ("transform_param", "loss_param")]


@dataclass
class LayerRow:
    index: int
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    output_shapes: list[list[int] | None]
    params: str
    blob_shapes: list[list[int]]
    in_place: bool


@dataclass
class Finding:
    kind: str
    layers: list[str]
    message: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inspection:
    model: str
    weights: str | None
    inputs: dict[str, list[int]]
    layers: list[LayerRow]
    findings: list[Finding]
    notes: list[str]
    unsupported: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_net(net: CaffeNet) -> Inspection:
    """Shape-infer ``net`` (unknown types tolerated) and collect its rows and findings."""
    plan = make_plan(net, strict=False)
    rows = []
    for i, p in enumerate(plan.layers):
        lay = p.layer
        rows.append(LayerRow(
            i, lay.name, lay.type, lay.bottoms, lay.tops,
            [list(s) for s in p.top_shapes] if p.top_shapes is not None else [None] * len(lay.tops),
            format_params(lay), [list(b.shape) for b in lay.blobs], lay.in_place))
    return Inspection(
        str(net.prototxt), str(net.weights) if net.weights else None,
        {k: list(v) for k, v in net.inputs.items()}, rows, findings(net, plan), list(net.notes),
        plan.unknown_types)


def format_params(layer: CaffeLayer) -> str:
    """The fields set in the layer's typed params, compact: ``kernel_size=3 stride=2``."""
    parts = []
    for name in _PARAM_FIELDS:
        if layer.param.HasField(name):
            parts.extend(_flatten(getattr(layer.param, name)))
    return " ".join(parts)


def _flatten(msg: Message, prefix: str = "") -> list[str]:
    out = []
    for fd, value in msg.ListFields():
        key = prefix + fd.name
        if fd.message_type is not None:
            if fd.name.endswith("filler"):
                continue  # initialisers do not matter for a trained model
            items = value if fd.is_repeated else [value]
            for item in items:
                out.extend(_flatten(item, key + "."))
        elif fd.enum_type is not None:
            vals = value if fd.is_repeated else [value]
            out.append(f"{key}={','.join(fd.enum_type.values_by_number[v].name for v in vals)}")
        elif fd.is_repeated:
            out.append(f"{key}={','.join(_num(v) for v in value)}")
        else:
            out.append(f"{key}={_num(value)}")
    return out


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# -- findings -------------------------------------------------------------------------------
def findings(net: CaffeNet, plan: Plan) -> list[Finding]:
    out: list[Finding] = []
    consumers: dict[str, list[CaffeLayer]] = {}
    for lay in net.layers:
        for b in lay.bottoms:
            consumers.setdefault(b, []).append(lay)
    bns = [lay for lay in net.layers if lay.type == "BatchNorm"]
    if bns:
        out.extend(_batchnorm_findings(bns, consumers, net))
    out.extend(_pooling_findings(plan))
    in_place = [lay.name for lay in net.layers if lay.in_place]
    if in_place:
        out.append(Finding(
            "in_place", in_place,
            f"{len(in_place)} layer(s) write their output over their input "
            f"({', '.join(in_place[:4])}{', ...' if len(in_place) > 4 else ''}). In pycaffe the "
            "earlier value of such a blob is lost; layerdiff records each step separately."))
    return out


def _batchnorm_findings(bns, consumers, net: CaffeNet) -> list[Finding]:
    out: list[Finding] = []
    factors: dict[str, float] = {}
    for lay in bns:
        if len(lay.blobs) == 3 and lay.blobs[2].data.size >= 1:
            factors[lay.name] = float(lay.blobs[2].data[0])
    if factors:
        vals = np.array(list(factors.values()))
        names = list(factors)
        zero = [n for n, s in factors.items() if s == 0]
        nonunit = [n for n, s in factors.items() if s not in (0.0, 1.0)]
        first = bns[0]
        if first.name in factors and factors[first.name] != 0:
            s = factors[first.name]
            m, v = first.blobs[0].data, first.blobs[1].data
            eff = (f" For '{first.name}': stored mean[0]={m[0]:.6g}, var[0]={v[0]:.6g}; "
                   f"effective mean[0]={m[0] / s:.6g}, var[0]={v[0] / s:.6g}.")
        else:
            eff = ""
        msg = (f"BatchNorm keeps a third blob, the moving-average scale factor s "
               f"(values {_range(vals)} over {len(vals)} layer(s)). Caffe computes "
               f"(x - mean/s) / sqrt(var/s + eps): a port must divide the stored mean and "
               f"variance by s.{eff}")
        if not nonunit:
            msg += " Here s is 1 everywhere, so the stored statistics are already effective."
        out.append(Finding("bn_scale_factor", names, msg,
                           {"scale_factors": {n: factors[n] for n in names}}))
        if zero:
            out.append(Finding(
                "bn_scale_factor_zero", zero,
                f"{len(zero)} BatchNorm layer(s) have s == 0: Caffe then ignores the stored "
                "statistics (mean 0, var 0) and outputs x / sqrt(eps).", {}))
    eps = {lay.name: lay.param.batch_norm_param.eps for lay in bns}
    distinct = sorted(set(round(e, 12) for e in eps.values()))
    out.append(Finding(
        "bn_eps", list(eps),
        f"BatchNorm eps: {', '.join(f'{e:g}' for e in distinct)} (Caffe's default 1e-5). "
        "Set the same eps on the port's BatchNorm2d.", {"eps": eps}))
    batch_stats = [lay.name for lay in bns
                   if lay.param.batch_norm_param.HasField("use_global_stats")
                   and not lay.param.batch_norm_param.use_global_stats]
    if batch_stats:
        out.append(Finding(
            "bn_batch_stats", batch_stats,
            f"{len(batch_stats)} BatchNorm layer(s) set use_global_stats: false, so even at TEST "
            "they normalize with the batch's own mean and biased variance, not the stored "
            "statistics (a torch port in eval() would use running stats).", {}))
    no_scale = []
    for lay in bns:
        nxt = [c for c in consumers.get(lay.tops[0], []) if c is not lay
               and net.layers.index(c) > net.layers.index(lay)]
        if not nxt or nxt[0].type != "Scale":
            no_scale.append(lay.name)
    if no_scale:
        out.append(Finding(
            "bn_without_scale", no_scale,
            f"{len(no_scale)} BatchNorm layer(s) are not followed by a Scale layer: they have no "
            "learnable gamma/beta, so the port's BatchNorm2d needs weight=1, bias=0 "
            "(or affine=False).", {}))
    return out


def _pooling_findings(plan: Plan) -> list[Finding]:
    ceil_layers = []
    for p in plan.layers:
        lay = p.layer
        if lay.type != "Pooling" or p.bottom_shapes is None or p.top_shapes is None:
            continue
        pp = lay.param.pooling_param
        if pp.global_pooling:
            continue
        floor = _floor_pool_shape(pp, p.bottom_shapes[0])
        if floor is not None and tuple(floor) != tuple(p.top_shapes[0][2:]):
            ceil_layers.append((lay.name, tuple(p.top_shapes[0][2:]), floor))
    if not ceil_layers:
        return []
    name, got, floor = ceil_layers[0]
    return [Finding(
        "pool_ceil", [n for n, _, _ in ceil_layers],
        f"{len(ceil_layers)} Pooling layer(s) round their output size up (Caffe's ceil mode): "
        f"'{name}' gives {list(got)} where floor rounding (torch's default) gives {list(floor)}. "
        "Use ceil_mode=True in the port.", {})]


def _floor_pool_shape(pp, shape) -> list[int] | None:
    if len(shape) != 4:
        return None
    kh = pp.kernel_h or pp.kernel_size
    kw = pp.kernel_w or pp.kernel_size
    sh = pp.stride_h or pp.stride
    sw = pp.stride_w or pp.stride
    ph = pp.pad_h or pp.pad
    pw = pp.pad_w or pp.pad
    if not (kh and kw and sh and sw):
        return None
    return [(shape[2] + 2 * ph - kh) // sh + 1, (shape[3] + 2 * pw - kw) // sw + 1]


def _range(vals: np.ndarray) -> str:
    lo, hi = float(vals.min()), float(vals.max())
    return f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"

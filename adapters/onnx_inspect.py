"""``layerdiff inspect MODEL.onnx``: the nodes, their shapes and initializers, and the settings
that make a converted Caffe model disagree (the traps), without running it."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from layerdiff.adapters.onnx_load import OnnxModel


@dataclass
class NodeRow:
    index: int
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    output_shapes: list[list[int | str] | None]
    attrs: str
    initializers: list[list[int]]


@dataclass
class Trap:
    kind: str
    nodes: list[str]
    message: str


@dataclass
class OnnxInspection:
    model: str
    producer: str
    opset: int
    inputs: dict[str, list[int | str]]
    nodes: list[NodeRow]
    traps: list[Trap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_onnx(model: OnnxModel) -> OnnxInspection:
    from onnx import helper

    proto = model.proto
    shapes = model.value_shapes()
    rows = []
    for i, n in enumerate(proto.graph.node):
        attrs = " ".join(f"{a.name}={_short(helper.get_attribute_value(a))}"
                         for a in n.attribute)
        inits = [list(np.shape(model.initializers[x])) for x in n.input
                 if x in model.initializers]
        rows.append(NodeRow(i, n.name or f"{n.op_type}_{i}", n.op_type, list(n.input),
                            list(n.output), [shapes.get(o) for o in n.output], attrs, inits))
    producer = f"{proto.producer_name} {proto.producer_version}".strip()
    return OnnxInspection(str(model.path), producer, model.opset, dict(model.inputs), rows,
                          traps(model), list(model.notes))


def _short(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return ",".join(_short(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, str)):
        return str(v)
    return type(v).__name__


def traps(model: OnnxModel) -> list[Trap]:
    """The settings a Caffe <-> ONNX conversion commonly gets wrong, as found in this file."""
    from onnx import helper

    def attr(n: Any, name: str, default: Any) -> Any:
        for a in n.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    nodes = list(model.proto.graph.node)
    out: list[Trap] = []
    eps = Counter(float(attr(n, "epsilon", 1e-5)) for n in nodes
                  if n.op_type == "BatchNormalization")
    if eps:
        values = ", ".join(f"{e:g} ({c} nodes)" for e, c in sorted(eps.items()))
        out.append(Trap("bn_epsilon", [], f"BatchNormalization epsilon: {values}; Caffe's "
                        "default batch_norm_param.eps is 1e-5 and must match"))
        out.append(Trap("bn_statistics", [], "BatchNormalization mean/var initializers must be "
                        "Caffe's blob0/blob2 and blob1/blob2 (the scale factor divided out)"))
    floor = [n.name for n in nodes if n.op_type in ("MaxPool", "AveragePool")
             and not attr(n, "ceil_mode", 0)]
    if floor:
        out.append(Trap("pool_ceil_mode", floor, f"{len(floor)} pooling node(s) round their "
                        "output size down (ceil_mode=0); Caffe rounds up: a converted Caffe "
                        "pooling needs ceil_mode=1 or extra pads"))
    excl = [n.name for n in nodes if n.op_type == "AveragePool" and any(attr(n, "pads", []))
            and not attr(n, "count_include_pad", 0)]
    if excl:
        out.append(Trap("pool_ave_divisor", excl, "AveragePool with pads and "
                        "count_include_pad=0: Caffe divides border windows by the padded count"))
    gemm = [n.name for n in nodes if n.op_type == "Gemm" and not attr(n, "transB", 0)]
    if gemm:
        out.append(Trap("gemm_transB", gemm, "Gemm with transB=0: the weight is stored (in, "
                        "out), the transpose of Caffe's InnerProduct blob"))
    flat = [n.name for n in nodes if n.op_type in ("Flatten", "Reshape")]
    if flat and any(n.op_type in ("Gemm", "MatMul") for n in nodes):
        out.append(Trap("flatten_order", flat, "Flatten/Reshape before a Gemm must keep "
                        "Caffe's C,H,W order (a Transpose to channels-last reorders the "
                        "weight's columns)"))
    half = [k for k, a in model.initializers.items() if a.dtype == np.float16]
    if half:
        out.append(Trap("float16", [], f"{len(half)} float16 initializers: expect float16 "
                        "rounding against a float32 reference (precision, not a bug)"))
    custom = sorted({n.domain for n in nodes if n.domain not in ("", "ai.onnx")})
    if custom:
        out.append(Trap("custom_domain", [], f"ops from domains {custom}: onnxruntime must "
                        "implement them"))
    symbolic = [k for k, dims in model.inputs.items() if any(not isinstance(d, int)
                                                            for d in dims)]
    if symbolic:
        out.append(Trap("symbolic_dims", symbolic, "inputs with symbolic dims: the batch "
                        "defaults to 1, other dims need --shape"))
    return out

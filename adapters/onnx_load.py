"""Load an ONNX model for layerdiff: find the file, read it (external data too), check it, infer
shapes, and sort its values into what the user feeds, what is constant, and what nodes compute.

Everything here needs the optional ``onnx`` package (``pip install layerdiff[onnx]``); without it
each entry point raises one :class:`~layerdiff.errors.LayerdiffError` line saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerdiff.errors import InputSpecError, LayerdiffError, ModelFormatError

INSTALL_HINT = "ONNX support needs the optional packages: pip install layerdiff[onnx]"

#: Which input of an op is which parameter, in the names the rest of layerdiff uses (torch's):
#: fingerprint alignment and the probes read ``params["weight"]`` whatever produced the trace.
PARAM_ROLES: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gemm": {1: "weight", 2: "bias"},
    "MatMul": {1: "weight"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
    "PRelu": {1: "weight"},
    "Mul": {1: "weight"},
    "Add": {1: "bias"},
}
#: Ops whose outputs are constant for a given input shape (they get no record of their own).
SHAPE_OPS = {"Shape", "Size", "Constant", "ConstantOfShape"}


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or one line saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise LayerdiffError(INSTALL_HINT) from None
    return onnx, onnxruntime


def find_onnx_file(path: str | Path) -> Path:
    """``path`` itself, or the one ``.onnx`` file in the folder ``path``."""
    p = Path(path)
    if p.is_file():
        return p
    found = sorted(p.glob("*.onnx"))
    if len(found) != 1:
        names = ", ".join(f.name for f in found) or "none"
        raise ModelFormatError(f"{p}: expected exactly one .onnx file in the folder, found "
                               f"{len(found)} ({names})")
    return found[0]


@dataclass
class OnnxModel:
    """A checked, shape-inferred ONNX model and what layerdiff needs to know about its values."""

    path: Path
    proto: Any
    #: the inputs a user feeds: name -> dims (int, or a str for a symbolic dim)
    inputs: dict[str, list[int | str]]
    #: element type (numpy dtype) of each fed input
    input_dtypes: dict[str, np.dtype]
    #: initializer arrays by value name
    initializers: dict[str, np.ndarray]
    #: values constant for one input shape (initializers, Constant, shape arithmetic)
    static: set[str]
    notes: list[str] = field(default_factory=list)
    #: the file alone holds the whole model as ``proto`` has it (no external data, not rewritten)
    self_contained: bool = False

    @property
    def opset(self) -> int:
        for op in self.proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                return int(op.version)
        return 0

    def value_shapes(self) -> dict[str, list[int | str]]:
        """Shapes shape inference found for every named value (dims may be symbolic)."""
        g = self.proto.graph
        return {v.name: _dims(v) for v in (*g.input, *g.value_info, *g.output)
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_onnx(path: str | Path) -> OnnxModel:
    """Read, check and shape-infer the model at ``path`` (a ``.onnx`` file or its folder)."""
    onnx, _ = require_onnx()
    from google.protobuf.message import DecodeError

    file = find_onnx_file(path)
    try:
        proto = onnx.load(str(file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelFormatError(f"{file}: not a readable ONNX model ({first_line(e)})") from None
    if not proto.graph.node:
        raise ModelFormatError(f"{file}: not a readable ONNX model (the graph has no nodes)")
    from onnx.external_data_helper import uses_external_data

    self_contained = not any(uses_external_data(t) for t in proto.graph.initializer)
    _load_external(onnx, proto, file)
    try:
        # By path the checker reads the file in C++; from Python it would serialize it again.
        onnx.checker.check_model(str(file) if self_contained else proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        # A model over 2 GB can only be checked by path.
        if "2GB" not in str(e):
            raise ModelFormatError(f"{file}: invalid ONNX model ({first_line(e)})") from None
    notes: list[str] = []
    try:
        _infer_shapes(onnx, proto)
    except Exception as e:  # noqa: BLE001 - shapes are a convenience; the run measures them
        notes.append(f"shape inference failed ({first_line(e)}); shapes come from the run")
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    fed = [v for v in proto.graph.input if v.name not in inits]
    if len(fed) < len(proto.graph.input):
        notes.append(f"{len(proto.graph.input) - len(fed)} initializers are also listed as graph "
                     "inputs (older exporters): treated as weights, never fed")
    inputs = {v.name: _dims(v) for v in fed}
    dtypes = {v.name: _np_dtype(v.type.tensor_type.elem_type) for v in fed}
    return OnnxModel(file, proto, inputs, dtypes, inits, static_values(proto, set(inits)), notes,
                     self_contained)


def _infer_shapes(onnx: Any, proto: Any) -> None:
    """Add the inferred ``value_info`` to ``proto``, inferring on a copy whose big initializers
    carry their dims but not their bytes (a ResNet-50's 100 MB would be serialized twice)."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    for t in light.graph.initializer:
        if len(t.raw_data) > 4096:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL  # dims and type only
            t.external_data.add(key="location", value="layerdiff-shape-inference-only")
    inferred = onnx.shape_inference.infer_shapes(light)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)


def _load_external(onnx: Any, proto: Any, file: Path) -> None:
    from onnx.external_data_helper import uses_external_data

    for t in proto.graph.initializer:
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if not (file.parent / loc).is_file():
            raise ModelFormatError(f"{file}: initializer '{t.name}' is stored in external data "
                                   f"file '{loc}', which is missing beside the model")
    try:
        onnx.load_external_data_for_model(proto, str(file.parent))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{file}: cannot read its external data ({first_line(e)})"
                               ) from None


def _dims(v: Any) -> list[int | str]:
    out: list[int | str] = []
    for d in v.type.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return out


def _np_dtype(elem_type: int) -> np.dtype:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return np.dtype(np.float32)


def static_values(proto: Any, initializers: set[str]) -> set[str]:
    """Values that do not depend on the fed arrays' contents: initializers, constants, and
    everything computed from them and from shapes alone (in graph order)."""
    static = set(initializers)
    for node in proto.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type in SHAPE_OPS or all(i in static for i in ins):
            static.update(o for o in node.output if o)
    return static


def resolve_shapes(model: OnnxModel, shape: dict[str | None, tuple[int, ...]] | None
                   ) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: ``--shape`` (by name, or one unnamed for a single input) over the
    model's own dims; a symbolic batch dim left unset becomes 1."""
    shape = dict(shape or {})
    unknown = [k for k in shape if k is not None and k not in model.inputs]
    if unknown:
        raise InputSpecError(f"{model.path}: --shape names unknown input(s) {unknown}; the "
                             f"model's inputs are {list(model.inputs)}")
    out: dict[str, tuple[int, ...]] = {}
    for k, (name, dims) in enumerate(model.inputs.items()):
        given = shape.get(name) or (shape.get(None) if k == 0 else None)
        if given is not None:
            if dims and len(given) != len(dims):
                raise InputSpecError(f"{model.path}: input '{name}' has {len(dims)} dims "
                                     f"{dims}; --shape gave {len(given)}")
            out[name] = tuple(int(d) for d in given)
            continue
        free = [i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
        if [i for i in free if i != 0]:
            raise InputSpecError(f"{model.path}: input '{name}' has symbolic dims {dims}; pass "
                                 "--shape " + ",".join("N" if isinstance(d, str) else str(d)
                                                       for d in dims).replace("N", "1", 1))
        out[name] = tuple(1 if i in free else int(d) for i, d in enumerate(dims))
    return out


# -- torch module paths recorded by the exporters --------------------------------------------

_CALL_SUFFIX = re.compile(r"^(.+)_(\d+)$")


def exporter_module_paths(proto: Any) -> dict[int, str]:
    """The torch module path each node came from, by node position, where the exporter said.

    The dynamo exporter stores it in ``pkg.torch.onnx.name_scopes`` metadata (cumulative module
    paths, the node's own name last). The TorchScript exporter names nodes
    ``/layer1/layer1.0/conv1/Conv``; a module called again shows as ``relu_1``, ``relu_2``
    beside ``relu``, which is the same module (torch records it as ``relu#1``). An op of a
    module's own ``forward`` (``/layer1/layer1.0/Add``) gets that module's path; one at the
    top level (``/Flatten``) gets the op's name in lower case, as torch's capture names it.
    """
    import ast

    names = [n.name for n in proto.graph.node]
    scopes = {tuple(segs[:k]) for n in names if n.startswith("/")
              for segs in [_segments(n)[:-1]] for k in range(1, len(segs) + 1)}
    out: dict[int, str] = {}
    for i, node in enumerate(proto.graph.node):
        meta = {p.key: p.value for p in node.metadata_props}
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if raw:
            try:
                path = [s for s in ast.literal_eval(raw) if isinstance(s, str)]
            except (ValueError, SyntaxError):
                path = []
            if len(path) >= 2:
                out[i] = path[-2] or node.op_type.lower()
            continue
        if node.name.startswith("/"):
            segs = _segments(node.name)
            out[i] = _join_scopes(segs[:-1], scopes) or segs[-1].split("_")[0].lower()
    return out


def _segments(name: str) -> list[str]:
    return [s for s in name.split("/") if s]


def _join_scopes(segs: list[str], scopes: set[tuple[str, ...]]) -> str:
    # A scope repeats its parent's own name: /layer1/layer1.0/downsample/downsample.0/Conv
    parts: list[str] = []
    for k, seg in enumerate(segs):
        m = _CALL_SUFFIX.match(seg)
        if m and tuple(segs[:k]) + (m.group(1),) in scopes:
            seg = m.group(1)  # a repeated call of a module that also ran without suffix
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)

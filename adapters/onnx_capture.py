"""Run an ONNX model with onnxruntime (CPU) and record every node's outputs as a Trace.

Every node output is added to the graph's outputs, so one run yields all of them. Graph
optimizations are off by default: the values are the graph's own, node for node. With
``optimize="basic"``/``"extended"`` onnxruntime first rewrites the graph (constant folding, BN
folded into convs, fused activations) and the rewritten graph is what is recorded.

Nodes computing only constants (initializers, ``Constant``, shape arithmetic) get no record:
their values become the parameters of the nodes that read them. Each record's ``handle`` is an
:class:`OnnxCall`, which re-runs that one node on other inputs, optionally with other
initializers or attributes (what the diagnosis probes do).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from layerdiff.adapters.onnx_load import (
    PARAM_ROLES,
    OnnxModel,
    exporter_module_paths,
    first_line,
    require_onnx,
    static_values,
)

from layerdiff.errors import InputSpecError, UnsupportedError
from layerdiff.trace import Trace

OPTIMIZE_LEVELS = ("none", "basic", "extended")
_REDUCED = (np.float16,)


def session_options(ort: Any, level: str = "none", threads: int = 0) -> Any:
    """Session options: the given graph optimization level, and onnxruntime's warnings (one per
    initializer listed among the graph inputs, hundreds for older exports) silenced."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.log_severity_level = 3  # errors only
    # Idle worker threads otherwise spin after each run, stealing the CPU from everything
    # layerdiff does next (metrics, the Caffe engine).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


def new_session(ort: Any, proto_bytes: bytes, level: str, where: str, threads: int = 0) -> Any:
    try:
        return ort.InferenceSession(proto_bytes, session_options(ort, level, threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UnsupportedError(f"{where}: onnxruntime cannot run this model "
                               f"({first_line(e)})") from None


def optimized_model(model: OnnxModel, level: str) -> OnnxModel:
    """The graph onnxruntime runs after its optimizations at ``level``."""
    onnx, ort = require_onnx()
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory(prefix="layerdiff-ort-") as tmp:
        so = session_options(ort, level)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(model.proto.SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise UnsupportedError(f"{model.path}: onnxruntime cannot run this model "
                                   f"({first_line(e)})") from None
        proto = onnx.load(so.optimized_model_filepath)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    notes = [*model.notes, f"recorded onnxruntime's graph after '{level}' optimizations "
             f"({len(proto.graph.node)} nodes, {len(model.proto.graph.node)} before)"]
    return replace(model, proto=proto, initializers=inits,
                   static=static_values(proto, set(inits)), notes=notes, self_contained=False)


def capture_onnx(model: OnnxModel, inputs: dict[str, np.ndarray], *, optimize: str = "none",
                 progress: Callable[[int, int, str], None] | None = None) -> Trace:
    """Run ``model`` on ``inputs`` (by input name) and return one record per computing node."""
    onnx, ort = require_onnx()
    if optimize not in OPTIMIZE_LEVELS:
        raise InputSpecError(f"ONNX optimization level {optimize!r}: expected one of "
                             f"{', '.join(OPTIMIZE_LEVELS)}")
    if optimize != "none":
        model = optimized_model(model, optimize)
    feeds = _feeds(model, inputs)
    sess = new_session(ort, _every_output_bytes(onnx, model), "none", str(model.path))
    names = [o.name for o in sess.get_outputs()]
    if progress:
        progress(0, len(model.proto.graph.node), "onnxruntime")
    try:
        arrays = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        raise UnsupportedError(f"{model.path}: onnxruntime failed to run the model "
                               f"({first_line(e)})") from None
    values: dict[str, np.ndarray] = {**model.initializers, **feeds, **dict(zip(names, arrays,
                                                                      strict=True))}
    return _records(model, feeds, values, optimize, progress)


def _every_output_bytes(onnx: Any, model: OnnxModel) -> bytes:
    """The model with every node output added to the graph outputs, serialized.

    Protobuf parses concatenated messages as one merged message (repeated fields appended), so
    for a self-contained file its own bytes plus a message holding only the extra outputs is
    that model: re-serializing a ResNet-50's 100 MB of weights would cost a third of the run.
    """
    graph_outputs = {o.name for o in model.proto.graph.output}
    wanted = [onnx.ValueInfoProto(name=o) for n in model.proto.graph.node for o in n.output
              if o and o not in graph_outputs]
    if model.self_contained:
        extra = onnx.ModelProto()
        extra.graph.output.extend(wanted)
        return model.path.read_bytes() + extra.SerializeToString()
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    proto.graph.output.extend(wanted)
    return proto.SerializeToString()


def _feeds(model: OnnxModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [n for n in model.inputs if n not in inputs]
    extra = [n for n in inputs if n not in model.inputs]
    if missing or extra:
        raise InputSpecError(f"{model.path}: inputs {sorted(inputs)} do not match the model's "
                             f"inputs {list(model.inputs)}")
    return {n: np.ascontiguousarray(inputs[n], dtype=model.input_dtypes[n])
            for n in model.inputs}


def _records(model: OnnxModel, feeds: dict[str, np.ndarray], values: dict[str, np.ndarray],
             optimize: str, progress: Callable[[int, int, str], None] | None) -> Trace:
    from onnx import helper

    proto = model.proto
    modules = exporter_module_paths(proto)
    trace = Trace(meta={
        "framework": "onnx", "model": str(model.path), "opset": model.opset,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "optimize": optimize, "input_names": list(model.inputs), "notes": list(model.notes),
    }, inputs=dict(feeds))
    taken: set[str] = set()
    reduced = False
    # An exporter that deduplicates equal weights feeds nodes Identity(initializer): the
    # initializer is what a fix must patch.
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node
               if n.op_type == "Identity" and n.input and n.input[0] in model.initializers}
    nodes = list(proto.graph.node)
    for i, node in enumerate(nodes):
        tops = [o for o in node.output if o]
        if not tops or all(o in model.static for o in tops):
            continue
        name = node.name or f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        taken.add(name)
        roles = PARAM_ROLES.get(node.op_type, {})
        consts: dict[str, np.ndarray] = {}
        params: dict[str, np.ndarray] = {}
        inits: dict[str, str] = {}
        for k, x in enumerate(node.input):
            if x and x in model.static:
                role = roles.get(k, f"input{k}")
                consts[x] = values[x]
                params[role] = values[x]
                inits[role] = aliases.get(x, x)
        bottoms = [x for x in node.input if x and x not in model.static]
        outs = [values[o] for o in tops]
        dtype = str(outs[0].dtype)
        reduced = reduced or dtype == "float16"
        attrs: dict[str, Any] = {
            "op_type": node.op_type, "dtype": dtype,
            "onnx_attrs": {a.name: _jsonable(helper.get_attribute_value(a))
                           for a in node.attribute},
            "initializers": inits,
        }
        if node.domain not in ("", "ai.onnx"):
            attrs["domain"] = node.domain
        if i in modules:
            attrs["torch_module"] = modules[i]
        handle = OnnxCall(node, consts, bottoms, [np.asarray(values[b]).dtype for b in bottoms],
                          list(proto.opset_import), int(proto.ir_version), inits)
        trace.add(name, node.op_type, tops, bottoms, outs, attrs, handle, params)
        if progress:
            progress(i + 1, len(nodes), name)
    trace.meta["dtype"] = "float16" if reduced else "float32"
    return trace


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str)) or v is None:
        return v
    return type(v).__name__  # a tensor or a subgraph: named, not copied


@dataclass
class OnnxCall:
    """Re-run one ONNX node with onnxruntime: ``run(*inputs) -> [outputs]``.

    ``with_params``/``with_attributes`` give a copy with other initializers (by role, e.g.
    ``running_mean``) or attributes (``epsilon``); ``float32()`` a copy computing in float32.
    """

    node: Any
    #: the node's constant inputs by value name
    consts: dict[str, np.ndarray]
    #: its data inputs, fed on each run, and their element types
    input_tops: list[str]
    input_dtypes: list[np.dtype]
    opsets: list[Any]
    ir_version: int
    #: parameter role -> value name (``running_mean`` -> ``bn1.running_mean``)
    roles: dict[str, str] = field(default_factory=dict)
    _session: Any = field(default=None, repr=False, compare=False)

    def run(self, *xs: np.ndarray) -> list[np.ndarray]:
        _, ort = require_onnx()
        if len(xs) != len(self.input_tops):
            raise ValueError(f"{self.node.name}: {len(self.input_tops)} inputs, got {len(xs)}")
        feeds = {n: np.ascontiguousarray(x, dtype=d)
                 for n, x, d in zip(self.input_tops, xs, self.input_dtypes, strict=True)}
        if self._session is None:
            # One node, re-run a few times: a one-thread session starts fastest.
            self._session = new_session(ort, self._model(feeds).SerializeToString(), "none",
                                        f"node '{self.node.name}'", threads=1)
        return list(self._session.run(None, feeds))

    def __call__(self, *xs: np.ndarray) -> np.ndarray:
        return self.run(*xs)[0]

    def _model(self, feeds: dict[str, np.ndarray]) -> Any:
        from onnx import ValueInfoProto, helper, numpy_helper

        ins = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype),
                                             list(x.shape)) for n, x in feeds.items()]
        outs = [ValueInfoProto(name=o) for o in self.node.output if o]
        inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in self.consts.items()]
        graph = helper.make_graph([self.node], "layerdiff_node", ins, outs, inits)
        model = helper.make_model(graph, opset_imports=self.opsets)
        model.ir_version = self.ir_version
        return model

    def with_params(self, **arrays: np.ndarray) -> OnnxCall:
        """A copy whose parameters named by role (``running_mean=...``) are replaced."""
        consts = dict(self.consts)
        for role, arr in arrays.items():
            name = self.roles[role]
            consts[name] = np.asarray(arr, dtype=np.asarray(self.consts[name]).dtype)
        return replace(self, consts=consts, _session=None)

    def with_attributes(self, **attrs: Any) -> OnnxCall:
        """A copy of the node with these attributes set (added or replaced)."""
        from onnx import helper

        node = copy.deepcopy(self.node)
        keep = [a for a in node.attribute if a.name not in attrs]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        return replace(self, node=node, _session=None)

    @property
    def reduced_params(self) -> bool:
        """Whether some constant input is stored in reduced precision (float16)."""
        return any(np.asarray(a).dtype in _REDUCED for a in self.consts.values())

    def float32(self, jitter: float = 0.0, seed: int = 0) -> OnnxCall:
        """A copy computing in float32: reduced-precision constants and inputs widened.

        ``jitter`` > 0 multiplies each widened constant by ``1 + jitter * U(-1, 1)`` (what
        storage rounding of that size does to the output, see the precision probe).
        """
        rng = np.random.default_rng(seed)
        consts = {}
        for n, a in self.consts.items():
            arr = np.asarray(a)
            if arr.dtype in _REDUCED:
                arr = arr.astype(np.float32)
                if jitter:
                    arr = arr * (1 + jitter * rng.uniform(-1, 1, arr.shape)).astype(np.float32)
            consts[n] = arr
        dtypes = [np.dtype(np.float32) if d in _REDUCED else d for d in self.input_dtypes]
        return replace(self, consts=consts, input_dtypes=dtypes, _session=None)

    def attribute(self, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


"""Read a Caffe model (deploy prototxt + optional caffemodel) into a :class:`CaffeNet`.

Handles every input form (``input:`` + ``input_dim``/``input_shape``, ``Input`` layers, and data
layers of train/test prototxts), V1 ``layers {}`` files, TEST-phase include/exclude rules, and
matches caffemodel blobs to layers by name. The result is checked for graph consistency here;
blob shapes are checked against each layer type by the engine's plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format

from layerdiff.caffe import caffe_pb2
from layerdiff.caffe.net import CaffeLayer, CaffeNet
from layerdiff.caffe.upgrade import upgrade_v1_layer
from layerdiff.caffe.weights import read_caffemodel
from layerdiff.errors import ModelFormatError

# Layers that feed data from files in train/test prototxts: replaced by a plain input.
DATA_LAYER_TYPES = frozenset({
    "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "AnnotatedData", "VideoData",
})
# Layers that only make sense with labels: dropped (with a note) for inference.
_DROP_TYPES = frozenset({"Accuracy", "DetectionEvaluate", "HDF5Output"})

Shape = tuple[int, ...]


def find_model_files(path: str | Path) -> tuple[Path, Path | None]:
    """Pick the prototxt and caffemodel of a model directory (or accept a prototxt path)."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".caffemodel":
            raise ModelFormatError(
                f"{path}: a caffemodel alone has no layer definitions; pass the model directory "
                "or --prototxt with it")
        return path, None
    protos = sorted(p for p in path.glob("*.prototxt") if p.is_file())
    if not protos:
        raise ModelFormatError(f"{path}: no .prototxt file in this directory")
    if len(protos) > 1:
        deploys = [p for p in protos if "deploy" in p.name.lower()]
        if len(deploys) != 1:
            names = ", ".join(p.name for p in protos)
            raise ModelFormatError(
                f"{path}: {len(protos)} prototxts ({names}) and not exactly one named *deploy*; "
                "pass --prototxt")
        protos = deploys
    models = sorted(p for p in path.glob("*.caffemodel") if p.is_file())
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        raise ModelFormatError(f"{path}: several caffemodels ({names}); pass --weights")
    return protos[0], (models[0] if models else None)


def parse_prototxt(path: str | Path) -> caffe_pb2.NetParameter:
    """Parse a prototxt; syntax errors name ``file:line:column``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read prototxt ({e.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_extension=False)
    except text_format.ParseError as e:
        if b"\0" in raw or "\ufffd" in text:
            raise ModelFormatError(
                f"{path}: binary data, not a text prototxt (a .caffemodel? pass that with "
                "--weights)") from None
        line, col = e.GetLine(), e.GetColumn()
        msg = str(e)
        # ParseError's text starts with "line:col : "; keep just the message.
        if line is not None and msg.startswith(f"{line}:"):
            msg = msg.split(" : ", 1)[-1]
        where = f"{path}:{line}:{col}" if line is not None else str(path)
        raise ModelFormatError(f"{where}: {msg}") from None
    return net


def load_caffe(
    path: str | Path | None = None,
    *,
    prototxt: str | Path | None = None,
    weights: str | Path | None = None,
    shape: dict[str, Shape] | Shape | None = None,
) -> CaffeNet:
    """Read a Caffe model.

    ``path`` is a model directory (one prototxt, preferring ``*deploy*``, and an optional
    ``.caffemodel``) or a prototxt file; ``prototxt``/``weights`` name the files explicitly and
    win over what the directory holds. ``shape`` overrides input shapes (one shape for the first
    input, or ``{input: shape}``) and gives data layers of train/test prototxts their shape.
    """
    proto_path, weights_path = (None, None)
    if path is not None:
        proto_path, weights_path = find_model_files(path)
    if prototxt is not None:
        proto_path = Path(prototxt)
        if not proto_path.is_file():
            raise ModelFormatError(f"{proto_path}: no such prototxt")
    if weights is not None:
        weights_path = Path(weights)
        if not weights_path.is_file():
            raise ModelFormatError(f"{weights_path}: no such caffemodel")
    if proto_path is None:
        raise ModelFormatError("no model given: pass a model directory or --prototxt")

    netp = parse_prototxt(proto_path)
    if not (netp.layer or netp.layers or netp.input):
        raise ModelFormatError(f"{proto_path}: defines no layers and no inputs (an empty "
                               "prototxt?)")
    notes: list[str] = []
    v1 = len(netp.layers) > 0
    if v1 and len(netp.layer) > 0:
        raise ModelFormatError(f"{proto_path}: mixes V1 'layers' and V2 'layer' definitions")
    if v1:
        raw_layers = [upgrade_v1_layer(lp, proto_path) for lp in netp.layers]
    else:
        raw_layers = list(netp.layer)
    if v1:
        notes.append("V1 prototxt ('layers {}' with enum types) upgraded to the V2 form")

    overrides = _normalize_shape_override(shape)
    layers: list[CaffeLayer] = []
    from_data: set[str] = set()
    legacy = _legacy_input_layer(netp, proto_path)
    if legacy is not None:
        layers.append(CaffeLayer("input", "Input", [], list(legacy.top), legacy, [], -1))

    for idx, lp in enumerate(raw_layers):
        if not _included(lp):
            continue
        name, type_ = lp.name or f"<layer {idx}>", lp.type
        if type_ in _DROP_TYPES or type_.endswith("Loss"):
            notes.append(f"dropped '{name}' ({type_}): not used for inference")
            continue
        if type_ in DATA_LAYER_TYPES:
            lp = _data_layer_as_input(lp, name, proto_path, overrides)
            notes.append(f"data layer '{name}' ({type_}) replaced by input "
                         f"'{lp.top[0]}' of shape {tuple(lp.input_param.shape[0].dim)}")
            type_ = "Input"
            from_data.add(name)
        layers.append(CaffeLayer(name, type_, list(lp.bottom), list(lp.top), lp, [], idx))

    _drop_unused_label_tops(layers, from_data)
    inputs = _input_shapes(layers, overrides, proto_path)
    _check_graph(layers, proto_path)

    net = CaffeNet(netp.name or proto_path.stem, layers, inputs, proto_path, weights_path,
                   notes, upgraded_v1=v1)
    if weights_path is not None:
        _attach_weights(net, weights_path)
    return net


# -- phase rules ----------------------------------------------------------------------------
def _rule_met(rule: caffe_pb2.NetStateRule) -> bool:
    # Caffe's StateMeetsRule for the inference state: phase TEST, level 0, no stages.
    if rule.HasField("phase") and rule.phase != caffe_pb2.TEST:
        return False
    if rule.HasField("min_level") and 0 < rule.min_level:
        return False
    if rule.HasField("max_level") and 0 > rule.max_level:
        return False
    if len(rule.stage) > 0:  # a required stage we are not in
        return False
    return True  # not_stage: we have no stages, so none is excluded


def _included(lp: caffe_pb2.LayerParameter) -> bool:
    if len(lp.include) > 0:
        return any(_rule_met(r) for r in lp.include)
    return not any(_rule_met(r) for r in lp.exclude)


# -- inputs ---------------------------------------------------------------------------------
def _normalize_shape_override(shape) -> dict[str | None, Shape]:
    if shape is None:
        return {}
    if isinstance(shape, dict):
        return {k: tuple(int(d) for d in v) for k, v in shape.items()}
    return {None: tuple(int(d) for d in shape)}


def _legacy_input_layer(netp: caffe_pb2.NetParameter, path: Path):
    """Net-level ``input:`` fields become one Input layer named ``input`` (as Caffe does)."""
    if not netp.input:
        if netp.input_shape or netp.input_dim:
            raise ModelFormatError(f"{path}: input_shape/input_dim given without 'input:' names")
        return None
    names = list(netp.input)
    shapes: list[list[int]] = []
    if netp.input_shape:
        if len(netp.input_shape) != len(names):
            raise ModelFormatError(f"{path}: {len(names)} inputs but {len(netp.input_shape)} "
                                   "input_shape entries")
        shapes = [list(s.dim) for s in netp.input_shape]
    elif netp.input_dim:
        if len(netp.input_dim) != 4 * len(names):
            raise ModelFormatError(f"{path}: {len(names)} inputs need {4 * len(names)} "
                                   f"input_dim values, got {len(netp.input_dim)}")
        dims = list(netp.input_dim)
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(names))]
    else:
        shapes = [[] for _ in names]  # shape must come from --shape
    lp = caffe_pb2.LayerParameter(name="input", type="Input", top=names)
    for s in shapes:
        lp.input_param.shape.add().dim.extend(s)
    return lp


def _data_layer_as_input(lp, name: str, path: Path, overrides) -> caffe_pb2.LayerParameter:
    top = lp.top[0] if lp.top else name
    shp = overrides.get(top) or overrides.get(None)
    if shp is None and lp.type == "MemoryData" and lp.HasField("memory_data_param"):
        m = lp.memory_data_param
        shp = (m.batch_size, m.channels, m.height, m.width)
    if shp is None:
        raise ModelFormatError(
            f"{path}: layer '{name}' ({lp.type}) reads its data from files, so its shape is "
            f"unknown; pass --shape N,C,H,W for input '{top}'")
    new = caffe_pb2.LayerParameter(name=name, type="Input", top=list(lp.top))
    for _ in lp.top:
        new.input_param.shape.add().dim.extend(shp)
    return new


def _drop_unused_label_tops(layers: list[CaffeLayer], from_data: set[str]) -> None:
    """A replaced data layer keeps its label top only if some kept layer reads it."""
    used = {b for lay in layers for b in lay.bottoms}
    for lay in layers:
        if lay.name not in from_data:
            continue
        keep = [i for i, t in enumerate(lay.tops) if i == 0 or t in used]
        lay.tops = [lay.tops[i] for i in keep]
        shapes = [caffe_pb2.BlobShape(dim=list(lay.param.input_param.shape[i].dim)) for i in keep]
        del lay.param.top[:]
        lay.param.top.extend(lay.tops)
        del lay.param.input_param.shape[:]
        lay.param.input_param.shape.extend(shapes)


def _input_shapes(layers: list[CaffeLayer], overrides, path: Path) -> dict[str, Shape]:
    inputs: dict[str, Shape] = {}
    for lay in layers:
        if lay.type != "Input":
            continue
        shapes = list(lay.param.input_param.shape)
        if len(shapes) not in (0, 1, len(lay.tops)):
            raise ModelFormatError(f"{path}: layer '{lay.name}' (Input): {len(lay.tops)} tops "
                                   f"but {len(shapes)} shapes in input_param")
        for i, top in enumerate(lay.tops):
            dims = tuple(shapes[i if len(shapes) > 1 else 0].dim) if shapes else ()
            first = not inputs
            given = overrides.get(top) or (overrides.get(None) if first else None)
            if given and dims and len(given) != len(dims):
                raise ModelFormatError(
                    f"{path}: --shape {','.join(map(str, given))} has {len(given)} dims but "
                    f"input '{top}' is declared with {len(dims)} ({list(dims)})")
            dims = given or dims
            if not dims:
                raise ModelFormatError(f"{path}: input '{top}' has no shape; pass --shape")
            if any(d <= 0 for d in dims):
                raise ModelFormatError(
                    f"{path}: input '{top}' has shape {list(dims)}; every dim must be > 0")
            inputs[top] = tuple(int(d) for d in dims)
    unknown = set(k for k in overrides if k is not None) - set(inputs)
    if unknown:
        raise ModelFormatError(f"{path}: --shape names unknown input(s) {sorted(unknown)}; "
                               f"inputs are {list(inputs)}")
    if not inputs and not any(lay.type in ("DummyData", "Parameter") for lay in layers):
        raise ModelFormatError(f"{path}: the net has no input (no Input layer or 'input:' field)")
    return inputs


# -- graph and weights ----------------------------------------------------------------------
def _check_graph(layers: list[CaffeLayer], path: Path) -> None:
    produced: set[str] = set()
    names: set[str] = set()
    for i, lay in enumerate(layers):
        if lay.name in names:
            raise ModelFormatError(f"{path}: two layers are named '{lay.name}'")
        names.add(lay.name)
        for b in lay.bottoms:
            if b not in produced:
                later = next((x for x in layers[i:] if b in x.tops), None)
                why = ("is not produced by any earlier layer" if later is None else
                       f"is produced only later, by layer '{later.name}' ({later.type}): the "
                       "layers are out of order or the bottom/top graph has a cycle")
                raise ModelFormatError(f"{path}: layer '{lay.name}' ({lay.type}): bottom '{b}' "
                                       + why)
        for j, t in enumerate(lay.tops):
            in_place = j < len(lay.bottoms) and lay.bottoms[j] == t
            if t in produced and not in_place:
                raise ModelFormatError(
                    f"{path}: layer '{lay.name}' ({lay.type}): top '{t}' is already produced by "
                    "an earlier layer and this is not an in-place use of it")
            if t in lay.tops[:j]:
                raise ModelFormatError(f"{path}: layer '{lay.name}' ({lay.type}): top '{t}' "
                                       "listed twice")
            produced.add(t)


def _attach_weights(net: CaffeNet, path: Path) -> None:
    stored = read_caffemodel(path)
    by_name = {lay.name: lay for lay in net.layers}
    seen: set[str] = set()
    for wl in stored:
        if not wl.blobs:
            continue
        target = by_name.get(wl.name)
        if target is None:
            net.unused_weights.append(wl.name)
            continue
        if wl.name in seen:
            continue  # Caffe copies the first; a later duplicate is ignored
        seen.add(wl.name)
        target.blobs = wl.blobs
        for i, b in enumerate(wl.blobs):
            # float64 sum: exact test for "all finite" without a temporary the blob's size
            if b.data.size and not np.isfinite(np.add.reduce(b.data, dtype=np.float64)):
                nan, inf = int(np.isnan(b.data).sum()), int(np.isinf(b.data).sum())
                if nan or inf:
                    net.notes.append(f"warning: layer '{wl.name}' ({target.type}) blob {i} in "
                                     f"{path.name} holds {nan} NaN and {inf} Inf value(s)")
    named = [wl.name for wl in stored if wl.blobs]
    if named and not seen:
        shown = ", ".join(named[:4]) + (", ..." if len(named) > 4 else "")
        raise ModelFormatError(f"{path}: none of its {len(named)} weight layer(s) ({shown}) is "
                               f"in {net.prototxt.name}; weights for another model?")
    if net.unused_weights:
        net.notes.append(f"weights for {len(net.unused_weights)} layer(s) not in the prototxt "
                         f"ignored: {', '.join(net.unused_weights)}")

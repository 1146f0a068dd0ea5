"""Turn whatever the user points at (Caffe model, torch model, ONNX model, saved trace) into a
Trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerdiff.errors import InputSpecError, ModelFormatError, UnsupportedError
from layerdiff.inputs import InputSpec, make_inputs
from layerdiff.trace import Trace

TORCH_SUFFIXES = {".pt", ".pth", ".pt2", ".ts", ".torchscript", ".py"}


def detect_framework(path: str | Path) -> str:
    """``caffe``, ``torch``, ``onnx`` or ``trace``, from the files at ``path``."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".npz":
            return "trace"
        if p.suffix in (".prototxt", ".caffemodel"):
            return "caffe"
        if p.suffix in TORCH_SUFFIXES:
            return "torch"
        if p.suffix == ".onnx":
            return "onnx"
        raise ModelFormatError(f"{p}: cannot tell the model format from the file name "
                               "(expected .prototxt, .npz, .py, .pt, .pth, .pt2, .onnx)")
    if any(p.glob("*.prototxt")):
        return "caffe"
    if (p / "model.py").is_file():
        return "torch"
    if any(p.glob("*.onnx")):
        return "onnx"  # the loader insists on exactly one
    if any(q.suffix in TORCH_SUFFIXES for q in p.iterdir()):
        return "torch"
    raise ModelFormatError(f"{p}: no Caffe prototxt, torch model.py/.pt/.pt2, ONNX model or "
                           "trace .npz here")


@dataclass
class ModelOptions:
    prototxt: str | None = None
    weights: str | None = None
    shape: dict[str | None, tuple[int, ...]] | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_pickle: bool = False
    keep_train_mode: bool = False
    stream_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_caffe_model(path: str | Path, opts: ModelOptions):
    """The CaffeNet at ``path`` (directory or prototxt), honouring --prototxt/--weights/--shape."""
    from layerdiff.caffe import load_caffe

    p = None if opts.prototxt and Path(path).is_file() else path
    return load_caffe(p, prototxt=opts.prototxt, weights=opts.weights, shape=opts.shape)


def trace_model(path: str | Path, specs: dict[str | None, InputSpec], opts: ModelOptions,
                progress=None, inputs: dict[str, np.ndarray] | None = None) -> Trace:
    """Run the model at ``path`` on ``inputs``, or on inputs made from ``specs``."""
    fw = detect_framework(path)
    if fw == "trace":
        return Trace.load(path)
    if fw == "caffe":
        from layerdiff.adapters.caffe import capture_caffe

        net = load_caffe_model(path, opts)
        if inputs is None:
            inputs = make_inputs(specs, net.inputs)
        return capture_caffe(net, inputs, dtype=opts.dtype, stream_dir=opts.stream_dir,
                             progress=progress)
    if fw == "onnx":
        return trace_onnx(path, specs, opts, progress, inputs)
    from layerdiff.adapters.torch import capture_torch, input_shapes, load_torch

    model = load_torch(path, trust_pickle=opts.trust_pickle, weights=opts.weights)
    if inputs is None:
        if opts.shape:
            shapes = {(k or "input"): v for k, v in opts.shape.items()}
        else:
            shapes = input_shapes(model) or input_shapes(path)
            if not shapes:
                raise InputSpecError(f"{path}: the torch model does not declare its input "
                                     "shape; pass --shape N,C,H,W")
        inputs = make_inputs(specs, dict(shapes))
    return capture_torch(model, inputs, device=opts.device, dtype=opts.dtype,
                         keep_train_mode=opts.keep_train_mode)


def trace_onnx(path: str | Path, specs: dict[str | None, InputSpec], opts: ModelOptions,
               progress=None, inputs: dict[str, np.ndarray] | None = None) -> Trace:
    """Run the ONNX model at ``path`` with onnxruntime (``opts.extra["onnx_optimize"]``)."""
    from layerdiff.adapters.onnx import capture_onnx, load_onnx, resolve_shapes

    if opts.dtype != "float32":
        raise UnsupportedError(f"{path}: an ONNX graph computes in its own element types; "
                               f"--dtype {opts.dtype} does not apply (convert the graph instead)")
    model = load_onnx(path)
    if inputs is None:
        inputs = make_inputs(specs, resolve_shapes(model, opts.shape))
    elif set(inputs) != set(model.inputs):
        if len(inputs) < len(model.inputs):
            raise InputSpecError(f"{path}: the model's inputs are {list(model.inputs)}; the "
                                 f"other side feeds only {list(inputs)}")
        # other names: by position, as for the other frameworks
        inputs = dict(zip(model.inputs, inputs.values(), strict=False))
    return capture_onnx(model, inputs, optimize=opts.extra.get("onnx_optimize", "none"),
                        progress=progress)


"""ONNX adapter: an ``.onnx`` model run by onnxruntime (CPU), every node's output recorded.

Public API::

    load_onnx(path) -> OnnxModel             # a .onnx file, or a folder holding exactly one
    resolve_shapes(model, shape) -> {input name: shape}
    capture_onnx(model, inputs, *, optimize="none") -> Trace

Needs the optional extra ``layerdiff[onnx]`` (``onnx``, ``onnxruntime``). Loading lives in
:mod:`layerdiff.adapters.onnx_load`, the run in :mod:`layerdiff.adapters.onnx_capture`; each
record's ``handle`` is an :class:`OnnxCall`.
"""

from layerdiff.adapters.onnx_capture import OPTIMIZE_LEVELS, OnnxCall, capture_onnx
from layerdiff.adapters.onnx_load import (
    INSTALL_HINT,
    OnnxModel,
    find_onnx_file,
    load_onnx,
    require_onnx,
    resolve_shapes,
)

__all__ = ["INSTALL_HINT", "OPTIMIZE_LEVELS", "OnnxCall", "OnnxModel", "capture_onnx",
           "find_onnx_file", "load_onnx", "require_onnx", "resolve_shapes"]

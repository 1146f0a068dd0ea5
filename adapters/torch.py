"""PyTorch adapter: load a user's port and capture every layer's output as a Trace.

Public API::

    load_torch(path, trust_pickle=False, weights=None, *, strict=True) -> nn.Module
    input_shapes(module_or_path) -> dict[str, tuple] | None
    capture_torch(model, inputs, *, device="cpu", dtype="float32", keep_train_mode=False,
                  prefer_graph=True) -> Trace

Loading lives in :mod:`layerdiff.adapters.torch_load`, capture in
:mod:`layerdiff.adapters.torch_capture`; each record's ``handle`` is a :class:`TorchCall`.
"""

from layerdiff.adapters.torch_capture import TorchCall, capture_torch
from layerdiff.adapters.torch_load import input_shapes, load_state_dict_file, load_torch

__all__ = ["TorchCall", "capture_torch", "input_shapes", "load_state_dict_file", "load_torch"]

"""One implementation per Caffe layer type, looked up by the type string.

Each family module (``conv.py``, ``pool.py``, ...) defines :class:`LayerImpl` subclasses and
decorates them with :func:`register`. A subclass:

- reads and validates its parameters in :meth:`LayerImpl.setup` (``self.param`` is the layer's
  ``caffe_pb2.LayerParameter``); a value it does not implement raises through
  :meth:`LayerImpl.unsupported`, which names layer, type and field: never a silent wrong answer;
- states the shapes it produces (:meth:`top_shapes`) and the learnable blobs it expects
  (:meth:`blob_shapes`), so a model is checked before anything runs;
- computes :meth:`forward` from its bottoms and blobs, returning new arrays. Inputs are passed
  read-only and must never be written: Caffe's in-place layers are out-of-place here, which is
  what keeps every layer's output in the trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from layerdiff.errors import ModelFormatError, UnsupportedError, layer_error

if TYPE_CHECKING:
    from layerdiff.caffe.net import CaffeLayer

Shape = tuple[int, ...]

REGISTRY: dict[str, type[LayerImpl]] = {}


class LayerImpl:
    """Base class of a Caffe layer implementation (see the module docstring)."""

    #: (min, max) bottom count; ``None`` as max means unbounded.
    num_bottoms: ClassVar[tuple[int, int | None]] = (1, 1)
    #: (min, max) top count.
    num_tops: ClassVar[tuple[int, int | None]] = (1, 1)
    #: True when the output shape depends on the data (DetectionOutput, Filter): the planned
    #: top shape is then an upper bound/placeholder and the runner does not hold forward to it.
    dynamic_shape: ClassVar[bool] = False
    #: Family module name, filled in by :func:`register`.
    family: ClassVar[str] = ""

    def __init__(self, layer: CaffeLayer, phase: str = "TEST") -> None:
        self.layer = layer
        self.name = layer.name
        self.type = layer.type
        self.param = layer.param
        self.phase = phase
        self._check_count("bottom", len(layer.bottoms), self.num_bottoms)
        self._check_count("top", len(layer.tops), self.num_tops)
        self.setup()

    # -- to override ----------------------------------------------------------------------
    def setup(self) -> None:
        """Read and validate parameters from ``self.param``."""

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Shapes of the learnable blobs this layer expects, in Caffe's order."""
        return []

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        raise NotImplementedError

    def forward(self, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    # -- helpers for subclasses -----------------------------------------------------------
    def unsupported(self, field: str, msg: str) -> UnsupportedError:
        """An error for a parameter value we do not implement or Caffe would refuse."""
        return layer_error(UnsupportedError, self.name, self.type, f"{field}: {msg}")

    def invalid(self, msg: str) -> ModelFormatError:
        """An error for a shape/count inconsistency in the model itself."""
        return layer_error(ModelFormatError, self.name, self.type, msg)

    def canonical_axis(self, axis: int, ndim: int, field: str = "axis") -> int:
        """Caffe's CanonicalAxisIndex: negative counts from the end; out of range is an error."""
        if not -ndim <= axis < ndim:
            raise self.unsupported(field, f"axis {axis} out of range for a {ndim}-D blob")
        return axis + ndim if axis < 0 else axis

    def _check_count(self, what: str, n: int, bounds: tuple[int, int | None]) -> None:
        lo, hi = bounds
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{'any' if hi is None else hi}"
            raise self.invalid(f"has {n} {what}(s), expected {want}")


def register(*type_names: str) -> Callable[[type[LayerImpl]], type[LayerImpl]]:
    """Class decorator: make ``cls`` the implementation of each Caffe type in ``type_names``."""

    def deco(cls: type[LayerImpl]) -> type[LayerImpl]:
        cls.family = cls.__module__.rsplit(".", 1)[-1]
        for t in type_names:
            if t in REGISTRY and REGISTRY[t] is not cls:
                raise RuntimeError(f"Caffe type {t!r} registered twice")
            REGISTRY[t] = cls
        return cls

    return deco


def lookup(type_name: str) -> type[LayerImpl] | None:
    """The implementation of a Caffe type, or None when the engine has none."""
    _load_families()
    return REGISTRY.get(type_name)


def supported_types() -> list[str]:
    _load_families()
    return sorted(REGISTRY)


#: The family modules, each ``layerdiff/engine/<family>.py``.
FAMILIES = (
    "source", "conv", "dense", "pool", "norm", "activation", "shape", "eltwise",
    "resample", "detection", "recurrent",
)
_loaded = False


def _load_families() -> None:
    # Import every family module once so their @register decorators run.
    global _loaded
    if not _loaded:
        import importlib

        for fam in FAMILIES:
            importlib.import_module(f"layerdiff.engine.{fam}")
        _loaded = True

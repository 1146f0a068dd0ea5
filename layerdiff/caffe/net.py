"""The in-memory form of a Caffe model: what the reader produces and the engine runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from layerdiff.caffe import caffe_pb2
from layerdiff.caffe.weights import RawBlob


@dataclass
class CaffeLayer:
    """One layer after phase filtering and V1 upgrade.

    ``param`` is the full ``caffe_pb2.LayerParameter`` (V2 form), so typed parameters are read
    the protobuf way: ``layer.param.convolution_param.kernel_size``. ``blobs`` are the stored
    weights as read from the caffemodel, still in their file shape; the engine's plan checks
    them against what the layer type expects and reshapes legacy 4-D forms.
    """

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    param: caffe_pb2.LayerParameter
    blobs: list[RawBlob] = field(default_factory=list)
    #: position in the prototxt (after dropping excluded layers the list index differs)
    source_index: int = -1

    @property
    def in_place(self) -> bool:
        return any(t in self.bottoms for t in self.tops)


@dataclass
class CaffeNet:
    """A Caffe model: layers in execution order, its inputs and where it came from."""

    name: str
    layers: list[CaffeLayer]
    #: net input blob name -> shape (from Input layers, legacy input fields or ``--shape``)
    inputs: dict[str, tuple[int, ...]]
    prototxt: Path
    weights: Path | None = None
    #: facts the user should hear about the load (dropped layers, ignored weights, ...)
    notes: list[str] = field(default_factory=list)
    #: True when the prototxt used the V1 ``layers {}`` format
    upgraded_v1: bool = False
    #: caffemodel layers with no counterpart in the prototxt (ignored)
    unused_weights: list[str] = field(default_factory=list)

    def layer(self, name: str) -> CaffeLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"no layer named {name!r}")

    def __repr__(self) -> str:
        return f"<CaffeNet {self.name!r}: {len(self.layers)} layers, inputs {self.inputs}>"

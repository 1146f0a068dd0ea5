"""Small Caffe nets written from prototxt text, for the engine tests."""

from __future__ import annotations

import numpy as np

from layerdiff.caffe import load_caffe
from layerdiff.caffe.net import CaffeNet
from layerdiff.caffe.weights import RawBlob


def caffe_net(tmp_path, body: str, inputs: dict[str, tuple[int, ...]],
              blobs: dict[str, list] | None = None, dtype=None) -> CaffeNet:
    """An Input layer (first in the net) with one top per entry of ``inputs`` ({name: shape}),
    then ``body`` (prototxt text).

    ``blobs`` ({layer: [arrays]}) become the layers' stored weights, kept in their own dtype
    unless ``dtype`` is given.
    """
    tops = " ".join(f'top: "{name}"' for name in inputs)
    shapes = " ".join("shape { " + " ".join(f"dim: {d}" for d in shape) + " }"
                      for shape in inputs.values())
    path = tmp_path / "x.prototxt"
    path.write_text(f'layer {{ name: "input" type: "Input" {tops} input_param {{ {shapes} }} }}\n'
                    f"{body}\n")
    net = load_caffe(prototxt=path)
    for lay in net.layers:
        if blobs and lay.name in blobs:
            arrays = [np.asarray(a, dtype) for a in blobs[lay.name]]
            lay.blobs = [RawBlob(a.ravel(), a.shape, False) for a in arrays]
    return net

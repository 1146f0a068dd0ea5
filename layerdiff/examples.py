"""The built-in example: a small residual Caffe net with the traps real ports hit.

It has BatchNorm with a moving-average scale factor (999.98) followed by Scale, in-place ReLUs,
a ceil-rounded max pooling, a residual Eltwise, global average pooling and an InnerProduct, so
``inspect`` and ``run`` have something real to show with no downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerdiff.caffe import caffe_pb2
from layerdiff.errors import LayerdiffError

BN_FACTOR = 999.98236084

PROTOTXT = """\
name: "layerdiff_example"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 1 bias_term: false } }
layer { name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale_conv1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true } }
layer { name: "conv1_relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "res2a_branch2a" type: "Convolution" bottom: "pool1" top: "res2a_branch2a"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2a_branch2a" type: "BatchNorm" bottom: "res2a_branch2a" top: "res2a_branch2a" }
layer { name: "scale2a_branch2a" type: "Scale" bottom: "res2a_branch2a" top: "res2a_branch2a"
  scale_param { bias_term: true } }
layer { name: "res2a_branch2a_relu" type: "ReLU" bottom: "res2a_branch2a" top: "res2a_branch2a" }
layer { name: "res2a_branch2b" type: "Convolution" bottom: "res2a_branch2a" top: "res2a_branch2b"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2a_branch2b" type: "BatchNorm" bottom: "res2a_branch2b" top: "res2a_branch2b" }
layer { name: "scale2a_branch2b" type: "Scale" bottom: "res2a_branch2b" top: "res2a_branch2b"
  scale_param { bias_term: true } }
layer { name: "res2a" type: "Eltwise" bottom: "pool1" bottom: "res2a_branch2b" top: "res2a" }
layer { name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }
layer { name: "pool5" type: "Pooling" bottom: "res2a" top: "pool5"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc10" type: "InnerProduct" bottom: "pool5" top: "fc10"
  inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc10" top: "prob" }
"""


def example_weights(seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Deterministic weights for :data:`PROTOTXT`, in Caffe blob order."""
    rng = np.random.RandomState(seed)

    def conv(o: int, c: int, k: int) -> np.ndarray:
        return rng.standard_normal((o, c, k, k)) * np.sqrt(2.0 / (c * k * k))

    def bn(c: int) -> list[np.ndarray]:
        # Stored multiplied by the scale factor, as Caffe's moving averages are.
        mean = rng.normal(0, 0.1, c) * BN_FACTOR
        var = rng.uniform(0.5, 2.0, c) * BN_FACTOR
        return [mean, var, np.array([BN_FACTOR])]

    def scale(c: int) -> list[np.ndarray]:
        return [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c)]

    w = {
        "conv1": [conv(8, 3, 3)], "bn_conv1": bn(8), "scale_conv1": scale(8),
        "res2a_branch2a": [conv(8, 8, 3)], "bn2a_branch2a": bn(8), "scale2a_branch2a": scale(8),
        "res2a_branch2b": [conv(8, 8, 3)], "bn2a_branch2b": bn(8), "scale2a_branch2b": scale(8),
        "fc10": [rng.standard_normal((10, 8)) * 0.5, rng.normal(0, 0.1, 10)],
    }
    return {k: [np.asarray(a, np.float32) for a in v] for k, v in w.items()}


def caffemodel_bytes(weights: dict[str, list[np.ndarray]], types: dict[str, str]) -> bytes:
    """Serialize ``{layer: blobs}`` as a V2 caffemodel (NetParameter with layer blobs)."""
    net = caffe_pb2.NetParameter(name="layerdiff_example")
    for name, blobs in weights.items():
        lp = net.layer.add(name=name, type=types[name])
        for arr in blobs:
            b = lp.blobs.add()
            b.shape.dim.extend(arr.shape)
            b.data.extend(arr.ravel().tolist())
    return net.SerializeToString()


def write_example(out_dir: str | Path) -> list[Path]:
    """Write ``deploy.prototxt`` and ``example.caffemodel`` into a new directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LayerdiffError(f"{out}: exists and is not an empty directory; choose another")
    out.mkdir(parents=True, exist_ok=True)
    proto = out / "deploy.prototxt"
    proto.write_text(PROTOTXT)
    types = {"conv1": "Convolution", "res2a_branch2a": "Convolution",
             "res2a_branch2b": "Convolution", "fc10": "InnerProduct"}
    types.update({n: "BatchNorm" for n in ("bn_conv1", "bn2a_branch2a", "bn2a_branch2b")})
    types.update({n: "Scale" for n in ("scale_conv1", "scale2a_branch2a", "scale2a_branch2b")})
    model = out / "example.caffemodel"
    model.write_bytes(caffemodel_bytes(example_weights(), types))
    return [proto, model]

"""Torch ports whose graph is not the Caffe reference's graph, for the graph probes' tests.

- :class:`ExamplePort`: a hand-written port of the built-in example net
  (:mod:`layerdiff.examples`), torchvision style (BatchNorm2d carrying Caffe's Scale, functional
  ops in ``forward``), with switches for the mistakes of issue 12: an extra ReLU before the
  residual add, a missing ReLU, ``x * 255`` inside ``forward``, and the global average pooling
  replaced by ``x.amax((2, 3))``.
- :func:`bottleneck_net`: a tiny Caffe ResNet v1 (stride 2 on the first 1x1 of the block), whose
  :class:`~ports.GraphPort` can be given torchvision's v1.5 stride placement.
- :class:`PermutedFlatten`: an InnerProduct wrapper that permutes to NHWC before flattening.
"""

from __future__ import annotations

import numpy as np
import torch
from nets import caffe_net
from torch import nn
from torch.nn import functional as F

from layerdiff.examples import BN_FACTOR, example_weights


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _conv(w, pad: int) -> nn.Conv2d:
    w = np.asarray(w)
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=pad, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_t(w))
    return conv


def _bn(bn_blobs, scale_blobs) -> nn.BatchNorm2d:
    """Caffe BatchNorm + Scale as one BatchNorm2d (statistics divided by the stored factor)."""
    mean, var, s = (np.asarray(b, np.float64) for b in bn_blobs)
    bn = nn.BatchNorm2d(mean.size, eps=1e-5)
    with torch.no_grad():
        bn.running_mean.copy_(_t(mean / s[0]))
        bn.running_var.copy_(_t(var / s[0]))
        bn.weight.copy_(_t(scale_blobs[0]))
        bn.bias.copy_(_t(scale_blobs[1]))
    return bn


class ExamplePort(nn.Module):
    """The example net ported by hand; every switch off is a correct port."""

    def __init__(self, *, extra_relu: bool = False, missing_relu: bool = False,
                 scale_input: float | None = None, global_pool: str = "avg",
                 transpose: bool = False, mean: tuple[float, ...] | None = None) -> None:
        super().__init__()
        w = example_weights()
        assert abs(float(w["bn_conv1"][2][0]) - BN_FACTOR) < 1e-3
        self.extra_relu, self.missing_relu = extra_relu, missing_relu
        self.scale_input, self.global_pool = scale_input, global_pool
        self.transpose, self.mean = transpose, mean
        self.conv1, self.bn1 = _conv(w["conv1"][0], 1), _bn(w["bn_conv1"], w["scale_conv1"])
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2a = _conv(w["res2a_branch2a"][0], 1)
        self.bn2a = _bn(w["bn2a_branch2a"], w["scale2a_branch2a"])
        self.conv2b = _conv(w["res2a_branch2b"][0], 1)
        self.bn2b = _bn(w["bn2a_branch2b"], w["scale2a_branch2b"])
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.fc.weight.copy_(_t(w["fc10"][0]))
            self.fc.bias.copy_(_t(w["fc10"][1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input is not None:
            x = x * self.scale_input
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        x = self.bn1(self.conv1(x))
        if not self.missing_relu:
            x = F.relu(x)
        if self.transpose:
            x = x.transpose(2, 3)
        x = self.pool1(x)
        y = F.relu(self.bn2a(self.conv2a(x)))
        y = self.bn2b(self.conv2b(y))
        if self.extra_relu:
            y = F.relu(y)
        x = F.relu(x + y)
        if self.global_pool == "avg":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif self.global_pool == "amax":
            x = x.amax((2, 3))
        else:
            raise ValueError(self.global_pool)
        return F.softmax(self.fc(x), dim=1)


def _bn_blobs(rng: np.random.RandomState, c: int) -> list[np.ndarray]:
    return [rng.normal(0, 0.1, c) * BN_FACTOR, rng.uniform(0.5, 2.0, c) * BN_FACTOR,
            np.array([BN_FACTOR])]


def _conv_block(name: str, bottom: str, out: int, kernel: int, stride: int, pad: int,
                relu: bool) -> str:
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f"  convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} "
            f"pad: {pad} bias_term: false }} }}\n"
            f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" top: "{name}" }}\n'
            f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" top: "{name}"\n'
            f"  scale_param {{ bias_term: true }} }}\n")
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


#: (name, bottom, out channels, kernel, stride, pad, relu) of the tiny bottleneck net
BOTTLENECK = (
    ("conv1", "data", 8, 3, 1, 1, True),
    ("res2a_branch1", "conv1", 16, 1, 2, 0, False),
    ("res2a_branch2a", "conv1", 4, 1, 2, 0, True),
    ("res2a_branch2b", "res2a_branch2a", 4, 3, 1, 1, True),
    ("res2a_branch2c", "res2a_branch2b", 16, 1, 1, 0, False),
)


def bottleneck_net(tmp_path, seed: int = 0):
    """A Caffe ResNet v1 block (stride 2 on branch2a, the first 1x1) on a 1x3x16x16 input,
    with global average pooling and an InnerProduct; random weights, BN factor 999.98."""
    rng = np.random.RandomState(seed)
    body, blobs, cin = "", {}, {"data": 3}
    for name, bottom, out, k, stride, pad, relu in BOTTLENECK:
        body += _conv_block(name, bottom, out, k, stride, pad, relu)
        c = cin[bottom]
        blobs[name] = [rng.standard_normal((out, c, k, k)) * np.sqrt(2.0 / (c * k * k))]
        blobs[f"bn_{name}"] = _bn_blobs(rng, out)
        blobs[f"scale_{name}"] = [rng.uniform(0.5, 1.5, out), rng.normal(0, 0.2, out)]
        cin[name] = out
    body += ('layer { name: "res2a" type: "Eltwise" bottom: "res2a_branch1" '
             'bottom: "res2a_branch2c" top: "res2a" }\n'
             'layer { name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }\n'
             'layer { name: "pool5" type: "Pooling" bottom: "res2a" top: "pool5"\n'
             "  pooling_param { pool: AVE global_pooling: true } }\n"
             'layer { name: "fc5" type: "InnerProduct" bottom: "pool5" top: "fc5"\n'
             "  inner_product_param { num_output: 5 } }\n")
    blobs["fc5"] = [rng.standard_normal((5, 16)) * 0.5, rng.normal(0, 0.1, 5)]
    return caffe_net(tmp_path, body, {"data": (1, 3, 16, 16)}, blobs, np.float32)


def v15_strides(port: nn.Module) -> None:
    """torchvision's ResNet v1.5: the stride moves from the first 1x1 to the 3x3."""
    port.res2a_branch2a.stride = (1, 1)
    port.res2a_branch2b.stride = (2, 2)


class PermutedFlatten(nn.Module):
    """An InnerProduct port that permutes NCHW -> NHWC before flattening, keeping Caffe's
    (C, H, W) weight columns: the values reach the Linear in the wrong order."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x.permute(0, 2, 3, 1), 1))

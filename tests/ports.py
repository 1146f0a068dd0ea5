"""Torch ports of Caffe models, written the way a person porting them would, for the tests.

- :class:`GraphPort`: one torch module per Caffe layer, same names, run in prototxt order
  (a correct port of any net built from the common layer types).
- :class:`CaffeResNet50`: a torchvision-style ResNet-50 (``layer1.0.conv1``, shared ``relu``
  called three times per block, ``out += identity``) with Caffe's ResNet-50 choices (stride in
  the first 1x1 conv, ceil-mode max pooling without padding), loaded from the Caffe weights by
  :func:`load_resnet50_from_caffe`. Both live in :mod:`layerdiff.demo` (the demo's port).

``divide_bn=False`` reproduces the classic porting bug: BatchNorm running statistics copied
from the caffemodel without dividing by the moving-average scale factor (the third blob).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from layerdiff.caffe.net import CaffeNet


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


class ChannelAffine(nn.Module):
    """Caffe's Scale layer on axis 1: ``x * weight[c] (+ bias[c])``."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = nn.Parameter(_t(weight))
        self.bias = nn.Parameter(_t(bias)) if bias is not None else None

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.weight.view(shape)
        return y + self.bias.view(shape) if self.bias is not None else y


class EltwiseSum(nn.Module):
    def __init__(self, coeffs=()):
        super().__init__()
        self.coeffs = list(coeffs)

    def forward(self, *xs):
        if not self.coeffs:
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        return sum(c * x for c, x in zip(self.coeffs, xs, strict=True))


class FlattenLinear(nn.Module):
    """Caffe's InnerProduct on axis 1: flatten then a linear layer."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(_t(weight))
            if bias is not None:
                self.fc.bias.copy_(_t(bias))

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


def _bn(blobs, eps: float, divide: bool) -> nn.BatchNorm2d:
    mean, var, s = (np.asarray(b, np.float64) for b in blobs[:3])
    factor = 0.0 if s.reshape(-1)[0] == 0 else 1.0 / s.reshape(-1)[0]
    if not divide:
        factor = 1.0
    bn = nn.BatchNorm2d(mean.size, eps=eps, affine=False)
    bn.running_mean.copy_(_t(mean * factor))
    bn.running_var.copy_(_t(var * factor))
    return bn


def _pool(p) -> nn.Module:
    from layerdiff.caffe import caffe_pb2

    if p.global_pooling:
        return nn.AdaptiveMaxPool2d(1) if p.pool == caffe_pb2.PoolingParameter.MAX \
            else nn.AdaptiveAvgPool2d(1)
    k = (p.kernel_h or p.kernel_size, p.kernel_w or p.kernel_size)
    s = (p.stride_h or p.stride or 1, p.stride_w or p.stride or 1)
    pad = (p.pad_h or p.pad, p.pad_w or p.pad)
    if p.pool == caffe_pb2.PoolingParameter.MAX:
        return nn.MaxPool2d(k, s, pad, ceil_mode=True)
    return nn.AvgPool2d(k, s, pad, ceil_mode=True, count_include_pad=True)


def _conv(lay, blobs) -> nn.Conv2d:
    p = lay.param.convolution_param
    w = np.asarray(blobs[0])
    pad = (p.pad_h or (p.pad[0] if p.pad else 0), p.pad_w or (p.pad[-1] if p.pad else 0))
    stride = (p.stride_h or (p.stride[0] if p.stride else 1),
              p.stride_w or (p.stride[-1] if p.stride else 1))
    dil = (p.dilation[0] if p.dilation else 1)
    conv = nn.Conv2d(w.shape[1] * p.group, w.shape[0], w.shape[2:], stride, pad, dil, p.group,
                     bias=len(blobs) > 1)
    with torch.no_grad():
        conv.weight.copy_(_t(w))
        if len(blobs) > 1:
            conv.bias.copy_(_t(blobs[1]))
    return conv


class GraphPort(nn.Module):
    """A torch port that mirrors the Caffe net layer by layer, with the Caffe layer names."""

    def __init__(self, net: CaffeNet, divide_bn: bool = True):
        super().__init__()
        from layerdiff.engine import make_plan

        plan = make_plan(net)
        self.steps: list[tuple[str, list[str], list[str]]] = []
        self.input_names = list(net.inputs)
        for p in plan.layers:
            lay, blobs = p.layer, p.blobs or []
            t = lay.type
            if t == "Input":
                continue
            if t == "Convolution":
                mod = _conv(lay, blobs)
            elif t == "BatchNorm":
                mod = _bn(blobs, lay.param.batch_norm_param.eps, divide_bn)
            elif t == "Scale":
                mod = ChannelAffine(blobs[0], blobs[1] if len(blobs) > 1 else None)
            elif t == "ReLU":
                slope = lay.param.relu_param.negative_slope
                mod = nn.LeakyReLU(slope) if slope else nn.ReLU()
            elif t == "Pooling":
                mod = _pool(lay.param.pooling_param)
            elif t == "Eltwise":
                mod = EltwiseSum(lay.param.eltwise_param.coeff)
            elif t == "InnerProduct":
                mod = FlattenLinear(blobs[0], blobs[1] if len(blobs) > 1 else None)
            elif t == "Softmax":
                mod = nn.Softmax(dim=1)
            elif t == "Dropout":
                mod = nn.Dropout()
            else:
                raise NotImplementedError(f"GraphPort: no torch module for {t}")
            name = lay.name.replace("/", "_").replace(".", "_")
            self.add_module(name, mod)
            self.steps.append((name, lay.bottoms, lay.tops))

    def forward(self, *inputs):
        blobs = dict(zip(self.input_names, inputs, strict=True))
        for name, bottoms, tops in self.steps:
            blobs[tops[0]] = getattr(self, name)(*[blobs[b] for b in bottoms])
        return blobs[self.steps[-1][2][0]]


# -- torchvision-style ResNet-50 with Caffe's choices: the demo's port (one copy in the package)
from layerdiff.demo.resnet50 import load_resnet50_from_caffe, resnet50_name_map  # noqa: E402
from layerdiff.demo.torch_resnet50 import Bottleneck, CaffeResNet50  # noqa: E402

__all__ = ["Bottleneck", "CaffeResNet50", "ChannelAffine", "EltwiseSum", "FlattenLinear",
           "GraphPort", "load_resnet50_from_caffe", "resnet50_name_map"]


def planted_port(net: CaffeNet, plant=None) -> GraphPort:
    """A correct GraphPort of ``net`` with ``plant(port)`` applied (a bug, under no_grad)."""
    port = GraphPort(net).eval()
    if plant is not None:
        with torch.no_grad():
            plant(port)
    return port

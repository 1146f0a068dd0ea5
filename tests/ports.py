"""Torch ports of Caffe models, written the way a person porting them would, for the tests.

- :class:`GraphPort`: one torch module per Caffe layer, same names, run in prototxt order
  (a correct port of any net built from the common layer types).
- :class:`CaffeResNet50`: a torchvision-style ResNet-50 (``layer1.0.conv1``, shared ``relu``
  called three times per block, ``out += identity``) with Caffe's ResNet-50 choices (stride in
  the first 1x1 conv, ceil-mode max pooling without padding), loaded from the Caffe weights by
  :func:`load_resnet50_from_caffe`.

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


# -- torchvision-style ResNet-50 with Caffe's choices ---------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        # Caffe's ResNet-50 strides in the first 1x1 conv (torchvision v1.5 in the 3x3).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class CaffeResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=True)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 0, ceil_mode=True)  # Caffe: no pad, ceil rounding
        self.inplanes = 64
        self.layer1 = self._layer(64, 3, 1)
        self.layer2 = self._layer(128, 4, 2)
        self.layer3 = self._layer(256, 6, 2)
        self.layer4 = self._layer(512, 3, 2)
        self.avgpool = nn.AvgPool2d(7, 1)
        self.fc = nn.Linear(2048, num_classes)

    def _layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                             nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50_name_map() -> dict[str, str]:
    """Caffe ResNet-50 layer name -> torchvision-style module path (conv/bn; Scale -> bn)."""
    m = {"conv1": "conv1", "bn_conv1": "bn1", "scale_conv1": "bn1", "fc1000": "fc"}
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            letter = "abcdef"[b]
            base = f"layer{stage - 1}.{b}"
            for branch, idx in (("2a", 1), ("2b", 2), ("2c", 3)):
                m[f"res{stage}{letter}_branch{branch}"] = f"{base}.conv{idx}"
                m[f"bn{stage}{letter}_branch{branch}"] = f"{base}.bn{idx}"
                m[f"scale{stage}{letter}_branch{branch}"] = f"{base}.bn{idx}"
            if b == 0:
                m[f"res{stage}a_branch1"] = f"{base}.downsample.0"
                m[f"bn{stage}a_branch1"] = f"{base}.downsample.1"
                m[f"scale{stage}a_branch1"] = f"{base}.downsample.1"
    return m


def load_resnet50_from_caffe(net: CaffeNet, divide_bn: bool = True) -> CaffeResNet50:
    from layerdiff.engine import make_plan

    model = CaffeResNet50().eval()
    mods = dict(model.named_modules())
    plan = {p.layer.name: p for p in make_plan(net).layers}
    with torch.no_grad():
        for caffe_name, path in resnet50_name_map().items():
            p, mod = plan[caffe_name], mods[path]
            blobs = p.blobs
            if p.layer.type in ("Convolution", "InnerProduct"):
                mod.weight.copy_(_t(blobs[0]))
                if len(blobs) > 1:
                    mod.bias.copy_(_t(blobs[1]))
            elif p.layer.type == "BatchNorm":
                s = float(np.asarray(blobs[2]).reshape(-1)[0])
                f = (0.0 if s == 0 else 1.0 / s) if divide_bn else 1.0
                mod.running_mean.copy_(_t(np.asarray(blobs[0], np.float64) * f))
                mod.running_var.copy_(_t(np.asarray(blobs[1], np.float64) * f))
                mod.eps = p.layer.param.batch_norm_param.eps
            elif p.layer.type == "Scale":
                mod.weight.copy_(_t(blobs[0]))
                mod.bias.copy_(_t(blobs[1]))
    return model

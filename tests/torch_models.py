"""Torch models for the adapter tests and benchmark (torchvision is not a dependency).

``resnet50`` copies torchvision's ResNet-50 structure exactly where the adapter cares: every
Bottleneck reuses one ``self.relu = nn.ReLU(inplace=True)`` three times, adds its shortcut with
``out += identity``, and the head calls ``torch.flatten(x, 1)`` before ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so a skipped or misapplied BN shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def resnet50(num_classes: int = 1000, seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return randomize_bn(ResNet((3, 4, 6, 3), num_classes), seed).eval()


def reference_resnet(model: ResNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every intermediate of ``model`` computed with plain functional calls, by record name.

    Independent of the adapter: it reads only the parameters, so a capture that records the
    wrong tensor (or a value an in-place op overwrote) disagrees with it.
    """
    out: dict[str, torch.Tensor] = {}

    def conv(name: str, m: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        out[name] = F.conv2d(t, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return out[name]

    def bn(name: str, m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        out[name] = F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias,
                                 False, 0.0, m.eps)
        return out[name]

    def relu(name: str, t: torch.Tensor) -> torch.Tensor:
        out[name] = F.relu(t)
        return out[name]

    with torch.no_grad():
        t = conv("conv1", model.conv1, x)
        t = bn("bn1", model.bn1, t)
        t = relu("relu", t)
        t = out["maxpool"] = F.max_pool2d(t, 3, 2, 1)
        for li in range(1, 5):
            for bi, blk in enumerate(getattr(model, f"layer{li}")):
                p = f"layer{li}.{bi}."
                identity = t
                o = conv(p + "conv1", blk.conv1, t)
                o = bn(p + "bn1", blk.bn1, o)
                o = relu(p + "relu", o)
                o = conv(p + "conv2", blk.conv2, o)
                o = bn(p + "bn2", blk.bn2, o)
                o = relu(p + "relu#1", o)
                o = conv(p + "conv3", blk.conv3, o)
                o = bn(p + "bn3", blk.bn3, o)
                if blk.downsample is not None:
                    identity = conv(p + "downsample.0", blk.downsample[0], t)
                    identity = bn(p + "downsample.1", blk.downsample[1], identity)
                o = out[p + "add"] = o + identity
                t = relu(p + "relu#2", o)
        t = out["avgpool"] = F.adaptive_avg_pool2d(t, 1)
        t = out["flatten"] = t.reshape(t.shape[0], -1)
        out["fc"] = F.linear(t, model.fc.weight, model.fc.bias)
    return out


class SmallNet(nn.Module):
    """A small traceable net with functional ops at container level (cat, view, softmax)."""

    INPUT_SHAPE = (2, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 8 * 8, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        z = F.relu(y * 2.0)
        h = torch.cat([y, z], dim=1)
        h = h.view(h.shape[0], -1)
        h = self.drop(h)
        return F.softmax(self.fc(h), dim=1)


class DataDependent(nn.Module):
    """FX cannot trace this: the branch depends on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = self.relu(x)
        else:
            x = -x
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)

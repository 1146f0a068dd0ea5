"""Ports for the verdict tests: a correct NHWC LeNet, ops with no Caffe twin, cut-off tails."""

from __future__ import annotations

from pathlib import Path

import torch
from ports import GraphPort, planted_port
from torch import nn

from layerdiff.caffe.net import CaffeNet
from layerdiff.examples import PROTOTXT, write_example


class NHWCLinear(nn.Module):
    """Permutes to channels-last before flattening; its weights are stored in (H, W, C) order to
    match, so the port is right although ``ip1`` alone, fed Caffe's NCHW blob, is not."""

    def __init__(self, fc: nn.Linear, chw: tuple[int, int, int]):
        super().__init__()
        c, h, w = chw
        self.fc = fc
        with torch.no_grad():
            o = fc.weight.shape[0]
            fc.weight.copy_(fc.weight.view(o, c, h, w).permute(0, 2, 3, 1).reshape(o, -1))

    def forward(self, x):
        return self.fc(torch.flatten(x.permute(0, 2, 3, 1), 1))


def nhwc_lenet(lenet: CaffeNet) -> GraphPort:
    port = planted_port(lenet)
    port.ip1 = NHWCLinear(port.ip1.fc, (50, 4, 4))
    return port


class InsertedPort(GraphPort):
    """A correct port with one extra module run on a blob before the step that reads it."""

    def __init__(self, net: CaffeNet, before: str, blob: str, extra: nn.Module, name: str):
        super().__init__(net)
        self.add_module(name, extra)
        at = next(i for i, (n, _, _) in enumerate(self.steps) if n == before)
        self.steps.insert(at, (name, [blob], [blob]))


def extra_relu_before_add(net: CaffeNet) -> GraphPort:
    """The built-in example with a ReLU on the residual branch before the add ``res2a``."""
    return InsertedPort(net, "res2a", "res2a_branch2b", nn.ReLU(), "branch_relu").eval()


class Scaled255(GraphPort):
    """A correct port whose forward multiplies its input by 255 (preprocessing left inside)."""

    def forward(self, *inputs):
        return super().forward(*(x * 255 for x in inputs))


def write_example_without(folder: Path, layers: set[str]) -> Path:
    """The built-in example with ``layers`` taken out of its prototxt (weights unchanged)."""
    write_example(folder)
    kept = [line for line in PROTOTXT.split("layer {")
            if not any(f'name: "{n}"' in line for n in layers)]
    (folder / next(p.name for p in folder.glob("*.prototxt"))).write_text("layer {".join(kept))
    return folder

"""Port folders with planted bugs for the ``--fix-out`` tests: each is a ``model.py`` that
builds a GraphPort of a corpus net (tests/ports.py) and plants one or two bugs, the way the
probe tests plant them in memory. ``PLANTS`` names every kind: ``(net, plant)``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from golden import CORPUS  # noqa: E402
from ports import GraphPort  # noqa: E402

NETS = {"resnet20": ("cifar10_resnet20_junyuseu", (1, 3, 32, 32)), "lenet": ("lenet_mnist", None)}
S = 999.98236  # cifar10_resnet20_junyuseu's BatchNorm blob 2


def load_net(name: str):
    import layerdiff

    folder, shape = NETS[name]
    return layerdiff.load_caffe(CORPUS / folder, shape=shape)


def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


def _weight(name: str, fn: Callable) -> Callable:
    def plant(p):
        w = p.get_submodule(name).weight
        w.copy_(fn(w).clone())
    return plant


def _undivided(p):
    for m in p.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean *= S
            m.running_var *= S


def _divided_twice(p):
    p.BatchNorm3.running_mean /= S
    p.BatchNorm3.running_var /= S


def _eps(p):
    p.BatchNorm2.eps = 1e-3


def _two_in_one_bn(p):
    p.BatchNorm14.eps = 1e-3
    p.BatchNorm14.running_mean *= S
    p.BatchNorm14.running_var *= S


def _scale_missing(p):
    p.Scale7.weight.fill_(1)
    p.Scale7.bias.zero_()


def _drop_bias(path: str) -> Callable:
    def plant(p):
        p.get_submodule(path).bias = None
    return plant


def _ceil(p):
    p.Pooling1.ceil_mode = False


def _flatten_hwc(p):
    w = p.ip1.fc.weight
    w.copy_(w.view(500, 50, 4, 4).permute(0, 2, 3, 1).reshape(500, -1).clone())


def _train(p):
    p.train()


def _both(*plants: Callable) -> Callable:
    def plant(p):
        for f in plants:
            f(p)
    return plant


_flip = _weight("Convolution7", lambda w: w.flip(2, 3))
_bgr = _weight("Convolution1", lambda w: w.flip(1))

#: kind -> (net, plant): every planted-bug kind of the probe and audit tests
PLANTS: dict[str, tuple[str, Callable]] = {
    "bn_scale_factor (undivided, every BN)": ("resnet20", _undivided),
    "bn_scale_factor (divided twice)": ("resnet20", _divided_twice),
    "bn_stats_swapped": ("resnet20", lambda p: _swap(p.BatchNorm5.running_mean,
                                                     p.BatchNorm5.running_var)),
    "bn_eps": ("resnet20", _eps),
    "bn_affine_swapped": ("resnet20", lambda p: _swap(p.Scale19.weight, p.Scale19.bias)),
    "bn_affine_missing": ("resnet20", _scale_missing),
    "bn_params (stats + eps, one layer)": ("resnet20", _two_in_one_bn),
    "conv_kernel_flipped": ("resnet20", _flip),
    "conv_kernel_hw_transposed": ("resnet20", _weight("Convolution9",
                                                      lambda w: w.transpose(2, 3))),
    "conv_weight_transposed": ("resnet20", _weight("Convolution12",
                                                   lambda w: w.transpose(0, 1))),
    "bgr_rgb_first_conv": ("resnet20", _bgr),
    "missing_bias (conv)": ("lenet", _drop_bias("conv2")),
    "missing_bias (linear)": ("resnet20", _drop_bias("InnerProduct1.fc")),
    "flatten_order": ("lenet", _flatten_hwc),
    "pool_ceil_mode": ("lenet", _ceil),
    "model_train_mode": ("resnet20", _train),
    "two bugs: conv flip + missing bias": ("resnet20", _both(
        _weight("Convolution3", lambda w: w.flip(2, 3)), _drop_bias("InnerProduct1.fc"))),
    "two bugs: BGR conv1 + Scale swap": ("resnet20", _both(
        _bgr, lambda p: _swap(p.Scale15.weight, p.Scale15.bias))),
    "two bugs: eps + flatten order": ("lenet", _both(
        _flatten_hwc, lambda p: p.conv1.__setattr__("padding", (0, 0)))),
}


def build_planted(kind: str) -> torch.nn.Module:
    """The port of PLANTS[kind] (what the folder's model.py returns)."""
    net_name, plant = PLANTS[kind]
    port = GraphPort(load_net(net_name)).eval()
    with torch.no_grad():
        plant(port)
    return port


def write_port(folder: Path, kind: str) -> Path:
    """A candidate folder holding only model.py: build() returns the planted port."""
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom fix_ports import build_planted\n"
        f"INPUT_SHAPE = {NETS[PLANTS[kind][0]][1]!r}\n\n\ndef build():\n"
        f"    return build_planted({kind!r})\n")
    return folder

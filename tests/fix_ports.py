"""Port folders with planted bugs for the ``--fix-out`` tests: each is a ``model.py`` that
builds a torch port of a corpus/golden net (GraphPort of tests/ports.py, LayerPort of
tests/test_probes_layers.py) with one or two bugs planted the way the probe tests plant them
in memory. ``PLANTS``: every kind with a safe automatic fix; ``MANUAL``: kinds without one."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import dataclasses  # noqa: E402

from golden import CORPUS, GOLDEN, load_golden  # noqa: E402
from ports import GraphPort  # noqa: E402
from torch import nn  # noqa: E402

#: corpus nets (folder, input shape) and golden nets (batch 1 keeps every run fast)
NETS = {"resnet20": ("cifar10_resnet20_junyuseu", (1, 3, 32, 32)), "lenet": ("lenet_mnist", None)}
GOLDEN_NETS = {"squeezenet": ("squeezenet_v1.1", None), "cifar10_full": ("cifar10_full", None),
               "alexnet_head": ("bvlc_alexnet", "pool2"),
               "mobilenet": ("cifar10_mobilenet_lijianfei", None)}
S = 999.98236  # cifar10_resnet20_junyuseu's BatchNorm blob 2


def load_net(name: str):
    """A net by name; ``"NAME (LAYER use_global_stats: false)"``: NAME with that BatchNorm
    normalising with batch statistics (a prototxt the port did not follow)."""
    import copy

    import layerdiff

    if " use_global_stats: false)" in name:
        base, layer = name.split(" (", 1)
        net = copy.deepcopy(load_net(base))
        net.layer(layer.split()[0]).param.batch_norm_param.use_global_stats = False
        return net

    if name in GOLDEN_NETS:
        folder, last = GOLDEN_NETS[name]
        net = load_golden(GOLDEN / "nets" / folder).net
        if last is not None:  # AlexNet's conv part: both LRNs, 6% of the weights
            names = [lay.name for lay in net.layers]
            net = dataclasses.replace(net, layers=net.layers[:names.index(last) + 1])
        return dataclasses.replace(net, inputs={k: (1,) + tuple(v[1:])
                                                for k, v in net.inputs.items()})
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


def _eps_everywhere(p):
    for m in p.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.1


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


def _stride_moved(p):
    """Convolution9 (3x3, stride 2 in Caffe) at stride 1, its next conv at stride 2 instead."""
    p.Convolution9.stride, p.Convolution10.stride = (1, 1), (2, 2)


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


def _graph(plant: Callable) -> Callable:
    """A GraphPort of the net with ``plant`` applied under no_grad."""
    def make(net):
        port = GraphPort(net).eval()
        with torch.no_grad():
            plant(port)
        return port
    return make


def _layers(**kw) -> Callable:
    """test_probes_layers' LayerPort (pooling, LRN, concat, softmax choices) with changes."""
    def make(net):
        from test_probes_layers import LayerPort

        args = {k: v() if k == "replace" else v for k, v in kw.items()}
        return LayerPort(net, **args).eval()
    return make


def _within_channel_lrn_border() -> dict:
    from test_probes_layers import WithinChannelLRN

    return {"norm2": WithinChannelLRN(3, 5e-5, 0.75, count_include_pad=False)}


def _flip_conv1(net, **kw):
    port = _layers(**kw)(net)
    with torch.no_grad():
        port.conv1.weight.copy_(port.conv1.weight.flip(1).clone())
    return port


def _cat_view() -> dict:
    from test_probes_layers import CatView

    return {"fire5/concat": CatView(2)}


def _dense_depthwise(net):
    """Convolution4 (Caffe group = 64) as a dense conv, its [64, 1, 3, 3] kernel broadcast by
    copy_ over the 64 input channels (test_probes_conv's planted bug)."""
    port = GraphPort(net).eval()
    dw = port.Convolution4
    dense = nn.Conv2d(64, 64, 3, dw.stride, dw.padding)
    with torch.no_grad():
        dense.weight.copy_(dw.weight)
        dense.bias.copy_(dw.bias)
    port.Convolution4 = dense
    return port


def _conv1_for(net, scale: float, flip: bool = False):
    """conv1 converted for another input convention (RGB order, 0..1 pixels)."""
    port = _layers()(net)
    with torch.no_grad():
        w = port.conv1.weight
        port.conv1.weight.copy_((w.flip(1) if flip else w) * scale)
    return port


_flip = _weight("Convolution7", lambda w: w.flip(2, 3))
_bgr = _weight("Convolution1", lambda w: w.flip(1))

#: kind -> (net, make(net) -> the buggy port): the planted-bug kinds of the probe and audit
#: tests (tests/test_probes_*.py, tests/test_audit.py), single bugs and two bugs at two depths
PLANTS: dict[str, tuple[str, Callable]] = {
    "bn_scale_factor (undivided, every BN)": ("resnet20", _graph(_undivided)),
    "bn_scale_factor (divided twice)": ("resnet20", _graph(_divided_twice)),
    "bn_stats_swapped": ("resnet20", _graph(lambda p: _swap(p.BatchNorm5.running_mean,
                                                            p.BatchNorm5.running_var))),
    "bn_eps": ("resnet20", _graph(_eps)),
    "bn_eps (every BN: fixed in rounds)": ("resnet20", _graph(_eps_everywhere)),
    "bn_affine_swapped": ("resnet20", _graph(lambda p: _swap(p.Scale19.weight,
                                                             p.Scale19.bias))),
    "bn_affine_missing": ("resnet20", _graph(_scale_missing)),
    "bn_params (stats + eps, one layer)": ("resnet20", _graph(_two_in_one_bn)),
    "conv_kernel_flipped": ("resnet20", _graph(_flip)),
    "conv_kernel_hw_transposed": ("resnet20", _graph(_weight("Convolution9",
                                                             lambda w: w.transpose(2, 3)))),
    "conv_weight_transposed": ("resnet20", _graph(_weight("Convolution12",
                                                          lambda w: w.transpose(0, 1)))),
    "bgr_rgb_first_conv": ("resnet20", _graph(_bgr)),
    "bgr_rgb_first_conv (squeezenet)": ("squeezenet", _flip_conv1),
    "missing_bias (conv)": ("lenet", _graph(_drop_bias("conv2"))),
    "missing_bias (linear)": ("resnet20", _graph(_drop_bias("InnerProduct1.fc"))),
    "flatten_order": ("lenet", _graph(_flatten_hwc)),
    "pool_ceil_mode": ("squeezenet", _layers(replace=lambda: {"pool3": nn.MaxPool2d(3, 2)})),
    "lrn_alpha_scaling": ("alexnet_head", _layers(replace=lambda: {
        "norm1": nn.LocalResponseNorm(5, 1e-4 / 5, 0.75)})),
    "lrn_border_divisor": ("cifar10_full", _layers(replace=_within_channel_lrn_border)),
    "model_train_mode": ("resnet20", _graph(lambda p: p.train())),
    "stride_placement (stride on the next 3x3)": ("resnet20", _graph(_stride_moved)),
    "conv_groups (depthwise written dense)": ("mobilenet", _dense_depthwise),
    "bn_use_global_stats_false": ("resnet20 (BatchNorm7 use_global_stats: false)",
                                  _graph(lambda p: None)),
    "softmax_axis": ("lenet", _layers(replace=lambda: {"prob": nn.Softmax(dim=0)})),
    "concat_axis": ("squeezenet", _layers(replace=_cat_view)),
    "input_scale (conv1 for 0..1 pixels)": ("squeezenet", lambda net: _conv1_for(net, 1 / 255)),
    "input_channel_order + scale (conv1 for RGB 0..1)": (
        "squeezenet", lambda net: _conv1_for(net, 1 / 255, flip=True)),
    "two bugs: conv flip + missing bias": ("resnet20", _graph(_both(
        _weight("Convolution3", lambda w: w.flip(2, 3)), _drop_bias("InnerProduct1.fc")))),
    "two bugs: BGR conv1 + Scale swap": ("resnet20", _graph(_both(
        _bgr, lambda p: _swap(p.Scale15.weight, p.Scale15.bias)))),
    "two bugs: missing bias + flatten order": ("lenet", _graph(_both(
        _drop_bias("conv1"), _flatten_hwc))),
}

#: bugs no patch can fix safely (an op inside forward): listed as manual, exit 1
MANUAL: dict[str, tuple[str, Callable]] = {
    "inline_preprocessing": ("cifar10_full", _layers(before={"conv1": lambda x: (x.flip(1),)})),
    "pool_padding_vs_ceil (functional)": ("squeezenet", _layers(calls={
        "pool3": lambda x: torch.nn.functional.max_pool2d(x, 3, 2, 1)})),
    "flipped conv1 + functional pool3": ("squeezenet", lambda net: _flip_conv1(net, calls={
        "pool3": lambda x: torch.nn.functional.max_pool2d(x, 3, 2, 1)})),
}


def build_planted(kind: str) -> torch.nn.Module:
    """The port of PLANTS[kind] or MANUAL[kind] (what the folder's model.py returns)."""
    net_name, make = {**PLANTS, **MANUAL}[kind]
    return make(load_net(net_name))


def write_port(folder: Path, kind: str) -> Path:
    """A candidate folder holding only model.py: build() returns the planted port."""
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom fix_ports import build_planted\n"
        "\n\ndef build():\n"
        f"    return build_planted({kind!r})\n")
    return folder

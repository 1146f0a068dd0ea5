"""Planted bugs for the layer probes: pooling, LRN, layout (axes, flatten order), preprocessing.

Each test plants one porting mistake in a torch port of a real Caffe net (golden/corpus nets:
squeezenet_v1.1, bvlc_alexnet, cifar10_full, cifar10_quick_v1, lenet_mnist), compares, and checks
that the planted cause is the top finding at the right pair with its fix. Ports of clean nets
(float32, float64, float32 against a float64 reference) must raise no finding.

Inputs are ``uniform(-1, 1)`` arrays with batch 1 (the deploy prototxts ask for batch 10; one
image shows every bug and keeps the file fast).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from golden import CORPUS, GOLDEN, load_golden, require_shared
from ports import ChannelAffine, EltwiseSum, FlattenLinear, _bn, _conv, _pool
from torch import nn

import layerdiff
from layerdiff.diagnose import layer_cases
from layerdiff.diagnose.probes import layout, lrn, pooling, preprocessing  # noqa: F401 - register
from layerdiff.engine import make_plan
from layerdiff.sources import ModelOptions

OURS = {"pooling_geometry", "lrn_parameters", "softmax_axis", "concat_axis", "flatten_order",
        "concat_order", "flatten_order_input", "input_convention", "inline_preprocessing"}


# -- a port builder: GraphPort's layer choices plus LRN, Concat and Softmax axis ---------------
class WithinChannelLRN(nn.Module):
    """Caffe's WITHIN_CHANNEL LRN written by hand (torch has none)."""

    def __init__(self, size: int, alpha: float, beta: float, count_include_pad: bool = True):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta
        self.count_include_pad = count_include_pad

    def forward(self, x):
        avg = F.avg_pool2d(x * x, self.size, 1, self.size // 2,
                           count_include_pad=self.count_include_pad)
        return x / (1 + self.alpha * avg).pow(self.beta)


class SumLRN(nn.Module):
    """A within-channel LRN that forgets Caffe's 1/n^2: alpha times the window *sum*."""

    def __init__(self, size: int, alpha: float, beta: float):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x):
        total = F.avg_pool2d(x * x, self.size, 1, self.size // 2) * self.size ** 2
        return x / (1 + self.alpha * total).pow(self.beta)


class Concat(nn.Module):
    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, *xs):
        return torch.cat(xs, self.dim)


class CatView(Concat):
    """Joins along ``dim`` and views the result as Caffe's shape (a layout bug that runs)."""

    def forward(self, *xs):
        n, c, h, w = xs[0].shape
        return torch.cat(xs, self.dim).reshape(n, c * len(xs), h, w)


class HWCFlattenLinear(FlattenLinear):
    """Flattens channels-last (a port written for an NHWC framework)."""

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1).flatten(1))


def layer_module(lay, blobs) -> nn.Module:
    t, p = lay.type, lay.param
    if t == "Convolution":
        return _conv(lay, blobs)
    if t == "BatchNorm":
        return _bn(blobs, p.batch_norm_param.eps, True)
    if t == "Scale":
        return ChannelAffine(blobs[0], blobs[1] if len(blobs) > 1 else None)
    if t == "ReLU":
        return nn.LeakyReLU(p.relu_param.negative_slope) if p.relu_param.negative_slope \
            else nn.ReLU()
    if t == "Pooling":
        return _pool(p.pooling_param)
    if t == "Eltwise":
        return EltwiseSum(p.eltwise_param.coeff)
    if t == "InnerProduct":
        return FlattenLinear(blobs[0], blobs[1] if len(blobs) > 1 else None)
    if t == "Softmax":
        return nn.Softmax(dim=p.softmax_param.axis)
    if t == "Dropout":
        return nn.Dropout()
    if t == "Concat":
        return Concat(p.concat_param.axis)
    if t == "LRN":
        lp = p.lrn_param
        if lp.norm_region == lp.WITHIN_CHANNEL:
            return WithinChannelLRN(lp.local_size, lp.alpha, lp.beta)
        return nn.LocalResponseNorm(lp.local_size, lp.alpha, lp.beta, lp.k)
    raise NotImplementedError(t)


class LayerPort(nn.Module):
    """One torch module per Caffe layer, run in prototxt order, with planted changes.

    ``replace``: Caffe layer name -> module used instead; ``calls``: name -> function called in
    this container's forward instead of the module (a functional op, as ports often write);
    ``before``: name -> function transforming that layer's inputs first (inline ops)."""

    def __init__(self, net, replace=None, calls=None, before=None):
        super().__init__()
        self.calls, self.before = calls or {}, before or {}
        self.steps = []
        self.input_names = list(net.inputs)
        for p in make_plan(net).layers:
            lay = p.layer
            if lay.type == "Input":
                continue
            mod = (replace or {}).get(lay.name) or layer_module(lay, p.blobs or [])
            name = lay.name.replace("/", "_").replace(".", "_")
            self.add_module(name, mod)
            self.steps.append((lay.name, name, lay.bottoms, lay.tops))

    def forward(self, *inputs):
        blobs = dict(zip(self.input_names, inputs, strict=True))
        for caffe_name, name, bottoms, tops in self.steps:
            xs = [blobs[b] for b in bottoms]
            if caffe_name in self.before:
                xs = self.before[caffe_name](*xs)
            fn = self.calls.get(caffe_name) or getattr(self, name)
            blobs[tops[0]] = fn(*xs)
        return blobs[tops[0]]


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nets():
    require_shared()
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_golden(GOLDEN / "nets" / name).net
        return cache[name]

    return get


def feeds(net, seed: int = 3, value: float | None = None) -> dict[str, np.ndarray]:
    name, shape = next(iter(net.inputs.items()))
    shape = (1,) + tuple(shape[1:])
    if value is not None:
        return {name: np.full(shape, value)}
    return {name: np.random.default_rng(seed).uniform(-1, 1, shape)}


def diagnose(net, port, x=None, **kw):
    report = layerdiff.compare(net, port.eval(), x if x is not None else feeds(net), **kw)
    assert not report, "the planted bug must make the comparison fail"
    assert report.findings, f"no finding; failures: {[r.pair.ref_name for r in report.failures]}"
    return report


def top(report, kind: str | set[str], ref_layer: str):
    """The top finding names ``kind`` (or one of the kinds another probe gives the same
    cause, e.g. the weight audit's) at the pair of Caffe layer ``ref_layer``."""
    f = report.findings[0]
    kinds = {kind} if isinstance(kind, str) else kind
    assert f.kind in kinds, [(g.kind, g.layer, g.explained) for g in report.findings]
    assert f.layer.split(" <-> ")[0] == ref_layer, f.layer
    assert f.explained is not None and f.explained >= 0.9
    assert f.error_after is not None and f.error_after < 1e-3
    assert f.evidence and f.fix and f.cause
    return f


def probe_at(net, port, ref_layer: str, fn, x=None):
    """One probe run alone at one pair (no weight audit first): its own finding(s)."""
    report = layerdiff.compare(net, port.eval(), x if x is not None else feeds(net),
                               diagnose=False)
    case = next(c for c in layer_cases(report) if c.pair.ref[0].name == ref_layer)
    assert case.result.local_passed is False
    return fn(case)


def head(net, last: str):
    """The net up to layer ``last``: AlexNet's convolutional part holds both LRNs, its fc
    layers 94% of the weights (and of the run time)."""
    names = [lay.name for lay in net.layers]
    return dataclasses.replace(net, layers=net.layers[:names.index(last) + 1])


def blobs_of(net, layer: str):
    return {p.layer.name: p for p in make_plan(net).layers}[layer].blobs


# -- pooling -----------------------------------------------------------------------------------
def test_floor_pooling_is_named_with_the_caffe_size(nets):
    net = nets("squeezenet_v1.1")
    report = diagnose(net, LayerPort(net, replace={"pool3": nn.MaxPool2d(3, 2)}))
    f = top(report, "pool_ceil_mode", "pool3")
    assert f.error_before is None  # the pair failed with a shape mismatch
    assert "outputs 28x28" in f.evidence and "27x27" in f.evidence
    assert "ceil_mode=True" in f.fix and f.fix.startswith("pool3 = nn.MaxPool2d(3, stride=2")


def test_torchvision_padding_functional_pool(nets):
    # F.max_pool2d(x, 3, 2, padding=1): the same 28x28 as Caffe's ceil, other windows.
    net = nets("squeezenet_v1.1")
    port = LayerPort(net, calls={"pool3": lambda x: F.max_pool2d(x, 3, 2, 1)})
    f = top(diagnose(net, port), "pool_padding_vs_ceil", "pool3")
    assert f.data["changed"] == ["ceil_mode", "padding"]
    assert "padding=0, ceil_mode=True" in f.fix


def test_ave_pool_divisor(nets, tmp_path):
    # No corpus net pads an AVE pooling; cifar10_quick's pool2 with pad 1 keeps every shape
    # (16 -> 9 -> 4), so the real weights still fit.
    src = CORPUS / "cifar10_quick_v1"
    text = (src / "deploy.prototxt").read_text()
    head, sep, tail = text.partition('name: "pool2"')
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(head + sep + tail.replace("kernel_size: 3", "kernel_size: 3\n    pad: 1", 1))
    net = layerdiff.load_caffe(prototxt=proto, weights=src / "cifar10_quick_iter_5000.caffemodel")
    bad = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    f = top(diagnose(net, LayerPort(net, replace={"pool2": bad})), "pool_ave_divisor", "pool2")
    assert "count_include_pad=True" in f.fix
    clean = layerdiff.compare(net, LayerPort(net).eval(), feeds(net))
    assert clean and not clean.findings


# -- LRN ---------------------------------------------------------------------------------------
def test_lrn_alpha_divided_twice(nets):
    net = head(nets("bvlc_alexnet"), "pool2")
    port = LayerPort(net, replace={"norm1": nn.LocalResponseNorm(5, 1e-4 / 5, 0.75)})
    f = top(diagnose(net, port), "lrn_alpha_scaling", "norm1")
    assert f.fix == "norm1.alpha = 0.0001"
    assert "0.2 x Caffe's" in f.evidence  # the fitted coefficient: alpha / 25


def test_lrn_k_and_functional_alpha(nets):
    net = head(nets("bvlc_alexnet"), "pool2")
    port = LayerPort(net, replace={"norm2": nn.LocalResponseNorm(5, 1e-4, 0.75, k=2.0)})
    f = top(diagnose(net, port), "lrn_k", "norm2")
    assert f.fix == "norm2.k = 1"
    # alpha not divided at all, in a functional call (torch divides by size: pass alpha * 5)
    port = LayerPort(net, calls={"norm1": lambda x: F.local_response_norm(x, 5, 5e-4, 0.75)})
    f = top(diagnose(net, port), "lrn_alpha_scaling", "norm1")
    assert "does not divide alpha" in f.cause and "alpha=0.0001" in f.fix


def test_within_channel_lrn_sum_and_border(nets):
    net = nets("cifar10_full")
    f = top(diagnose(net, LayerPort(net, replace={"norm1": SumLRN(3, 5e-5, 0.75)})),
            "lrn_alpha_scaling", "norm1")
    assert "3^2" in f.cause and "9 x Caffe's" in f.evidence
    port = LayerPort(net, replace={"norm2": WithinChannelLRN(3, 5e-5, 0.75, False)})
    f = top(diagnose(net, port), "lrn_border_divisor", "norm2")
    assert f.fix == "norm2.count_include_pad = True"


# -- layout ------------------------------------------------------------------------------------
def test_softmax_axis_module_and_functional(nets):
    net = nets("lenet_mnist")
    f = top(diagnose(net, LayerPort(net, replace={"prob": nn.Softmax(dim=0)})),
            "softmax_axis", "prob")
    assert "the batch axis" in f.evidence and f.fix == "prob = nn.Softmax(dim=1)"
    net = nets("squeezenet_v1.1")
    port = LayerPort(net, calls={"prob": lambda x: F.softmax(x, -1)})
    f = top(diagnose(net, port), "softmax_axis", "prob")
    assert "dim=1" in f.fix and "axis 3 (size 1)" in f.evidence


def test_concat_order_and_axis(nets):
    net = nets("squeezenet_v1.1")
    port = LayerPort(net, before={"fire2/concat": lambda a, b: (b, a)})
    f = top(diagnose(net, port), "concat_order", "fire2/concat")
    assert f.fix == "torch.cat([fire2_relu_expand1x1, fire2_relu_expand3x3], dim=1)"
    f = top(diagnose(net, LayerPort(net, replace={"fire5/concat": CatView(2)})),
            "concat_axis", "fire5/concat")
    assert f.fix == "fire5_concat.dim = 1"


def test_flatten_order_weights_and_permute(nets):
    net = nets("lenet_mnist")
    w, b = (np.asarray(a) for a in blobs_of(net, "ip1"))
    hwc = w.reshape(500, 50, 4, 4).transpose(0, 2, 3, 1).reshape(500, -1)
    port = LayerPort(net, replace={"ip1": FlattenLinear(hwc, b)})
    top(diagnose(net, port), "flatten_order", "ip1")  # ours, or the weight audit's
    f = probe_at(net, port, "ip1", layout.flatten_order)
    assert f.data["order"] == "HWC" and ".view(500, 4, 4, 50).permute(0, 3, 1, 2)" in f.fix
    # the port permutes to channels-last before flattening: an op outside the aligned group
    f = top(diagnose(net, LayerPort(net, replace={"ip1": HWCFlattenLinear(w, b)})),
            "flatten_order", "ip1")
    assert f.probe == "flatten_order_input" and f.data["ops"] == ["ip1.permute"]


# -- preprocessing -----------------------------------------------------------------------------
def _flip_conv1(port: nn.Module, scale: float = 1.0) -> nn.Module:
    with torch.no_grad():
        port.conv1.weight.copy_(port.conv1.weight.flip(1) * scale)
    return port


BGR = {"input_channel_order", "bgr_rgb_first_conv"}  # ours, or the weight audit's


def test_bgr_conv1_weights(nets):
    net = nets("squeezenet_v1.1")
    report = diagnose(net, _flip_conv1(LayerPort(net)))
    top(report, BGR, "conv1")
    assert all(g.kind != "input_channel_order_undecidable" for g in report.findings)
    [f] = probe_at(net, _flip_conv1(LayerPort(net)), "conv1", preprocessing.input_convention)
    assert f.kind == "input_channel_order" and "x[:, ::-1]" in f.fix and "flip(1)" in f.fix


def test_constant_input_cannot_decide_channel_order(nets):
    # conv1 converted for RGB and 0..1 pixels; a constant input only shows the scale.
    net = head(nets("bvlc_alexnet"), "pool1")
    report = diagnose(net, _flip_conv1(LayerPort(net), 1 / 255), feeds(net, value=0.5))
    f = top(report, "input_scale", "conv1")
    assert "* 255" in f.fix
    kinds = [g.kind for g in report.findings]
    assert "input_channel_order_undecidable" in kinds and "input_channel_order" not in kinds
    undecided = report.findings[kinds.index("input_channel_order_undecidable")]
    assert undecided.explained is None and "constant" in undecided.evidence


def test_mean_folded_into_conv1_bias(nets):
    net = nets("cifar10_quick_v1")  # conv1 pads by 2: not an input shift at the border
    port = LayerPort(net)
    mean = torch.tensor([104.0, 117.0, 123.0])
    with torch.no_grad():
        port.conv1.bias -= (port.conv1.weight * mean.view(1, 3, 1, 1)).sum((1, 2, 3))
    x = {"data": np.random.default_rng(5).uniform(-128, 128, (1, 3, 32, 32))}
    f = top(diagnose(net, port, x), "input_mean", "conv1")
    assert np.allclose(f.data["mean"], [104, 117, 123], atol=1e-2)


def test_inline_preprocessing(nets):
    net = nets("cifar10_full")
    mean = torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    port = LayerPort(net, before={"conv1": lambda x: (x.flip(1) * 255 - mean,)})
    f = top(diagnose(net, port), "input_channel_order_scale_mean", "conv1")
    assert f.probe == "inline_preprocessing" and f.data["ops"] == ["flip", "mul", "sub"]
    assert "minus the per-channel mean (104, 117, 123)" in f.cause and "x 255" in f.cause


# -- two bugs, clean ports, other bugs ----------------------------------------------------------
def test_two_bugs_at_different_depths(nets):
    net = nets("squeezenet_v1.1")
    port = _flip_conv1(LayerPort(net, replace={"pool5": nn.MaxPool2d(3, 2)}))
    report = diagnose(net, port)
    top(report, BGR, "conv1")
    found = {(f.kind, f.layer.split(" <-> ")[0]) for f in report.findings}
    assert ("pool_ceil_mode", "pool5") in found


@pytest.mark.parametrize("name", ["bvlc_alexnet", "cifar10_full", "squeezenet_v1.1",
                                  "lenet_mnist"])
def test_clean_ports_raise_no_finding(nets, name):
    net = head(nets(name), "pool5") if name == "bvlc_alexnet" else nets(name)
    x = feeds(net)
    for port, opts in ((LayerPort(net), None), (LayerPort(net).double(), None),
                       (LayerPort(net), ModelOptions(dtype="float64"))):
        report = layerdiff.compare(net, port.eval(), x, ref_options=opts)
        assert report, [(r.pair.ref_name, r.metrics.max_abs, r.tolerance)
                        for r in report.failures]
        assert not report.findings


def test_other_bugs_do_not_trigger_these_probes(nets):
    # A conv off by 1% after the data layer, and a wrong bias inside: none of these probes may
    # claim them (their transforms cannot remove such an error).
    net = nets("cifar10_full")
    port = LayerPort(net)
    with torch.no_grad():
        port.conv1.weight.mul_(1.01)
        port.conv2.bias.add_(0.05)
    report = layerdiff.compare(net, port.eval(), feeds(net))
    assert not report
    assert not [f for f in report.findings if f.probe in OURS]


def test_probes_skip_pairs_of_other_types(nets):
    # Direct: a failing conv pair is not a pooling/LRN/softmax/concat/InnerProduct pair.
    net = nets("lenet_mnist")
    port = LayerPort(net)
    with torch.no_grad():
        port.conv2.weight.mul_(1.5)
    report = layerdiff.compare(net, port.eval(), feeds(net), diagnose=False)
    case = next(c for c in layer_cases(report) if c.result.local_passed is False)
    assert case.pair.ref_name == "conv2"
    for fn in (pooling.pooling_geometry, lrn.lrn_parameters, layout.softmax_axis,
               layout.concat_axis, layout.flatten_order, preprocessing.input_convention):
        assert fn(case) is None, fn.__name__

"""Alignment of graphs that are not the same graph: BatchNorm folded into the layer before it
(both directions), explicit padding, functional global pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fold_ports import bn_port, drop_steps, fold, insert_step, load_folded, renamed
from golden import CORPUS, require_shared
from nets import caffe_net
from ports import GraphPort
from torch import nn

import layerdiff
from layerdiff.align.fingerprint import FOLDED, channel_ratios, channel_signature


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- fingerprint of folded kernels --------------------------------------------------------------
def test_channel_ratios_folded_kernel_negative_gamma_zero_and_tiny_channels():
    g = _rng(1)
    w = g.standard_normal((8, 3, 3, 3))
    w[2] = 0.0  # a dead channel
    w[3] *= 1e-7  # a channel of tiny values
    gamma = g.uniform(0.5, 2.0, 8)
    gamma[[1, 6]] *= -1  # negative gamma: the folded channel changes sign
    gamma[5] = 0.0  # gamma 0: the folded channel is all zero
    var = g.uniform(0.1, 3.0, 8)
    folded, _ = fold(w, g.standard_normal(8), g.standard_normal(8), var, 1e-5, gamma, None)
    folded32 = folded.astype(np.float32)

    ratio = channel_ratios(folded32, w.astype(np.float32))
    assert ratio is not None
    k = gamma / np.sqrt(var + 1e-5)
    live = np.arange(8) != 2
    np.testing.assert_allclose(ratio[live], k[live], rtol=1e-5, atol=1e-6)
    assert np.isnan(ratio[2])
    assert ratio[1] < 0 and ratio[6] < 0 and ratio[5] == 0.0
    # gamma 0 makes a zero channel on the folded side only: the plain kernel is no multiple of it
    assert channel_ratios(w, folded32) is None

    sig_plain, sig_folded = channel_signature(w), channel_signature(folded32)
    both = ~(np.isnan(sig_plain) | np.isnan(sig_folded))
    np.testing.assert_allclose(sig_plain[both], sig_folded[both], rtol=1e-5)
    assert np.isnan(sig_plain[2]) and np.isnan(sig_folded[5])


def test_channel_ratios_reject_what_is_not_a_per_channel_multiple():
    g = _rng(2)
    w = g.standard_normal((6, 4, 3, 3))
    bad = w * 1.7
    bad[4, 0, 1, 1] += 0.05 * np.abs(w[4]).max()  # one weight off
    assert channel_ratios(bad, w) is None
    assert channel_ratios(w[:, :, ::-1], w) is None  # same values, other positions
    assert channel_ratios(g.standard_normal((6, 4, 3, 3)), w) is None
    assert channel_ratios(w * 3.0, w) is not None
    assert channel_ratios(w[:5], w) is None  # shapes differ


# -- CIFAR ResNet-20 (real weights), folded on one side -----------------------------------------
@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):
    require_shared()
    net = layerdiff.load_caffe(CORPUS / "cifar10_resnet20_junyuseu", shape=(1, 3, 32, 32))
    assert float(np.asarray(net.layer("BatchNorm1").blobs[2].data)[0]) == pytest.approx(999.98,
                                                                                         abs=0.01)
    return net, load_folded(net, tmp_path_factory.mktemp("folded"))


def test_folded_resnet50_vs_torchvision_style_port(tmp_path):
    """53 convs, other names on each side: every conv + BatchNorm2d pair found by its weights."""
    require_shared()
    from golden import GOLDEN, load_golden
    from ports import load_resnet50_from_caffe

    net = load_golden(GOLDEN / "nets" / "resnet50_seed_ones").net
    folded = load_folded(net, tmp_path / "folded")
    report = layerdiff.compare(folded, load_resnet50_from_caffe(net), "ones:0.5",
                               diagnose=False)  # the ResNet-20 tests check for no findings
    assert report, [(r.pair.ref_name, r.pair.cand_name, r.metrics.max_abs) for r in report.failures]
    convs = _conv_rows(report)
    assert len(convs) == 53
    assert all([c.kind for c in p.cand] == ["Conv2d", "BatchNorm2d"] for p in convs)
    assert [p.method for p in convs].count("fingerprint") == 52  # conv1 = conv1 by name
    pairs = {p.ref_name: p.cand_name for p in convs}
    assert pairs["res2a_branch2a"] == "layer1.0.conv1+layer1.0.bn1"
    assert [r.name for r in report.alignment.unaligned_ref] == ["prob"]  # the port has no softmax
    assert not report.alignment.unaligned_cand


def _torch_style(name: str) -> str:
    """Other names for conv / BatchNorm modules, so only the weights can tie them."""
    return f"features_{name[::-1]}" if name.startswith(("Convolution", "BatchNorm")) else name


def _conv_rows(report):
    return [r.pair for r in report.results if r.pair.ref[0].kind == "Convolution"]


@pytest.mark.parametrize("rename", [False, True], ids=["same names", "other names"])
def test_folded_caffe_vs_unfolded_torch_port_passes(resnet20, rename):
    net, folded = resnet20
    assert not [lay for lay in folded.layers if lay.type in ("BatchNorm", "Scale")]
    port = bn_port(net)
    if rename:
        port = renamed(port, _torch_style)
    report = layerdiff.compare(folded, port, "uniform:-1,1:7")
    assert report, [(r.pair.ref_name, r.pair.cand_name, r.metrics.max_abs) for r in report.failures]
    assert report.findings == []
    assert not report.alignment.unaligned_ref and not report.alignment.unaligned_cand
    convs = _conv_rows(report)
    assert len(convs) == 21
    for pair in convs:  # one row per group: the conv and its BatchNorm2d
        assert [c.kind for c in pair.cand] == ["Conv2d", "BatchNorm2d"], pair.cand_name
        assert len(pair.ref) == 1
        if rename:
            assert pair.method == "fingerprint"
    first = convs[0]
    want = "features_1noitulovnoC+features_1mroNhctaB" if rename else "Convolution1+BatchNorm1"
    assert (first.ref_name, first.cand_name) == ("Convolution1", want)


@pytest.mark.parametrize("rename", [False, True], ids=["same names", "other names"])
def test_unfolded_caffe_vs_folded_torch_port_passes(resnet20, rename):
    net, folded = resnet20
    port = GraphPort(folded).eval()
    if rename:
        port = renamed(port, _torch_style)
    report = layerdiff.compare(net, port, "uniform:-1,1:7")
    assert report, [(r.pair.ref_name, r.pair.cand_name, r.metrics.max_abs) for r in report.failures]
    assert report.findings == []
    assert not report.alignment.unaligned_ref and not report.alignment.unaligned_cand
    convs = _conv_rows(report)
    assert len(convs) == 21
    for pair in convs:
        assert [r.kind for r in pair.ref] == ["Convolution", "BatchNorm", "Scale"]
        assert len(pair.cand) == 1
        if rename:
            assert pair.method == "fingerprint"


def test_folded_port_with_undivided_statistics_fails_at_the_group(resnet20):
    """Grouping must not hide a wrong fold: the failing row is the first conv group."""
    net, folded = resnet20
    port = bn_port(net)
    with torch.no_grad():
        port.BatchNorm1.running_var.mul_(999.98)  # the Caffe scale factor left in
    report = layerdiff.compare(folded, port, "uniform:-1,1:7")
    assert not report
    fd = report.first_divergence
    assert (fd.pair.ref_name, fd.pair.cand_name) == ("Convolution1", "Convolution1+BatchNorm1")


def test_port_that_left_a_batchnorm_out_is_not_a_fold(resnet20):
    """The numbers decide: the bare conv agrees with Caffe's conv, so BatchNorm + Scale stay
    unaligned (the port left them out) instead of hiding in a group."""
    net, _ = resnet20
    port = drop_steps(GraphPort(net).eval(), {"BatchNorm1", "Scale1"})
    report = layerdiff.compare(net, port, "uniform:-1,1:7")
    assert not report
    pairs = {r.pair.ref_name: r for r in report.results}
    assert pairs["Convolution1"].pair.cand_name == "Convolution1"
    assert pairs["Convolution1"].passed
    assert [r.name for r in report.alignment.unaligned_ref] == ["BatchNorm1", "Scale1"]


def test_batchnorm_the_port_inserted_is_not_a_fold(resnet20):
    _, folded = resnet20
    extra = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        extra.running_mean.fill_(0.3)
    port = insert_step(GraphPort(folded).eval(), "Convolution1", "extra_bn", extra)
    report = layerdiff.compare(folded, port, "uniform:-1,1:7")
    assert not report
    pairs = {r.pair.ref_name: r for r in report.results}
    assert pairs["Convolution1"].pair.cand_name == "Convolution1"
    assert pairs["Convolution1"].passed
    assert [c.name for c in report.alignment.unaligned_cand] == ["extra_bn"]


# -- explicit padding, functional global pooling, Linear + BatchNorm1d --------------------------
_SMALL = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "gpool" type: "Pooling" bottom: "pool1" top: "gpool"
        pooling_param { pool: %s global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gpool" top: "fc"
        inner_product_param { num_output: 5 } }
"""


class KerasStylePort(nn.Module):
    """The net as a Keras/TF-converted port writes it: ``F.pad`` before an unpadded conv (with
    its BatchNorm) and pool, global pooling as a reduction in forward, Linear + BatchNorm1d."""

    def __init__(self, g: np.random.Generator, pool: str):
        super().__init__()
        self.pool = pool
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        with torch.no_grad():
            for bn in (self.bn, self.bn_fc):
                n = bn.num_features
                bn.running_mean.copy_(torch.from_numpy(g.standard_normal(n)))
                bn.running_var.copy_(torch.from_numpy(g.uniform(0.2, 2.0, n)))
                bn.weight.copy_(torch.from_numpy(g.uniform(0.5, 1.5, n) * np.sign(
                    g.standard_normal(n))))
                bn.bias.copy_(torch.from_numpy(g.standard_normal(n)))
            self.conv.weight[0] = 0.0  # a dead channel
            self.bn.weight[1] = 0.0  # gamma 0: that channel of the folded kernel is zero
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(F.pad(x, (1, 1, 1, 1)))))
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)  # zeros after a ReLU: as Caffe's pad
        if self.pool == "mean":
            x = x.mean((2, 3))
        elif self.pool == "amax":
            x = x.amax((2, 3))
        elif self.pool == "max keepdim":
            x = torch.flatten(x.amax(dim=(2, 3), keepdim=True), 1)
        elif self.pool == "mean keepdim":
            x = x.mean((2, 3), keepdim=True).flatten(1)
        elif self.pool == "adaptive max":
            x = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        else:  # "adaptive avg"
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.bn_fc(self.fc(x))

    def folded_blobs(self) -> dict[str, list[np.ndarray]]:
        """Caffe blobs of the same net with both BatchNorms folded in."""
        out = {}
        for name, layer, bn in (("conv1", self.conv, self.bn), ("fc", self.fc, self.bn_fc)):
            def arr(t):
                return t.detach().double().numpy()

            w, b = fold(arr(layer.weight), arr(layer.bias), arr(bn.running_mean),
                        arr(bn.running_var), bn.eps, arr(bn.weight), arr(bn.bias))
            out[name] = [w, b]
        return out


def _small(tmp_path, caffe_pool: str, torch_pool: str, seed: int = 3):
    port = KerasStylePort(_rng(seed), torch_pool)
    net = caffe_net(tmp_path, _SMALL % caffe_pool, {"data": (2, 3, 9, 9)}, port.folded_blobs(),
                    np.float32)
    return net, port


@pytest.mark.parametrize("caffe_pool,torch_pool", [
    ("AVE", "mean"), ("MAX", "amax"), ("MAX", "max keepdim"), ("AVE", "mean keepdim"),
    ("AVE", "adaptive avg"), ("MAX", "adaptive max")])
def test_padding_global_pooling_and_linear_batchnorm_align_and_pass(tmp_path, caffe_pool,
                                                                    torch_pool):
    net, port = _small(tmp_path, caffe_pool, torch_pool)
    report = layerdiff.compare(net, port, "uniform:-1,1:5")
    assert report, [(r.pair.ref_name, r.pair.cand_name, r.metrics.max_abs) for r in report.failures]
    assert report.findings == []
    assert not report.alignment.unaligned_ref and not report.alignment.unaligned_cand
    rows = {r.pair.ref_name: [c.kind for c in r.pair.cand] for r in report.results}
    assert rows["conv1"] == ["pad", "Conv2d", "BatchNorm2d"]
    conv1 = next(r.pair for r in report.results if r.pair.ref_name == "conv1")
    assert conv1.method == "fingerprint" and FOLDED in conv1.note  # torch calls it "conv"
    assert rows["pool1"] == ["pad", "max_pool2d"]
    assert rows["gpool"] in (["mean"], ["amax"], ["adaptive_avg_pool2d"], ["adaptive_max_pool2d"])
    assert rows["fc"][-2:] == ["Linear", "BatchNorm1d"]
    assert len(report.results) == 5


def test_global_pooling_of_another_kind_still_aligns_at_the_pooling(tmp_path):
    """Caffe AVE vs ``x.amax((2, 3))``: the pair exists, and the divergence is there."""
    net, port = _small(tmp_path, "AVE", "amax")
    report = layerdiff.compare(net, port, "uniform:-1,1:5")
    assert not report
    pairs = {r.pair.ref_name: r for r in report.results}
    assert [c.kind for c in pairs["gpool"].pair.cand] == ["amax"]
    assert not pairs["gpool"].passed and pairs["pool1"].passed
    assert report.first_divergence.pair.ref_name == "gpool"
    assert not report.alignment.unaligned_ref and not report.alignment.unaligned_cand


_SMALL_UNFOLDED = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "gpool" type: "Pooling" bottom: "pool1" top: "gpool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gpool" top: "fc"
        inner_product_param { num_output: 5 } }
layer { name: "bn_fc" type: "BatchNorm" bottom: "fc" top: "fc" }
layer { name: "scale_fc" type: "Scale" bottom: "fc" top: "fc" scale_param { bias_term: true } }
"""


class FoldedPort(nn.Module):
    """A port whose converter folded every BatchNorm and padded explicitly."""

    def __init__(self, blobs: dict[str, list[np.ndarray]]):
        super().__init__()
        (w, b), (fw, fb) = blobs["conv1"], blobs["fc"]
        self.features = nn.Conv2d(3, 6, 3)
        self.head = nn.Linear(6, 5)
        with torch.no_grad():
            for mod, weight, bias in ((self.features, w, b), (self.head, fw, fb)):
                mod.weight.copy_(torch.from_numpy(weight))
                mod.bias.copy_(torch.from_numpy(bias))
        self.eval()

    def forward(self, x):
        x = torch.relu(self.features(F.pad(x, (1, 1, 1, 1))))
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
        return self.head(x.mean((2, 3)))


def test_unfolded_caffe_vs_port_with_folded_conv_and_linear(tmp_path):
    """Caffe Convolution + BatchNorm + Scale and InnerProduct + BatchNorm + Scale against a port
    with both folded (weights tie per output channel) and explicit padding."""
    src = KerasStylePort(_rng(4), "mean")
    s = 999.98  # Caffe stores the statistics times the moving-average factor

    def arr(t):
        return t.detach().double().numpy()

    blobs = {}
    for name, bn_name, sc_name, layer, bn in (("conv1", "bn1", "scale1", src.conv, src.bn),
                                              ("fc", "bn_fc", "scale_fc", src.fc, src.bn_fc)):
        blobs[name] = [arr(layer.weight), arr(layer.bias)]
        blobs[bn_name] = [arr(bn.running_mean) * s, arr(bn.running_var) * s, np.array([s])]
        blobs[sc_name] = [arr(bn.weight), arr(bn.bias)]
    net = caffe_net(tmp_path, _SMALL_UNFOLDED, {"data": (2, 3, 9, 9)}, blobs, np.float32)
    port = FoldedPort({k: [a.astype(np.float32) for a in v]
                       for k, v in src.folded_blobs().items()})
    report = layerdiff.compare(net, port, "uniform:-1,1:5")
    assert report, [(r.pair.ref_name, r.pair.cand_name, r.metrics.max_abs) for r in report.failures]
    assert report.findings == []
    assert not report.alignment.unaligned_ref and not report.alignment.unaligned_cand
    rows = {r.pair.ref_name: r.pair for r in report.results}
    assert rows["conv1+bn1+scale1"].cand_name == "pad+features"
    assert rows["fc+bn_fc+scale_fc"].cand_name == "head"
    assert rows["conv1+bn1+scale1"].method == rows["fc+bn_fc+scale_fc"].method == "fingerprint"
    assert len(report.results) == 5


def _trace(*records: tuple[str, str, tuple[int, ...]]):
    from layerdiff.trace import Trace

    t, prev = Trace(), []
    for name, kind, shape in records:
        t.add(name, kind, [name], prev, [np.zeros(shape, np.float32)])
        prev = [name]
    return t


def test_a_reduction_stands_for_a_pooling_only_where_it_pools_globally():
    from layerdiff.align import align

    # x / x.amax() before the pooling: the scalar amax is no pooling, even when the sizes
    # differ everywhere and only the op kinds are left to pair by.
    ref = _trace(("conv", "Convolution", (1, 4, 4, 4)), ("pool", "Pooling", (1, 4, 2, 2)))
    cand = _trace(("conv", "Conv2d", (1, 4, 4, 4)), ("amax", "amax", ()),
                  ("avg_pool2d", "avg_pool2d", (1, 4, 3, 3)))
    al = align(ref, cand)
    assert [(p.ref_name, p.cand_name) for p in al.pairs] == [("conv", "conv"),
                                                             ("pool", "avg_pool2d")]
    assert [c.name for c in al.unaligned_cand] == ["amax"]

    ref = _trace(("conv", "Convolution", (2, 4, 4, 4)), ("gpool", "Pooling", (2, 4, 1, 1)))
    cand = _trace(("conv", "Conv2d", (2, 4, 4, 4)), ("amax", "amax", (2, 4)))
    assert [p.cand_name for p in align(ref, cand).pairs] == ["conv", "amax"]

    # torch against torch: two reductions pair as they are
    ref = _trace(("a", "Conv2d", (2, 4, 4, 4)), ("m", "mean", (2, 4)))
    cand = _trace(("b", "Conv2d", (2, 4, 4, 4)), ("n", "mean", (2, 4)))
    assert [p.cand_name for p in align(ref, cand).pairs] == ["b", "n"]

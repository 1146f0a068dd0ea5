"""BatchNorm and train-mode probes: bugs planted in torch ports of real Caffe architectures.

Each planted bug must be the top finding, at its layer, with the fix removing (almost) all of
the layer's error; clean ports must raise nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from golden import CORPUS, GOLDEN, load_golden, require_shared
from ports import GraphPort, _conv, _pool, load_resnet50_from_caffe
from torch import nn

import layerdiff
import layerdiff.diagnose.probes.batchnorm  # noqa: F401 - registers the probes
import layerdiff.diagnose.probes.train_mode  # noqa: F401
from layerdiff.engine import make_plan
from layerdiff.sources import ModelOptions

SPEC = "uniform:-1,1:3"
OURS = {"bn_running_stats", "bn_eps", "bn_affine", "bn_params", "bn_global_stats",
        "train_mode_layer", "train_mode"}


@pytest.fixture(scope="module")
def resnet50():
    """Corpus ResNet-50 with the seed_ones weights (BatchNorm blob 2 = 999.98)."""
    require_shared()
    return load_golden(GOLDEN / "nets" / "resnet50_seed_ones").net


@pytest.fixture(scope="module")
def resnet20():
    """cifar10_resnet20_junyuseu with its real trained weights (separate BatchNorm/Scale)."""
    require_shared()
    return layerdiff.load_caffe(CORPUS / "cifar10_resnet20_junyuseu", shape=(1, 3, 32, 32))


def _top(report, kind: str, layer: str):
    """The planted bug: the best finding at ``layer`` is ``kind`` and its fix removes (almost)
    all the error. Returns this module's own finding there (for its wording)."""
    here = [f for f in report.findings if f.layer == layer]
    assert here, [(g.kind, g.layer, g.probe) for g in report.findings]
    best = max(here, key=lambda f: f.score)  # the first of equals: as ranked by the diagnosis
    assert best.kind == kind, [(g.kind, g.layer, g.probe, g.explained) for g in here]
    tol = next(r.tolerance for r in report.results
               if f"{r.pair.ref_name} <-> {r.pair.cand_name}" == layer)
    # The diagnosis keeps one finding per cause and layer: ours or the weight audit's.
    mine = sorted((f for f in here if f.kind == kind), key=lambda f: f.probe not in OURS)
    assert mine, [(g.kind, g.probe) for g in here]
    f = mine[0]
    assert f.explained > 0.99 and f.error_after <= tol, f
    assert f.cause and f.evidence and f.fix
    return f


def _only(report, layer: str) -> None:
    """A single planted bug: every finding (any probe) is about that layer."""
    assert report.findings and {f.layer for f in report.findings} == {layer}, \
        [(g.kind, g.layer, g.probe) for g in report.findings]


def _ours(report) -> list:
    return [f for f in report.findings if f.probe in OURS]


def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)


# -- running statistics -----------------------------------------------------------------------


def test_stats_not_divided_by_scale_factor_resnet50(resnet50):
    report = layerdiff.compare(resnet50, load_resnet50_from_caffe(resnet50, divide_bn=False),
                               SPEC)
    assert report.findings[0].layer == "bn_conv1+scale_conv1 <-> bn1"
    f = _top(report, "bn_scale_factor", "bn_conv1+scale_conv1 <-> bn1")
    assert "without dividing" in f.cause and "999.982" in f.cause
    assert f.fix == "model.bn1.running_mean /= 999.982; model.bn1.running_var /= 999.982"
    # every BatchNorm is wrong: each diagnosed layer gets the same finding
    assert {g.kind for g in report.findings} == {"bn_scale_factor"}


def _one_bug(net, port, kind: str, layer: str):
    report = layerdiff.compare(net, port, SPEC)
    _only(report, layer)
    return _top(report, kind, layer)


def test_stats_divided_twice_resnet20(resnet20):
    port = GraphPort(resnet20).eval()
    with torch.no_grad():
        port.BatchNorm3.running_mean /= 999.98236
        port.BatchNorm3.running_var /= 999.98236
    f = _one_bug(resnet20, port, "bn_scale_factor", "BatchNorm3 <-> BatchNorm3")
    assert "divided by s twice" in f.cause
    assert "model.BatchNorm3.running_mean *= 999.98" in f.fix


def test_scale_factor_zero_resnet20(resnet20):
    """s == 0: Caffe ignores the statistics (x / sqrt(eps)); the port used the raw blobs."""
    net = copy.deepcopy(resnet20)
    blob = net.layer("BatchNorm4").blobs[2]
    blob.data = np.zeros_like(blob.data)
    port = GraphPort(resnet20).eval()
    port.BatchNorm4.load_state_dict(GraphPort(resnet20, divide_bn=False).BatchNorm4.state_dict())
    f = _one_bug(net, port, "bn_scale_factor", "BatchNorm4 <-> BatchNorm4")
    assert "is 0" in f.cause
    assert f.fix == "model.BatchNorm4.running_mean.zero_(); model.BatchNorm4.running_var.zero_()"


def test_mean_var_swapped_resnet20(resnet20):
    port = GraphPort(resnet20).eval()
    _swap(port.BatchNorm5.running_mean, port.BatchNorm5.running_var)
    f = _one_bug(resnet20, port, "bn_stats_swapped", "BatchNorm5 <-> BatchNorm5")
    assert "swapped" in f.cause


def test_eps_mismatch_resnet20(resnet20):
    port = GraphPort(resnet20).eval()
    port.BatchNorm2.eps = 1e-3
    f = _one_bug(resnet20, port, "bn_eps", "BatchNorm2 <-> BatchNorm2")
    assert f.fix == "model.BatchNorm2.eps = 1e-05"


def test_gamma_beta_swapped_resnet20(resnet20):
    """The separate Scale module of a layer-per-layer port."""
    port = GraphPort(resnet20).eval()
    _swap(port.Scale19.weight, port.Scale19.bias)
    f = _one_bug(resnet20, port, "bn_affine_swapped", "Scale19 <-> Scale19")
    assert "swapped" in f.cause


def test_scale_missing_resnet20(resnet20):
    port = GraphPort(resnet20).eval()
    with torch.no_grad():
        port.Scale7.weight.fill_(1)
        port.Scale7.bias.zero_()
    _one_bug(resnet20, port, "bn_affine_missing", "Scale7 <-> Scale7")


def test_use_global_stats_false_resnet20(resnet20):
    net = copy.deepcopy(resnet20)
    net.layer("BatchNorm7").param.batch_norm_param.use_global_stats = False
    f = _one_bug(net, GraphPort(resnet20).eval(), "bn_use_global_stats_false",
                 "BatchNorm7 <-> BatchNorm7")
    assert "track_running_stats = False" in f.fix


def test_two_bugs_in_one_layer_resnet20(resnet20):
    port = GraphPort(resnet20).eval()
    port.BatchNorm14.eps = 1e-3
    with torch.no_grad():
        port.BatchNorm14.running_mean *= 999.98236
        port.BatchNorm14.running_var *= 999.98236
    f = _one_bug(resnet20, port, "bn_params", "BatchNorm14 <-> BatchNorm14")
    assert f.data["kinds"] == ["bn_scale_factor", "bn_eps"]


def test_bugs_at_four_depths_resnet50(resnet50):
    """eps (early), Scale not merged, use_global_stats: false, gamma/beta swapped (late): each
    is the top finding at its own layer, and no other layer gets one."""
    net = copy.deepcopy(resnet50)
    net.layer("bn3a_branch2b").param.batch_norm_param.use_global_stats = False
    port = load_resnet50_from_caffe(resnet50)
    port.bn1.eps = 1e-3
    with torch.no_grad():
        port.layer3[0].bn1.weight.fill_(1)
        port.layer3[0].bn1.bias.zero_()
    _swap(port.layer4[2].bn3.weight, port.layer4[2].bn3.bias)
    report = layerdiff.compare(net, port, SPEC)
    expect = {"bn_conv1+scale_conv1 <-> bn1": "bn_eps",
              "bn3a_branch2b+scale3a_branch2b <-> layer2.0.bn2": "bn_use_global_stats_false",
              "bn4a_branch2a+scale4a_branch2a <-> layer3.0.bn1": "bn_affine_missing",
              "bn5c_branch2c+scale5c_branch2c <-> layer4.2.bn3": "bn_affine_swapped"}
    assert {f.layer for f in report.findings} == set(expect)
    found = {layer: _top(report, kind, layer) for layer, kind in expect.items()}
    f = found["bn_conv1+scale_conv1 <-> bn1"]
    assert "eps = 0.001" in f.cause and "eps = 1e-05" in f.cause
    assert "solves to eps = 0.001" in f.evidence  # recovered from the outputs alone
    assert f.fix == "model.bn1.eps = 1e-05"
    assert "scale4a_branch2a" in found["bn4a_branch2a+scale4a_branch2a <-> layer3.0.bn1"].cause
    assert len(_ours(report)) == 4


# -- train mode -------------------------------------------------------------------------------


def test_model_arrived_in_train_mode_resnet20(resnet20):
    """layerdiff compares in eval(): the comparison passes, the model-wide finding says why."""
    port = GraphPort(resnet20)  # no eval()
    report = layerdiff.compare(resnet20, port, SPEC)
    assert all(r.passed for r in report.results)
    ours = _ours(report)
    assert [f.kind for f in ours] == ["model_train_mode"]
    assert report.findings[0] is ours[0]
    assert "21 BatchNorm" in ours[0].cause and ours[0].fix.startswith("model.eval()")
    assert "BatchNorm1 (BatchNorm2d) changes by up to" in ours[0].evidence
    assert port.training  # the caller's flags are left as they were


def test_model_arrived_in_train_mode_saved_trace(resnet20, tmp_path):
    """A saved candidate trace has no modules: the finding goes by the recorded meta and kinds."""
    from layerdiff.adapters.torch import capture_torch

    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    feeds = {next(iter(resnet20.inputs)): x}
    capture_torch(GraphPort(resnet20), feeds).save(tmp_path / "cand.npz")
    report = layerdiff.compare(resnet20, tmp_path / "cand.npz", feeds)
    assert [f.kind for f in _ours(report)] == ["model_train_mode"]
    assert layerdiff.compare(resnet20, GraphPort(resnet20).eval(), feeds).findings == []


def test_kept_in_train_mode_batchnorm_resnet20(resnet20):
    port = GraphPort(resnet20)
    report = layerdiff.compare(resnet20, port, SPEC,
                               cand_options=ModelOptions(keep_train_mode=True))
    f = _top(report, "layer_train_mode", "BatchNorm1 <-> BatchNorm1")
    assert "batch's own statistics" in f.cause
    assert all(g.kind == "layer_train_mode" for g in _ours(report))  # no model-wide duplicate


class _Cat(nn.Module):
    def forward(self, *xs):
        return torch.cat(xs, 1)


class ConcatPort(nn.Module):
    """GraphPort's idea for nets with Concat (SqueezeNet): one module per Caffe layer."""

    def __init__(self, net):
        super().__init__()
        self.steps, self.inputs = [], list(net.inputs)
        for p in make_plan(net).layers:
            lay = p.layer
            make = {"Convolution": lambda lay=lay, p=p: _conv(lay, p.blobs), "ReLU": nn.ReLU,
                    "Concat": _Cat, "Dropout": nn.Dropout, "Softmax": lambda: nn.Softmax(1),
                    "Pooling": lambda lay=lay: _pool(lay.param.pooling_param)}.get(lay.type)
            if make is not None:
                self.add_module(lay.name.replace("/", "_"), make())
                self.steps.append((lay.name.replace("/", "_"), lay.bottoms, lay.tops[0]))

    def forward(self, *xs):
        blobs = dict(zip(self.inputs, xs, strict=True))
        for name, bottoms, top in self.steps:
            blobs[top] = getattr(self, name)(*[blobs[b] for b in bottoms])
        return blobs[top]


def test_kept_in_train_mode_dropout_squeezenet():
    require_shared()
    net = load_golden(GOLDEN / "nets" / "squeezenet_v1.1").net
    net.inputs = {"data": (1, 3, 67, 67)}  # fully convolutional: a small input keeps it quick
    port = ConcatPort(net).eval()
    assert layerdiff.compare(net, port, SPEC)
    port.drop9.train()
    report = layerdiff.compare(net, port, SPEC, cand_options=ModelOptions(keep_train_mode=True))
    f = _top(report, "layer_train_mode", "drop9 <-> drop9")
    assert "Dropout(p=0.5)" in f.evidence


# -- no false findings ----------------------------------------------------------------------------


@pytest.mark.parametrize("ref_dtype,cand_dtype", [("float32", "float32"), ("float64", "float64"),
                                                  ("float64", "float32")])
def test_clean_port_no_findings_resnet20(resnet20, ref_dtype, cand_dtype):
    report = layerdiff.compare(resnet20, GraphPort(resnet20).eval(), SPEC,
                               ref_options=ModelOptions(dtype=ref_dtype),
                               cand_options=ModelOptions(dtype=cand_dtype))
    assert report and not report.findings


def test_other_bug_no_batchnorm_finding_resnet20(resnet20):
    """A wrong convolution: the BatchNorm probes stay silent (it is not theirs)."""
    port = GraphPort(resnet20).eval()
    with torch.no_grad():
        port.Convolution3.weight[0] *= 1.5
    report = layerdiff.compare(resnet20, port, SPEC)
    assert not report
    assert not _ours(report)

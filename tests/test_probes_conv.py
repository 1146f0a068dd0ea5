"""Conv / InnerProduct probes and the reduced-precision probe, on planted bugs in real nets.

Each conv probe is checked twice: called directly on the failing pair (it finds the cause by a
re-run), and through ``compare`` (the planted cause is the top finding at the right pair; the
weight audit may be the one that says it first, with the same kind).
"""

from __future__ import annotations

import pytest
import torch
from golden import CORPUS, GOLDEN, load_golden, require_shared
from ports import planted_port

import layerdiff
import layerdiff.diagnose.probes.audit_probe  # noqa: F401 - registered with the others
from layerdiff.diagnose import diagnose, layer_cases
from layerdiff.diagnose.probes import all_probes
from layerdiff.diagnose.probes.conv import conv_groups, conv_weight_layout, missing_bias
from layerdiff.diagnose.probes.precision import (
    EPS,
    reduced_format,
    reduced_precision,
    reduced_precision_model,
)
from layerdiff.sources import ModelOptions

SPEC = "uniform:-1,1:3"
MINE = {"conv_weight_layout", "conv_groups", "missing_bias", "reduced_precision",
        "reduced_precision_model", "weight_audit"}


@pytest.fixture(scope="module")
def resnet20():
    require_shared()
    all_probes()  # the registry's modules, plus conv/precision imported above
    return layerdiff.load_caffe(CORPUS / "cifar10_resnet20_junyuseu", shape=(1, 3, 32, 32))


@pytest.fixture(scope="module")
def lenet():
    require_shared()
    return layerdiff.load_caffe(CORPUS / "lenet_mnist")


def _port(net, plant=None):
    return planted_port(net, plant)


def _case(net, port, ref_name, **kw):
    """The case of one pair (no diagnosis yet: ``diagnose(case.report)`` runs it after)."""
    report = layerdiff.compare(net, port, SPEC, diagnose=False, **kw)
    return next(c for c in layer_cases(report) if c.pair.ref_name == ref_name)


def _set(name, fn):
    def plant(p):
        w = getattr(p, name).weight
        w.copy_(fn(w).clone())
    return plant


LAYOUTS = [
    ("Convolution7", lambda w: w.flip(2, 3), "conv_kernel_flipped"),
    ("Convolution9", lambda w: w.transpose(2, 3), "conv_kernel_hw_transposed"),
    ("Convolution12", lambda w: w.transpose(0, 1), "conv_weight_transposed"),
    ("Convolution1", lambda w: w.flip(1), "bgr_rgb_first_conv"),
]


@pytest.mark.parametrize("layer, fn, kind", LAYOUTS)
def test_conv_weight_layout_probe(resnet20, layer, fn, kind):
    case = _case(resnet20, _port(resnet20, _set(layer, fn)), layer)
    assert case.result.local_passed is False
    f = conv_weight_layout(case)
    assert f is not None and f.kind == kind and f.layer == f"{layer} <-> {layer}"
    assert f.explained > 0.99 and f.error_after <= case.tolerance < f.error_before
    assert f"Caffe {layer} blob0[" in f.evidence  # the stored weights are Caffe's rearranged
    assert f.fix.startswith(f'm = model.get_submodule("{layer}");')
    # and in the diagnosis it is the top finding (said once: audit and probe do not repeat)
    report = case.report
    diagnose(report)
    top = report.findings[0]
    assert (top.kind, top.layer) == (kind, f"{layer} <-> {layer}") and top.explained > 0.99
    mine = [(g.kind, g.layer) for g in report.findings if g.probe in MINE]
    assert mine.count((kind, top.layer)) == 1


def test_kernel_flip_computed_by_the_module(resnet20):
    """Right weights, wrong op (a true convolution): only the re-run can tell."""

    class TrueConv(torch.nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight.flip(2, 3), self.bias)

    port = _port(resnet20)
    src = port.Convolution5
    conv = TrueConv(16, 16, 3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(src.weight)
        conv.bias.copy_(src.bias)
    port.Convolution5 = conv
    report = layerdiff.compare(resnet20, port, SPEC)
    top = report.findings[0]
    assert (top.kind, top.layer, top.probe) == ("conv_kernel_flipped",
                                                "Convolution5 <-> Convolution5",
                                                "conv_weight_layout")
    assert "equals Caffe Convolution5 blob0" in top.evidence and top.explained > 0.99


def test_depthwise_written_as_dense():
    require_shared()
    net = load_golden(GOLDEN / "nets" / "cifar10_mobilenet_lijianfei").net
    port = _port(net)
    dw = port.Convolution4  # Caffe group = 64, weight [64, 1, 3, 3]
    dense = torch.nn.Conv2d(64, 64, 3, dw.stride, dw.padding)
    with torch.no_grad():
        dense.weight.copy_(dw.weight)  # broadcasts [64,1,3,3] over 64 input channels
        dense.bias.copy_(dw.bias)
    port.Convolution4 = dense
    report = layerdiff.compare(net, port, SPEC)
    top = report.findings[0]
    assert (top.kind, top.layer) == ("conv_groups", "Convolution4 <-> Convolution4")
    assert top.explained > 0.99 and "groups=64" in top.fix
    assert "group = 64" in top.evidence and "broadcast" in top.evidence
    case = next(c for c in layer_cases(report) if c.pair.ref_name == "Convolution4")
    assert conv_groups(case).kind == "conv_groups"
    clean = next(c for c in layer_cases(layerdiff.compare(net, _port(net), SPEC,
                                                         diagnose=False))
                 if c.pair.ref_name == "Convolution4")
    assert conv_groups(clean) is None


def _drop_bias(path):
    def plant(p):
        p.get_submodule(path).bias = None
    return plant


@pytest.mark.parametrize("net_name, path, ref_name", [
    ("lenet", "conv2", "conv2"),
    ("lenet", "ip2.fc", "ip2"),
    ("resnet20", "InnerProduct1.fc", "InnerProduct1"),
])
def test_missing_bias(request, net_name, path, ref_name):
    net = request.getfixturevalue(net_name)
    case = _case(net, _port(net, _drop_bias(path)), ref_name)
    f = missing_bias(case)
    assert f is not None and f.kind == "missing_bias" and f.explained > 0.99
    assert f"torch {path} has no bias" in f.evidence
    diagnose(case.report)
    top = case.report.findings[0]
    assert top.kind == "missing_bias" and top.layer.startswith(f"{ref_name} <-> ")


def test_zero_bias_is_also_missing(lenet):
    case = _case(lenet, _port(lenet, lambda p: p.conv1.bias.zero_()), "conv1")
    f = missing_bias(case)
    assert f is not None and "all-zero bias" in f.evidence


def test_two_bugs_at_different_depths(resnet20):
    def both(p):
        _set("Convolution3", lambda w: w.flip(2, 3))(p)
        _drop_bias("InnerProduct1.fc")(p)

    report = layerdiff.compare(resnet20, _port(resnet20, both), SPEC)
    got = [(f.kind, f.layer.split(" <-> ")[0]) for f in report.findings]
    assert got[0] == ("conv_kernel_flipped", "Convolution3")
    assert ("missing_bias", "InnerProduct1") in got


def test_clean_ports_no_conv_finding(resnet20, lenet):
    for net, kw in ((resnet20, {}), (resnet20, {"cand_options": ModelOptions(dtype="float64")}),
                    (resnet20, {"ref_options": ModelOptions(dtype="float64")}), (lenet, {})):
        report = layerdiff.compare(net, _port(net), SPEC, **kw)
        assert report, kw
        assert not [f for f in report.findings if f.probe in MINE], kw
        for case in layer_cases(report)[:12]:  # probed even though nothing fails
            for probe in (conv_weight_layout, conv_groups, missing_bias, reduced_precision):
                assert probe(case) is None


# -- reduced precision ------------------------------------------------------------------------
@pytest.mark.parametrize("net_name, dtype", [("resnet20", "float16"), ("resnet20", "bfloat16"),
                                             ("lenet", "float16")])
def test_reduced_precision_is_the_only_finding(request, net_name, dtype):
    net = request.getfixturevalue(net_name)
    report = layerdiff.compare(net, _port(net), SPEC, cand_options=ModelOptions(dtype=dtype))
    assert not report and report.findings
    assert {f.kind for f in report.findings} == {"precision"}, \
        [(f.kind, f.layer, f.probe) for f in report.findings]
    top = report.findings[0]
    fd = report.first_divergence
    assert top.layer == f"{fd.pair.ref_name} <-> {fd.pair.cand_name}"
    assert top.explained > 0.9 and top.data["format"] == dtype
    assert dtype in top.cause and "not a bug" in top.cause
    assert f"machine epsilon {EPS[dtype]:.2g}" in top.evidence and "float32" in top.evidence
    assert top.data["rel"] < 4 * EPS[dtype]


def test_real_bug_in_a_float16_candidate_is_not_called_precision(resnet20):
    case = _case(resnet20, _port(resnet20, _set("Convolution2", lambda w: w.flip(2, 3))),
                 "Convolution2", cand_options=ModelOptions(dtype="float16"))
    assert reduced_precision(case) is None
    f = conv_weight_layout(case)  # the fix leaves float16 rounding only: still accepted
    assert f.kind == "conv_kernel_flipped" and f.explained > 0.99
    assert f.error_after > case.tolerance  # float16, yet within the format's slack
    diagnose(case.report)
    at = "Convolution2 <-> Convolution2"
    assert [f.kind for f in case.report.findings if f.layer == at] == ["conv_kernel_flipped"]


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32's 10-bit mantissa (nearest)."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


class Tf32Conv(torch.nn.Conv2d):
    """A conv that behaves as cuDNN does with TF32 on: inputs and weights rounded to TF32."""

    def forward(self, x):
        if torch.backends.cudnn.allow_tf32:
            return self._conv_forward(_tf32(x), _tf32(self.weight), self.bias)
        return super().forward(x)


def test_tf32_on_cuda_simulated(resnet20):
    port = _port(resnet20)
    for name, mod in list(port.named_children()):
        if isinstance(mod, torch.nn.Conv2d):
            new = Tf32Conv(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                           mod.padding)
            new.load_state_dict(mod.state_dict())
            setattr(port, name, new)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        report = layerdiff.compare(resnet20, port, SPEC, diagnose=False)
        report.candidate.meta.update(device="cuda:0", allow_tf32_cudnn=True)
        diagnose(report)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    conv = [f for f in report.findings if f.layer.startswith("Convolution")]
    assert conv and {f.kind for f in conv} == {"precision"}
    assert conv[0].data["format"] == "tf32" and "allow_tf32 = False" in conv[0].fix
    # a BatchNorm is not a TF32 op: its record alone never counts as reduced precision
    bn = next(r for r in report.results if r.pair.ref_name == "BatchNorm1")
    assert reduced_format(report.candidate.meta, bn.pair.cand) is None


def test_accumulated_rounding_model_wide(resnet20):
    """At rtol 2e-3 every layer passes on the reference's own inputs, yet the deep layers
    fail: float16 rounding adds up through the net. Said once, model-wide."""
    report = layerdiff.compare(resnet20, _port(resnet20), SPEC, rtol=2e-3,
                               cand_options=ModelOptions(dtype="float16"))
    assert not report and all(r.local_passed is not False for r in report.results)
    assert [f.kind for f in report.findings] == ["precision"]
    f = report.findings[0]
    assert f.probe == "reduced_precision_model" and "accumulated" in f.cause
    assert f.data["rel"] < 16 * EPS["float16"]
    assert reduced_precision_model(layerdiff.compare(resnet20, _port(resnet20), SPEC,
                                                     diagnose=False)) is None  # float32

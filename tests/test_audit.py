"""Weight audit: every Caffe blob tied to one torch tensor, judged equal or a named mistake.

Planted bugs on real architectures (ResNet-20 CIFAR and LeNet with their real caffemodels,
ResNet-50 with the golden seed weights): the audit names them without a forward pass, and the
``weight_audit`` probe turns them into the top finding of ``compare`` at the right pair.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser, Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from golden import CORPUS, GOLDEN, load_golden, require_shared
from ports import GraphPort, load_resnet50_from_caffe, planted_port

import layerdiff
import layerdiff.diagnose.probes.audit_probe  # noqa: F401 - registers the probe
from layerdiff.diagnose.audit import (
    AuditResult,
    audit,
    audit_models,
    audit_traces,
    render_audit,
)
from layerdiff.diagnose.audit_cli import add_audit_parser, cmd_audit
from layerdiff.diagnose.probes import all_probes
from layerdiff.errors import LayerdiffError
from layerdiff.sources import ModelOptions

TESTS = Path(__file__).resolve().parent
SPEC = "uniform:-1,1:3"


@pytest.fixture(scope="module")
def resnet20():
    require_shared()
    all_probes()  # whatever the registry lists, plus the audit probe imported above
    return layerdiff.load_caffe(CORPUS / "cifar10_resnet20_junyuseu", shape=(1, 3, 32, 32))


@pytest.fixture(scope="module")
def lenet():
    require_shared()
    return layerdiff.load_caffe(CORPUS / "lenet_mnist")


@pytest.fixture(scope="module")
def resnet50():
    require_shared()
    return load_golden(GOLDEN / "nets" / "resnet50_seed_ones").net


def _port(net, plant=None):
    return planted_port(net, plant)


def _problems(res: AuditResult) -> dict[tuple[str, int], tuple[str | None, str]]:
    return {k: v for k, v in res.mapping.items() if v[1] not in ("equal", "folded")}


# -- the audit on plain arrays ----------------------------------------------------------------
def test_synthetic_every_transform():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((5, 5, 3, 3)).astype(np.float32)
    w3 = rng.standard_normal((6, 5, 3, 2)).astype(np.float32)
    ip = rng.standard_normal((7, 6 * 2 * 3)).astype(np.float32)
    mean, var = rng.standard_normal(6).astype(np.float32), rng.random(6).astype(np.float32) + 1
    s = np.array([999.98], np.float32)
    gamma, beta = (rng.standard_normal(6).astype(np.float32) for _ in range(2))
    b1 = rng.standard_normal(4).astype(np.float32)
    ref = {"conv1": [w1, b1], "conv2": [w2], "conv3": [w3], "bn": [mean, var, s],
           "scale": [gamma, beta], "fc": [ip, np.zeros(7, np.float32)], "extra": [b1 * 3]}
    types = {"conv1": "Convolution", "conv2": "Convolution", "conv3": "Convolution",
             "bn": "BatchNorm", "scale": "Scale", "fc": "InnerProduct", "extra": "Bias"}
    hwc = ip.reshape(7, 6, 2, 3).transpose(0, 2, 3, 1).reshape(7, -1)
    cand = {"conv1.weight": w1[:, ::-1], "conv2.weight": w2.transpose(1, 0, 2, 3),
            "conv3.weight": w3[:, :, ::-1, ::-1], "bn.running_mean": var / s,
            "bn.running_var": mean / s, "bn.weight": np.ones(6, np.float32),
            "bn.bias": np.zeros(6, np.float32), "fc.weight": hwc,
            "stray.weight": np.full(3, 2.0, np.float32), "idle.bias": np.zeros(3, np.float32)}
    res = audit(ref, cand, ref_types=types, input_shapes={"fc": (1, 6, 2, 3)},
                reads_input={"conv1": True})
    m = res.mapping
    assert m[("conv1", 0)] == ("conv1.weight", "bgr_rgb_first_conv")
    assert m[("conv1", 1)] == ("conv1", "missing_bias")
    assert m[("conv2", 0)] == ("conv2.weight", "conv_weight_transposed")
    assert m[("conv3", 0)] == ("conv3.weight", "conv_kernel_flipped")
    assert m[("bn", 0)] == ("bn.running_var", "bn_stats_swapped")
    assert m[("bn", 1)] == ("bn.running_mean", "bn_stats_swapped")
    assert m[("bn", 2)] == ("bn", "folded")
    assert m[("scale", 0)] == ("bn.weight", "bn_affine_missing")  # Scale into the BatchNorm2d
    assert m[("scale", 1)] == ("bn.bias", "bn_affine_missing")
    assert m[("fc", 0)] == ("fc.weight", "flatten_order")
    assert m[("fc", 1)] == ("fc", "absent_zero")  # a zero bias dropped loses nothing
    assert ("conv1", 1) in res.unmapped_ref and ("extra", 0) in res.unmapped_ref
    assert res.unmapped_cand == ["stray.weight"] and res.inert_cand == ["idle.bias"]
    assert not res.ok
    d = json.loads(json.dumps(res.to_dict()))
    assert d["ok"] is False and d["counts"]["bn_stats_swapped"] == 2
    assert "conv1 blob0[" in next(c.detail for c in res.checks if c.layer == "conv1")


def test_synthetic_bn_scale_factor_and_hw_transpose_and_differs():
    rng = np.random.default_rng(1)
    mean, var = rng.standard_normal(8).astype(np.float32), rng.random(8).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    ref = {"bn": [mean, var, np.array([50.0], np.float32)], "c": [w], "d": [w * 2]}
    types = {"bn": "BatchNorm", "c": "Convolution", "d": "Convolution"}
    cand = {"bn.running_mean": mean, "bn.running_var": var / 50,
            "c.weight": w.transpose(0, 1, 3, 2), "d.weight": w * 2 + 0.5}
    res = audit(ref, cand, ref_types=types)
    assert res.mapping[("bn", 0)] == ("bn.running_mean", "bn_scale_factor")
    assert res.mapping[("bn", 1)] == ("bn.running_var", "equal")
    assert res.mapping[("c", 0)] == ("c.weight", "conv_kernel_hw_transposed")
    assert res.mapping[("d", 0)] == ("d.weight", "differs")  # tied by name, values wrong
    assert res.checks[-1].max_abs == pytest.approx(0.5, abs=1e-6)


# -- real architectures -----------------------------------------------------------------------
def test_clean_ports_map_equal(resnet20, lenet, resnet50):
    for net, model in ((resnet20, GraphPort(resnet20)), (lenet, GraphPort(lenet)),
                       (resnet50, load_resnet50_from_caffe(resnet50))):
        res = audit_models(net, model)
        assert res.ok, _problems(res)
        assert not res.unmapped_cand and not res.unmapped_ref
    m = res.mapping  # ResNet-50: names differ, values tie them
    assert m[("conv1", 0)] == ("conv1.weight", "equal")
    assert m[("bn_conv1", 0)] == ("bn1.running_mean", "equal")
    assert m[("bn_conv1", 2)] == ("bn1", "folded")
    assert m[("scale_conv1", 0)] == ("bn1.weight", "equal")
    assert m[("res2a_branch1", 0)] == ("layer1.0.downsample.0.weight", "equal")
    assert m[("fc1000", 1)] == ("fc.bias", "equal")


def test_resnet50_bn_not_divided_and_scale_not_merged(resnet50):
    bad = load_resnet50_from_caffe(resnet50, divide_bn=False)
    with torch.no_grad():
        bad.layer3[2].bn2.weight.fill_(1.0)
        bad.layer3[2].bn2.bias.zero_()
    res = audit_models(resnet50, bad)
    probs = _problems(res)
    assert probs[("bn_conv1", 0)] == ("bn1.running_mean", "bn_scale_factor")
    assert probs[("bn_conv1", 1)] == ("bn1.running_var", "bn_scale_factor")
    assert probs[("scale4c_branch2b", 0)] == ("layer3.2.bn2.weight", "bn_affine_missing")
    assert sum(v[1] == "bn_scale_factor" for v in probs.values()) == 2 * 53
    assert len(probs) == 2 * 53 + 2
    report = layerdiff.compare(resnet50, bad, SPEC)
    top = report.findings[0]
    assert top.kind == "bn_scale_factor" and top.layer == "bn_conv1+scale_conv1 <-> bn1"
    assert top.explained > 0.99 and top.error_after <= report.results[1].tolerance
    # one finding per cause and layer (the batchnorm probe's or ours); the audit's count of
    # affected layers is kept on it
    assert "999.98" in top.fix and len(top.data["layers"]) == 53
    at = {(f.kind, f.layer) for f in report.findings}
    assert ("bn_affine_missing", "bn4c_branch2b+scale4c_branch2b <-> layer3.2.bn2") in at


def _flip_bgr(p):
    p.Convolution1.weight.copy_(p.Convolution1.weight.flip(1).clone())


def _swap_affine(p):
    s = p.Scale15
    w = s.weight.clone()
    s.weight.copy_(s.bias)
    s.bias.copy_(w)


def _swap_stats(p):
    b = p.BatchNorm6
    m = b.running_mean.clone()
    b.running_mean.copy_(b.running_var)
    b.running_var.copy_(m)


@pytest.mark.parametrize("plant, kind, layer", [
    (_flip_bgr, "bgr_rgb_first_conv", "Convolution1 <-> Convolution1"),
    (_swap_affine, "bn_affine_swapped", "Scale15 <-> Scale15"),
    (_swap_stats, "bn_stats_swapped", "BatchNorm6 <-> BatchNorm6"),
])
def test_planted_weight_bug_is_top_finding(resnet20, plant, kind, layer):
    port = _port(resnet20, plant)
    static = audit_models(resnet20, port)
    assert {v[1] for v in _problems(static).values()} == {kind}
    report = layerdiff.compare(resnet20, port, SPEC)
    top = report.findings[0]
    assert (top.kind, top.layer) == (kind, layer)
    assert top.explained > 0.99 and top.error_after < 1e-4 < top.error_before
    assert top.evidence and top.fix  # the audit or the batchnorm probe: one finding either way


def test_bgr_hidden_by_constant_input_is_still_reported(resnet20):
    report = layerdiff.compare(resnet20, _port(resnet20, _flip_bgr), "ones:0.5")
    f = next(f for f in report.findings if f.probe == "weight_audit")
    assert f.kind == "bgr_rgb_first_conv" and f.explained is None
    assert "constant input" in f.evidence


def test_two_bugs_at_different_depths(resnet20):
    def both(p):
        _flip_bgr(p)
        _swap_affine(p)

    report = layerdiff.compare(resnet20, _port(resnet20, both), SPEC)
    got = {(f.kind, f.layer) for f in report.findings}
    assert ("bgr_rgb_first_conv", "Convolution1 <-> Convolution1") in got
    assert ("bn_affine_swapped", "Scale15 <-> Scale15") in got
    assert report.findings[0].kind == "bgr_rgb_first_conv"  # reference order


def test_lenet_hwc_flatten_order(lenet):
    def hwc(p):
        w = p.ip1.fc.weight
        w.copy_(w.view(500, 50, 4, 4).permute(0, 2, 3, 1).reshape(500, -1).clone())

    port = _port(lenet, hwc)
    assert _problems(audit_models(lenet, port)) == {("ip1", 0): ("ip1.fc.weight",
                                                                 "flatten_order")}
    report = layerdiff.compare(lenet, port, SPEC)
    top = report.findings[0]
    assert top.kind == "flatten_order" and top.layer.startswith("ip1 <-> ")
    assert top.explained > 0.99
    assert ".view(500, 4, 4, 50).permute(0, 3, 1, 2)" in top.fix


def test_compensated_layout_is_no_finding(lenet):
    """HWC-ordered Linear weights after a permute to NHWC: right, though the audit sees HWC."""

    class NHWCLinear(torch.nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.fc = fc

        def forward(self, x):
            return self.fc(torch.flatten(x.permute(0, 2, 3, 1), 1))

    port = _port(lenet)
    fc = port.ip1.fc
    with torch.no_grad():
        fc.weight.copy_(fc.weight.view(500, 50, 4, 4).permute(0, 2, 3, 1).reshape(500, -1).clone())
    port.ip1 = NHWCLinear(fc)
    assert _problems(audit_models(lenet, port)) == {("ip1", 0): ("ip1.fc.weight",
                                                                 "flatten_order")}
    report = layerdiff.compare(lenet, port, SPEC)
    assert report
    assert not [f for f in report.findings if f.probe == "weight_audit"]


def test_audit_traces_matches_audit_models_and_survives_fp16(resnet20):
    port = _port(resnet20, _swap_stats)
    report = layerdiff.compare(resnet20, port, SPEC, diagnose=False)
    assert audit_traces(report.reference, report.candidate).mapping == \
        audit_models(resnet20, port).mapping
    half = layerdiff.compare(resnet20, GraphPort(resnet20).eval(), SPEC, diagnose=False,
                             cand_options=ModelOptions(dtype="float16"))
    assert audit_traces(half.reference, half.candidate).ok  # equal up to float16 storage


def test_clean_ports_raise_no_audit_finding(resnet20):
    port = GraphPort(resnet20).eval()
    for kw in ({}, {"cand_options": ModelOptions(dtype="float64")},
               {"ref_options": ModelOptions(dtype="float64")}):
        report = layerdiff.compare(resnet20, port, SPEC, **kw)
        assert not [f for f in report.findings if f.probe == "weight_audit"], kw


def test_render(resnet20):
    from rich.console import Console

    res = audit_models(resnet20, _port(resnet20, _swap_affine))
    con = Console(record=True, width=200)
    con.print(render_audit(res))
    text = con.export_text()
    assert "bn_affine_swapped" in text and "Scale15" in text and "differ" in text


# -- CLI --------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    ap = ArgumentParser()
    add_audit_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["audit", *argv])
    try:
        return args.func(args)
    except LayerdiffError as e:
        return e.exit_code


def test_cli_state_dict_and_model_py(lenet, tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save(GraphPort(lenet).state_dict(), good)
    assert _cli([str(CORPUS / "lenet_mnist"), str(good)]) == 0
    assert "all blobs map equal" in capsys.readouterr().out

    bad = GraphPort(lenet)
    with torch.no_grad():
        bad.conv2.weight.copy_(bad.conv2.weight.flip(2, 3).clone())
    model = tmp_path / "port"
    model.mkdir()
    (model / "model.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport layerdiff\n"
        "from ports import GraphPort\n"
        f"def build():\n    return GraphPort(layerdiff.load_caffe("
        f"{str(CORPUS / 'lenet_mnist')!r}))\n")
    torch.save(bad.state_dict(), model / "weights.pt")
    assert _cli([str(CORPUS / "lenet_mnist"), str(model), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    flipped = [b for b in out["blobs"] if b["status"] != "equal"]
    assert [(b["layer"], b["blob"], b["torch"], b["status"]) for b in flipped] == \
        [("conv2", 0, "conv2.weight", "conv_kernel_flipped")]


def test_cli_input_errors(lenet, tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save(GraphPort(lenet).state_dict(), good)
    assert _cli([str(CORPUS / "lenet_mnist"), str(tmp_path / "nope.pth")]) == 2
    proto = tmp_path / "deploy.prototxt"
    proto.write_text((CORPUS / "lenet_mnist" / "deploy.prototxt").read_text())
    assert _cli([str(proto), str(good)]) == 2  # no caffemodel: nothing to audit
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    assert _cli([str(CORPUS / "lenet_mnist"), str(junk)]) == 2
    with pytest.raises(LayerdiffError):
        cmd_audit(Namespace(reference=None, prototxt=None, candidate=str(good), weights=None,
                            cand_weights=None, shape=None, trust_pickle=False, all=False,
                            json=False))


def test_cli_traces(resnet20, tmp_path, capsys):
    report = layerdiff.compare(resnet20, _port(resnet20, _swap_affine), SPEC, diagnose=False)
    ref, cand = tmp_path / "ref.npz", tmp_path / "cand.npz"
    report.reference.save(ref)
    report.candidate.save(cand)
    assert _cli([str(ref), str(cand)]) == 1
    assert "bn_affine_swapped" in capsys.readouterr().out

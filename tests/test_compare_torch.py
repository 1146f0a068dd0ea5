"""compare: Caffe reference vs torch ports (the issue's reported case and its fix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from golden import CORPUS, GOLDEN, load_golden, require_shared
from ports import GraphPort, load_resnet50_from_caffe, resnet50_name_map

import layerdiff
from layerdiff.engine import run_caffe

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def resnet50():
    """Corpus ResNet-50 prototxt with the seed_ones weights (BatchNorm blob 2 = 999.98)."""
    require_shared()
    g = load_golden(GOLDEN / "nets" / "resnet50_seed_ones")
    return g.net


def _compare(net, model, spec="ones:0.5", **kw):
    return layerdiff.compare(net, model, spec, **kw)


def test_bn_scale_factor_not_divided(resnet50):
    bad = load_resnet50_from_caffe(resnet50, divide_bn=False)
    report = _compare(resnet50, bad)
    assert not report
    fd = report.first_divergence
    assert fd.pair.ref_name == "bn_conv1+scale_conv1" and fd.pair.cand_name == "bn1"
    results = {r.pair.ref_name: r for r in report.results}
    assert results["conv1"].passed
    assert fd.metrics.max_abs > 1e3 * fd.tolerance


def test_correct_port_passes_and_aligns_without_map(resnet50):
    good = load_resnet50_from_caffe(resnet50)
    report = _compare(resnet50, good)
    assert report, [(r.pair.ref_name, r.metrics.max_abs, r.tolerance) for r in report.failures]
    al = report.alignment
    assert [r.name for r in al.unaligned_ref] == ["prob"]  # the port has no softmax
    assert not al.unaligned_cand
    pairs = {p.ref[0].name: p for p in al.pairs}
    names = resnet50_name_map()
    for caffe_name, torch_path in names.items():
        if caffe_name.startswith(("res", "bn", "conv")) and caffe_name in pairs:
            assert pairs[caffe_name].cand[0].name == torch_path, caffe_name
    assert pairs["res2a_branch2a"].cand[0].name == "layer1.0.conv1"
    assert pairs["res2a_branch2a"].method == "fingerprint"
    assert [r.name for r in pairs["bn2a_branch2a"].ref] == ["bn2a_branch2a", "scale2a_branch2a"]
    assert pairs["res2a"].cand[0].name == "layer1.0.add"
    assert pairs["res2a_relu"].cand[0].name == "layer1.0.relu#2"


def test_cli_reported_case(resnet50, tmp_path, capsys):
    from layerdiff.cli import main

    model = tmp_path / "torch_port"
    model.mkdir()
    (model / "model.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom ports import CaffeResNet50\n"
        "def build():\n    return CaffeResNet50()\n")
    import torch

    torch.save(load_resnet50_from_caffe(resnet50, divide_bn=False).state_dict(),
               model / "weights.pt")
    trace_path = tmp_path / "caffe.npz"
    ref = run_caffe(resnet50, {"data": np.full((1, 3, 224, 224), 0.5,
                                                                np.float32)})
    ref.save(trace_path)
    code = main(["compare", str(trace_path), str(model), "--summary-only"])
    out = capsys.readouterr().out
    assert code == 1 and "bn_conv1+scale_conv1" in out and "bn1" in out


def test_cifar_resnet20_real_weights_correct_port():
    require_shared()
    net = layerdiff.load_caffe(CORPUS / "cifar10_resnet20_junyuseu", shape=(1, 3, 32, 32))
    port = GraphPort(net).eval()
    report = layerdiff.compare(net, port, "uniform:-1,1:7")
    assert report, [(r.pair.ref_name, r.metrics.max_abs, r.tolerance) for r in report.failures]
    methods = {r.pair.ref_name: r.pair.method for r in report.results}
    assert methods.pop("InnerProduct1") == "fingerprint"  # torch: InnerProduct1.fc (+flatten)
    assert set(methods.values()) == {"exact"}
    assert len(report.results) >= 60
    assert not report.alignment.unaligned_cand and not report.alignment.unaligned_ref

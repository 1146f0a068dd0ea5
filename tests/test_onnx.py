"""ONNX as the third side, on real exports: the demo's ResNet-50 ports and the corpus's CIFAR
ResNet-20 exported with ``torch.onnx.export`` (TorchScript exporter), compared against Caffe and
against torch. Building and exporting ResNet-50 is slow on small machines: once per module."""

from __future__ import annotations

import numpy as np
import pytest
from golden import CORPUS, require_shared
from nets import caffe_net
from onnx_ports import export, require_onnx, set_attribute, set_initializer, to_float16
from ports import GraphPort

require_onnx()

import layerdiff  # noqa: E402
from layerdiff.demo import INPUT, build_scenario, write_correct_port  # noqa: E402

PRECISION = {"precision", "precision_range"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's Caffe ResNet-50 and its ports, exported to ONNX in every form tested here."""
    from layerdiff.adapters.torch import load_torch

    root = tmp_path_factory.mktemp("onnx_demo")
    sc = build_scenario(root / "scenario")
    write_correct_port(sc, sc.fixed)  # the hand-made correct port
    shape = (1, 3, 224, 224)
    buggy = export(load_torch(sc.port), shape, root / "buggy.onnx")
    fixed = export(load_torch(sc.fixed), shape, root / "fixed.onnx")
    folded = export(load_torch(sc.fixed), shape, root / "folded.onnx", fold=True)
    # A converter's two other mistakes in one file: another BN epsilon, floor pooling.
    mutated = set_attribute(fixed, root / "eps.onnx", "/bn1/BatchNormalization", epsilon=0.1)
    mutated = set_attribute(mutated, root / "mutated.onnx", "/maxpool/MaxPool", ceil_mode=0)
    return {"sc": sc, "buggy": buggy, "fixed": fixed, "folded": folded, "mutated": mutated}


def _compare(ref, cand, spec=INPUT, **kw):
    return layerdiff.compare(str(ref), str(cand), spec, **kw)


def _failing(report):
    return [(r.pair.ref_name, r.pair.cand_name, r.metrics.max_abs, r.tolerance)
            for r in report.failures][:5]


def test_caffe_vs_buggy_export_names_bn_and_scale_factor(demo):
    report = _compare(demo["sc"].caffe, demo["buggy"])
    assert not report
    fd = report.first_divergence
    assert fd.pair.ref_name == "bn_conv1+scale_conv1"
    assert fd.pair.cand_name == "/bn1/BatchNormalization"
    assert {r.pair.ref_name: r for r in report.results}["conv1"].passed
    top = report.findings[0]
    assert top.kind == "bn_scale_factor" and top.layer.startswith("bn_conv1+scale_conv1")
    assert "999.982" in top.cause
    assert "bn1.running_mean" in top.evidence and "bn1.running_var" in top.evidence
    assert "numpy_helper.from_array" in top.fix and "/ 999.982" in top.fix
    assert top.explained > 0.99 and top.error_after <= fd.tolerance
    assert all(f.kind not in ("probe_error",) for f in report.findings)
    # one converter loop made all 53: the fix patches every BatchNormalization, and works
    assert "every BatchNormalization of the file (53)" in top.evidence
    assert "layer4.2.bn3.running_var" in top.fix
    exec(top.fix, {})  # noqa: S102 - layerdiff's own output, the point of the test
    repaired = _compare(demo["sc"].caffe, demo["buggy"].with_name("buggy_fixed.onnx"))
    assert repaired, _failing(repaired)


def test_caffe_vs_fixed_export_passes(demo):
    report = _compare(demo["sc"].caffe, demo["fixed"])
    assert report, _failing(report)
    al = report.alignment
    assert [r.name for r in al.unaligned_ref] == ["prob"]  # the port has no softmax
    assert not al.unaligned_cand
    pairs = {p.ref[0].name: p for p in al.pairs}
    assert pairs["res2a_branch2a"].cand[0].name == "/layer1/layer1.0/conv1/Conv"
    assert pairs["res2a_branch2a"].method == "fingerprint"
    assert [r.name for r in pairs["bn2a_branch2a"].ref] == ["bn2a_branch2a", "scale2a_branch2a"]
    assert [c.kind for c in pairs["fc1000"].cand] == ["Flatten", "Gemm"]
    assert not report.findings


def test_torch_vs_its_own_export_every_conv_on_its_module(demo):
    report = _compare(demo["sc"].fixed, demo["fixed"])
    assert report, _failing(report)
    convs = [p for p in report.alignment.pairs if p.cand[0].kind == "Conv"]
    assert len(convs) == 53
    for p in convs:
        assert p.ref_name == p.cand[0].attrs["torch_module"], (p.ref_name, p.cand_name)
        assert p.method == "normalized"
    assert not report.alignment.unaligned_ref and not report.alignment.unaligned_cand


def test_bn_folded_export_aligns_and_passes(demo):
    report = _compare(demo["sc"].caffe, demo["folded"])
    assert report, _failing(report)
    groups = [p for p in report.alignment.pairs if len(p.ref) == 3]
    assert len(groups) == 53  # Convolution + BatchNorm + Scale <-> one Conv
    assert all(p.cand[0].kind == "Conv" and "folded" in p.note for p in groups)
    report = _compare(demo["sc"].fixed, demo["folded"])
    assert report, _failing(report)
    first = report.alignment.pairs[0]
    assert first.ref_name == "conv1+bn1" and first.cand_name == "/conv1/Conv"


def test_eps_and_pooling_mistakes_named_in_onnx_terms(demo):
    report = _compare(demo["sc"].caffe, demo["mutated"])
    assert not report
    assert report.first_divergence.pair.cand_name == "/bn1/BatchNormalization"
    kinds = {f.kind: f for f in report.findings}
    eps = kinds["bn_eps"]
    assert "epsilon = 0.1" in eps.evidence and "make_attribute('epsilon', 1e-05)" in eps.fix
    pool = kinds["pool_ceil_mode"]
    assert pool.layer.startswith("pool1 <-> /maxpool/MaxPool")
    assert "ceil_mode = 0 (Caffe: 1)" in pool.evidence
    assert "make_attribute('ceil_mode', 1)" in pool.fix
    # The two fixes, run as printed, repair the file: it then passes.
    exec(eps.fix, {})  # noqa: S102 - layerdiff's own output, the point of the test
    fixed = demo["mutated"].with_name("mutated_fixed.onnx")
    assert fixed.is_file()
    exec(pool.fix.replace(str(demo["mutated"]), str(fixed)), {})  # noqa: S102
    report = _compare(demo["sc"].caffe, fixed)
    assert report, _failing(report)


# -- the real CIFAR ResNet-20 of the corpus ----------------------------------------------------


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):
    require_shared()
    net = layerdiff.load_caffe(CORPUS / "cifar10_resnet20_junyuseu", shape=(1, 3, 32, 32))
    root = tmp_path_factory.mktemp("onnx_resnet20")
    port = GraphPort(net).eval()
    good = export(port, (1, 3, 32, 32), root / "resnet20.onnx")
    bad = export(GraphPort(net, divide_bn=False).eval(), (1, 3, 32, 32), root / "bad.onnx")
    flipped = set_initializer(good, root / "flipped.onnx", "Convolution1.weight",
                              lambda w: w[:, :, ::-1, ::-1])
    return {"net": net, "port": port, "good": good, "bad": bad, "flipped": flipped,
            "fp16": to_float16(good, root / "fp16.onnx")}


def test_resnet20_export_passes_against_caffe_and_torch(resnet20):
    net, port = resnet20["net"], resnet20["port"]
    report = layerdiff.compare(net, str(resnet20["good"]), "uniform:-1,1:7")
    assert report, _failing(report)
    convs = [p for p in report.alignment.pairs if p.ref[0].kind == "Convolution"]
    n_conv = sum(1 for lay in net.layers if lay.type == "Convolution")
    assert len(convs) == n_conv and all(p.cand[0].kind == "Conv" for p in convs)
    scales = [p for p in report.alignment.pairs if p.ref[-1].kind == "Scale"]
    assert scales and all([c.kind for c in p.cand] == ["Mul", "Add"] for p in scales)
    x = {"data": np.random.default_rng(7).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)}
    report = layerdiff.compare(port, str(resnet20["good"]), x)
    assert report, _failing(report)
    for p in report.alignment.pairs:
        if p.cand[0].kind == "Conv":
            assert p.ref_name == p.cand[0].attrs["torch_module"]


def test_resnet20_bad_export_first_bn(resnet20):
    report = layerdiff.compare(resnet20["net"], str(resnet20["bad"]), "uniform:-1,1:7")
    fd = report.first_divergence
    assert fd.pair.ref_name == "BatchNorm1" and fd.pair.cand[0].kind == "BatchNormalization"
    top = report.findings[0]
    assert top.kind == "bn_scale_factor" and top.layer.startswith("BatchNorm1 <->")
    assert "every BatchNormalization of the file" in top.evidence
    exec(top.fix, {})  # noqa: S102 - the printed fix repairs every BatchNormalization
    repaired = layerdiff.compare(resnet20["net"], str(resnet20["bad"].with_name("bad_fixed.onnx")),
                                 "uniform:-1,1:7")
    assert repaired, _failing(repaired)


def test_float16_graph_is_precision_not_a_bug(resnet20):
    report = layerdiff.compare(resnet20["net"], str(resnet20["fp16"]), "uniform:-1,1:7")
    assert not report  # float16 misses the float32 tolerance ...
    assert report.candidate.meta["dtype"] == "float16"
    kinds = {f.kind for f in report.findings}
    assert kinds and kinds <= PRECISION, [(f.kind, f.layer, f.cause) for f in report.findings]
    assert report.findings[0].kind == "precision"
    assert "float16" in report.findings[0].cause


def test_conv_kernel_flipped_in_the_file(resnet20):
    report = layerdiff.compare(resnet20["net"], str(resnet20["flipped"]), "uniform:-1,1:7")
    fd = report.first_divergence
    assert fd.pair.ref_name == "Convolution1" and fd.pair.cand_name == "/Convolution1/Conv"
    top = report.findings[0]
    assert top.kind == "conv_kernel_flipped" and top.layer.startswith("Convolution1 <->")
    assert "Convolution1.weight" in top.evidence and "[:, :, ::-1, ::-1]" in top.fix
    assert top.error_after <= fd.tolerance


def test_gemm_columns_in_hwc_order(tmp_path):
    rng = np.random.default_rng(3)
    body = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
            'convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" '
            'inner_product_param { num_output: 5 } }\n')
    net = caffe_net(tmp_path, body, {"data": (1, 3, 6, 6)}, {
        "conv": [rng.normal(0, 0.3, (4, 3, 3, 3)), rng.normal(0, 1, 4)],
        "fc": [rng.normal(0, 0.1, (5, 144)), rng.normal(0, 1, 5)]}, dtype=np.float32)
    good = export(GraphPort(net).eval(), (1, 3, 6, 6), tmp_path / "good.onnx")
    assert layerdiff.compare(net, str(good), "uniform:-1,1:1")
    hwc = set_initializer(good, tmp_path / "hwc.onnx", "fc.fc.weight",
                          lambda w: w.reshape(5, 4, 6, 6).transpose(0, 2, 3, 1).reshape(5, -1))
    report = layerdiff.compare(net, str(hwc), "uniform:-1,1:1")
    fd = report.first_divergence
    assert fd.pair.ref_name == "fc" and [c.kind for c in fd.pair.cand] == ["Flatten", "Gemm"]
    top = report.findings[0]
    assert top.kind == "flatten_order" and "fc.fc.weight" in top.fix
    assert "H,W,C order" in top.cause and top.error_after <= fd.tolerance


def test_onnx_vs_its_float16_version(resnet20):
    report = layerdiff.compare(str(resnet20["good"]), str(resnet20["fp16"]), "uniform:-1,1:7")
    assert not report
    assert all(p.method == "exact" for p in report.alignment.pairs)
    kinds = {f.kind for f in report.findings}
    assert kinds and kinds <= PRECISION, [(f.kind, f.layer, f.cause) for f in report.findings]

"""``--fix-out`` on ONNX candidates: the real CIFAR ResNet-20 exported with the converter
mistakes the ONNX probes prove (statistics undivided by Caffe's scale factor, another epsilon, a
flipped kernel) is repaired into a patched copy of the file that passes; the user's file is never
written; what has no ONNX patch is left to the user (exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from cli_checks import cli_fails, snapshot
from golden import CORPUS, require_shared
from onnx_ports import export, require_onnx, set_attribute, set_initializer, to_float16
from ports import GraphPort

onnx = require_onnx()

import layerdiff  # noqa: E402
from layerdiff.cli import main  # noqa: E402
from layerdiff.fix import fix_port  # noqa: E402

SPEC = "uniform:-1,1:7"
REF = CORPUS / "cifar10_resnet20_junyuseu"


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    require_shared()
    net = layerdiff.load_caffe(REF, shape=(1, 3, 32, 32))
    root = tmp_path_factory.mktemp("fix_onnx")
    good = export(GraphPort(net).eval(), (1, 3, 32, 32), root / "resnet20.onnx")
    bad = export(GraphPort(net, divide_bn=False).eval(), (1, 3, 32, 32), root / "bad.onnx")
    eps = set_attribute(good, root / "eps.onnx", "/BatchNorm3/BatchNormalization", epsilon=0.1)
    flipped = set_initializer(good, root / "flipped.onnx", "Convolution1.weight",
                              lambda w: w[:, :, ::-1, ::-1])
    return {"net": net, "root": root, "good": good, "bad": bad, "eps": eps, "flipped": flipped}


def _own_folder(tmp_path, src):
    """``src`` alone in a folder of its own (what the test watches for changes)."""
    folder = tmp_path / "cand"
    folder.mkdir(parents=True)
    dst = folder / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def _repair(r20, tmp_path, which):
    cand = _own_folder(tmp_path, r20[which])
    before = snapshot(cand.parent)
    report = layerdiff.compare(r20["net"], str(cand), SPEC)
    assert not report
    outcome = fix_port(report, tmp_path / "fixed")
    assert snapshot(cand.parent) == before, "the candidate file changed"
    return report, outcome


def _initializer(path, name):
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def test_undivided_bn_statistics_repaired_in_a_copy(r20, tmp_path):
    report, outcome = _repair(r20, tmp_path, "bad")
    assert report.first_divergence.pair.ref_name == "BatchNorm1"
    assert outcome.passed and outcome.written and outcome.rounds == 1, outcome.after.failures[:3]
    [a] = outcome.applied
    assert a.finding.kind == "bn_scale_factor" and a.level == "weights"
    assert len(a.weight_lines) == 42  # every BatchNormalization's mean and var (21 of them)
    assert not outcome.manual
    out = tmp_path / "fixed"
    assert sorted(p.name for p in out.iterdir()) == ["FIXES.md", "bad.onnx"]
    onnx.checker.check_model(str(out / "bad.onnx"))
    net = r20["net"]
    for name in ("BatchNorm1", "BatchNorm21"):
        blobs = [np.asarray(b.data, np.float64).reshape(-1) for b in net.layer(name).blobs]
        got = _initializer(out / "bad.onnx", f"{name}.running_mean")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, blobs[0] / blobs[2][0], rtol=1e-6)
    notes = (out / "FIXES.md").read_text()
    assert "The repaired port passes." in notes and "42 initializer(s) replaced" in notes
    assert "numpy_helper.from_array" in notes  # the printed fix, for the user's own script
    # DIR's file is an ordinary candidate: compared on its own, it passes with no finding
    again = layerdiff.compare(net, str(out / "bad.onnx"), SPEC)
    assert again and not again.findings


def test_epsilon_attribute_and_flipped_kernel_repaired(r20, tmp_path):
    _, outcome = _repair(r20, tmp_path / "eps", "eps")
    assert outcome.passed, outcome.after.failures[:3]
    [a] = outcome.applied
    assert a.finding.kind == "bn_eps" and a.level == "code"
    assert a.code_lines == ["node '/BatchNorm3/BatchNormalization' attribute epsilon = 1e-05"]
    assert a.finding.data["onnx_patch"] == {
        "initializers": [], "attributes": {"/BatchNorm3/BatchNormalization": {"epsilon": 1e-05}}}
    json.dumps(a.finding.to_dict())  # the data form stays JSON
    m = onnx.load(str(tmp_path / "eps" / "fixed" / "eps.onnx"))
    node = next(n for n in m.graph.node if n.name == "/BatchNorm3/BatchNormalization")
    eps = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}["epsilon"]
    assert eps == pytest.approx(1e-5)
    assert "1 node attribute(s) set" in (tmp_path / "eps" / "fixed" / "FIXES.md").read_text()

    _, outcome = _repair(r20, tmp_path / "flip", "flipped")
    assert outcome.passed, outcome.after.failures[:3]
    assert [x.finding.kind for x in outcome.applied] == ["conv_kernel_flipped"]
    np.testing.assert_array_equal(
        _initializer(tmp_path / "flip" / "fixed" / "flipped.onnx", "Convolution1.weight"),
        _initializer(r20["good"], "Convolution1.weight"))


def test_external_data_is_copied_and_the_original_left_alone(r20, tmp_path):
    folder = tmp_path / "cand"
    folder.mkdir()
    cand = folder / "bad.onnx"
    onnx.save(onnx.load(str(r20["bad"])), str(cand), save_as_external_data=True,
              all_tensors_to_one_file=True, location="bad.weights", size_threshold=0)
    before = snapshot(folder)
    report = layerdiff.compare(r20["net"], str(cand), SPEC)
    outcome = fix_port(report, tmp_path / "fixed")
    assert outcome.passed, outcome.after.failures[:3]
    assert snapshot(folder) == before
    # the conv weights stay external (copied), the patched statistics are in the file
    assert (tmp_path / "fixed" / "bad.weights").is_file()


def test_cli_real_process_repairs_an_onnx_export(r20, tmp_path):
    cand = _own_folder(tmp_path, r20["bad"])
    before = snapshot(cand.parent)
    out = tmp_path / "fixed"
    proc = subprocess.run(
        [sys.executable, "-m", "layerdiff", "compare", str(REF), str(cand), "--shape",
         "1,3,32,32", "--input", SPEC, "--summary-only", "--fix-out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())
    assert "the patched .onnx, FIXES.md" in text
    assert "applied bn_scale_factor" in text and "(weights: 42 statements)" in text
    assert "PASS: the repaired port agrees with the reference" in text
    assert snapshot(cand.parent) == before
    assert (out / "bad.onnx").is_file() and (out / "FIXES.md").is_file()


def test_nothing_applicable_exits_1_and_writes_nothing(r20, tmp_path, capsys):
    fp16 = to_float16(r20["good"], tmp_path / "fp16.onnx")
    out = tmp_path / "fixed"
    code = main(["compare", str(REF), str(fp16), "--shape", "1,3,32,32", "--input", SPEC,
                 "--summary-only", "--fix-out", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    assert "nothing written" in text and "manual: precision" in text
    assert not out.exists() or not any(out.iterdir())


def test_refusals_stay_one_line(r20, tmp_path, capsys):
    cand = _own_folder(tmp_path, r20["bad"])
    base = ["compare", REF, cand, "--shape", "1,3,32,32", "--input", SPEC]
    # DIR/bad.onnx would be the candidate, or DIR holds its folder: refused even with --force
    for out in (cand.parent, tmp_path):
        cli_fails(capsys, [*base, "--fix-out", out, "--force"], "overlaps",
                  untouched=cand.parent)
    cli_fails(capsys, [*base, "--fix-out", tmp_path], "not empty", "--force",
              untouched=cand.parent)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cli_fails(capsys, [*base, "--fix-out", full], "not empty", "--force", untouched=full)
    assert main([str(a) for a in base] + ["--summary-only", "--fix-out", str(full),
                                          "--force"]) == 0
    assert (full / "keep.txt").read_text() == "mine" and (full / "bad.onnx").is_file()


def test_merged_findings_keep_both_onnx_patches():
    """The ranking keeps one finding for a cause two probes saw: its data form holds both."""
    from layerdiff.diagnose.finding import Finding
    from layerdiff.diagnose.patch import merge_patch
    from layerdiff.fix.apply import patchable

    def one(name, node):
        f = Finding("bn_eps", "l", "c", "e", "fix", data={"onnx_patch": {
            "initializers": [name], "attributes": {node: {"epsilon": 1e-5}}}},
            patch=f"initializer {name!r} = arrays[{name!r}]\nnode {node!r} attribute epsilon "
                  "= 1e-05", patch_arrays={name: np.zeros(2)})
        return f

    winner, other = one("a", "n1"), one("b", "n2")
    merge_patch(winner, other)
    assert winner.data["onnx_patch"] == {"initializers": ["b", "a"], "attributes": {
        "n2": {"epsilon": 1e-5}, "n1": {"epsilon": 1e-5}}}
    assert sorted(winner.patch_arrays) == ["a", "b"]
    assert patchable([winner, one("a", "n1")]) == ([winner], [])  # covered: dropped


def test_pooling_ceil_mode_repaired(tmp_path):
    """A converter that pooled with floor rounding where Caffe rounds up (``ceil_mode = 0``)."""
    from nets import caffe_net

    rng = np.random.default_rng(5)
    body = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
            'convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n'
            'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" '
            'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
            'layer { name: "conv2" type: "Convolution" bottom: "pool" top: "conv2" '
            'convolution_param { num_output: 2 kernel_size: 1 } }\n')
    net = caffe_net(tmp_path, body, {"data": (1, 3, 8, 8)}, {
        "conv": [rng.normal(0, 0.3, (4, 3, 3, 3)), rng.normal(0, 1, 4)],
        "conv2": [rng.normal(0, 0.5, (2, 4, 1, 1)), rng.normal(0, 1, 2)]}, dtype=np.float32)
    good = export(GraphPort(net).eval(), (1, 3, 8, 8), tmp_path / "good.onnx")
    assert layerdiff.compare(net, str(good), "uniform:-1,1:1")
    pool = next(n.name for n in onnx.load(str(good)).graph.node if n.op_type == "MaxPool")
    cand = _own_folder(tmp_path, set_attribute(good, tmp_path / "floor.onnx", pool,
                                               ceil_mode=0))
    before = snapshot(cand.parent)
    report = layerdiff.compare(net, str(cand), "uniform:-1,1:1")
    assert not report
    outcome = fix_port(report, tmp_path / "fixed")
    assert snapshot(cand.parent) == before
    assert outcome.passed, outcome.after.failures[:3]
    [a] = outcome.applied
    assert a.finding.kind == "pool_ceil_mode" and a.level == "code"
    assert a.code_lines == [f"node {pool!r} attribute ceil_mode = 1"]

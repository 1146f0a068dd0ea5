"""compare/align end to end on Caffe models (both sides run by the engine)."""

from __future__ import annotations

import json
import shutil

import layerdiff
from layerdiff.caffe import caffe_pb2
from layerdiff.cli import main


def _variant(example_dir, tmp_path, edit=None, weights_edit=None, name="cand"):
    d = tmp_path / name
    shutil.copytree(example_dir, d)
    if edit is not None:
        p = d / "deploy.prototxt"
        p.write_text(edit(p.read_text()))
    if weights_edit is not None:
        w = d / "example.caffemodel"
        net = caffe_pb2.NetParameter.FromString(w.read_bytes())
        weights_edit(net)
        w.write_bytes(net.SerializeToString())
    return d


def test_same_model_passes(example_dir):
    report = layerdiff.compare(example_dir, example_dir, "randn:1")
    assert report and report.first_divergence is None
    assert set(report.alignment.methods()) == {"exact"}
    frame = report.to_frame()
    assert len(frame) == len(report.results) == 17 and frame["passed"].all()
    assert (frame["max_abs"] == 0).all()


def test_bn_scale_factor_bug_diverges_at_batchnorm(example_dir, tmp_path):
    def forget_factor(net):  # the port uses s = 1: stored statistics taken as they are
        for lp in net.layer:
            if lp.type == "BatchNorm":
                lp.blobs[2].data[0] = 1.0

    cand = _variant(example_dir, tmp_path, weights_edit=forget_factor)
    report = layerdiff.compare(example_dir, cand, "uniform:-1,1:3")
    assert not report
    fd = report.first_divergence
    assert fd.pair.ref_name == "bn_conv1"
    by_name = {r.pair.ref_name: r for r in report.results}
    assert by_name["conv1"].passed
    assert fd.metrics.max_abs > 100 * fd.tolerance
    # later failures are downstream of the first one: their inputs do not pass
    assert all(not r.inputs_pass for r in report.failures if r is not fd)


def test_floor_pooling_is_a_shape_mismatch(example_dir, tmp_path):
    cand = _variant(example_dir, tmp_path, edit=lambda t: t.replace(
        "pool: MAX kernel_size: 3 stride: 2", "pool: MAX kernel_size: 3 stride: 2 "
        "round_mode: FLOOR"))
    report = layerdiff.compare(example_dir, cand, "randn")
    fd = report.first_divergence
    assert fd.pair.ref_name == "pool1" and not fd.metrics.shape_match
    assert fd.metrics.ref_shape == (1, 8, 16, 16) and fd.metrics.cand_shape == (1, 8, 15, 15)


def test_normalized_names_and_map_file(example_dir, tmp_path):
    def rename_fc(net):
        for lp in net.layer:
            if lp.name == "fc10":
                lp.name = "classifier"

    cand = _variant(example_dir, tmp_path, edit=lambda t: t.replace(
        '"conv1_relu"', '"Conv1/ReLU"').replace('"fc10"', '"classifier"'),
        weights_edit=rename_fc)
    report = layerdiff.compare(example_dir, cand, "randn")
    methods = {r.pair.ref_name: r.pair.method for r in report.results}
    assert methods["conv1_relu"] == "normalized"  # Conv1/ReLU: case and separators folded
    assert methods["fc10"] == "fingerprint"  # renamed, found by its weights
    mapfile = tmp_path / "map.toml"
    mapfile.write_text('[map]\n"fc10" = "classifier"\n"re:(.*)_relu" = "{1}_relu"\n')
    report = layerdiff.compare(example_dir, cand, "randn", map=mapfile)
    methods = {r.pair.ref_name: r.pair.method for r in report.results}
    assert methods["fc10"] == "map" and methods["res2a_relu"] == "map" and report


def test_saved_trace_as_either_side(example_dir, tmp_path, capsys):
    saved = tmp_path / "ref.npz"
    assert main(["run", str(example_dir), "--input", "randn:2", "--save", str(saved)]) == 0
    report = layerdiff.compare(saved, example_dir, "randn:2")
    assert report and len(report.results) == 17
    report = layerdiff.compare(example_dir, saved, "randn:2")
    assert report


def test_cli_exit_codes_and_outputs(example_dir, tmp_path, capsys):
    assert main(["compare", str(example_dir), str(example_dir), "--input", "randn"]) == 0
    cand = _variant(example_dir, tmp_path, edit=lambda t: t.replace(
        "scale_param { bias_term: true } }\nlayer { name: \"conv1_relu\"",
        "scale_param { bias_term: true } }\nlayer { name: \"conv1_relu\""))

    def break_scale(net):
        for lp in net.layer:
            if lp.name == "scale2a_branch2a":
                lp.blobs[0].data[0] *= 1.5

    cand = _variant(example_dir, tmp_path, weights_edit=break_scale, name="cand2")
    csv, js, md = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.md"
    code = main(["compare", str(example_dir), str(cand), "--input", "randn", "--csv", str(csv),
                 "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert code == 1 and "FIRST DIVERGENCE" in out and "scale2a_branch2a" in out
    doc = json.loads(js.read_text())
    assert doc["passed"] is False
    assert doc["first_divergence"]["reference"] == "scale2a_branch2a"
    assert "scale2a_branch2a" in csv.read_text() and md.read_text().startswith("| position")
    code = main(["compare", str(example_dir), str(cand), "--csv", str(csv)])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_fail_fast_and_tolerance_override(example_dir, tmp_path):
    def nudge(net):
        for lp in net.layer:
            if lp.name == "conv1":
                lp.blobs[0].data[0] += 1e-3

    cand = _variant(example_dir, tmp_path, weights_edit=nudge)
    report = layerdiff.compare(example_dir, cand, "randn", fail_fast=True)
    assert not report and report.stopped_early and len(report.results) == 1
    loose = layerdiff.compare(example_dir, cand, "randn", rtol=0.05)
    assert loose, [(r.pair.ref_name, r.metrics.max_abs, r.tolerance) for r in loose.failures]
    mapfile = tmp_path / "tol.toml"
    mapfile.write_text('[tolerance."glob:*"]\nrtol = 0.05\n')
    assert layerdiff.compare(example_dir, cand, "randn", map=mapfile)


def test_constant_input_notes_channel_symmetry(example_dir):
    report = layerdiff.compare(example_dir, example_dir, "ones:0.5")
    assert any("BGR/RGB" in n for n in report.notes)


def test_noise_floor_from_float64_reference(example_dir):
    report = layerdiff.compare(example_dir, example_dir, "randn")
    assert all(r.noise is not None for r in report.results)
    assert any(r.noise > 0 for r in report.results)  # float32 differs from float64 somewhere
    off = layerdiff.compare(example_dir, example_dir, "randn", noise_floor=False)
    assert all(r.noise is None for r in off.results)


def test_align_writes_editable_map(example_dir, tmp_path, capsys):
    target = tmp_path / "m.toml"
    assert main(["align", str(example_dir), str(example_dir), "--write-map", str(target)]) == 0
    text = target.read_text()
    assert '"bn_conv1" = "bn_conv1"  # exact' in text
    report = layerdiff.compare(example_dir, example_dir, "randn", map=target)
    assert set(report.alignment.methods()) == {"map"} and report


def test_bad_map_file(example_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[map\n")
    code = main(["compare", str(example_dir), str(example_dir), "--map", str(bad)])
    assert code == 2 and "bad.toml" in capsys.readouterr().err

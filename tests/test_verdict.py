"""The verdict: first divergence and where the error entered, coverage, one acceptance rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import CORPUS, require_shared
from ports import GraphPort, planted_port
from rich.console import Console
from verdict_ports import Scaled255, extra_relu_before_add, nhwc_lenet, write_example_without

import layerdiff
from layerdiff.cli import main
from layerdiff.diagnose import diagnose
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import PROBES, Probe
from layerdiff.report import explain, summary_panel

SPEC = "uniform:-1,1:3"


@pytest.fixture(scope="module")
def lenet():
    require_shared()
    return layerdiff.load_caffe(CORPUS / "lenet_mnist")


@pytest.fixture(scope="module")
def example():
    return layerdiff.load_caffe(_example_folder())


def _example_folder():
    import tempfile
    from pathlib import Path

    from layerdiff.examples import write_example

    d = Path(tempfile.mkdtemp()) / "example"
    write_example(d)
    return d


def _summary(report) -> str:
    console = Console(width=400, record=True, force_terminal=False)
    console.print(summary_panel(report))
    return console.export_text()


# -- first divergence -------------------------------------------------------------------------


def test_correct_nhwc_lenet_passes_with_no_finding(lenet):
    """ip1 alone, fed Caffe's NCHW blob, is wrong; the port end to end is right."""
    report = layerdiff.compare(lenet, nhwc_lenet(lenet), SPEC)
    assert report, str(report)
    assert report.first_divergence is None and report.entry is None
    assert report.findings == []
    assert "first divergence" not in _summary(report)


def test_error_entering_through_an_extra_relu_is_placed_at_the_add(example):
    report = layerdiff.compare(example, extra_relu_before_add(example), SPEC)
    assert not report
    fd = report.first_divergence
    assert fd.pair.ref_name == "res2a" and fd.pair.cand_name == "res2a"
    assert fd.inputs_pass and fd.local_passed is True  # the add itself is right
    entry = report.entry
    assert entry.inside is False and [r.name for r in entry.cand] == ["branch_relu"]
    line = next(ln for ln in _summary(report).splitlines() if "first divergence" in ln)
    assert ("first divergence: res2a <-> res2a (error entered between its passing inputs and "
            "it, through candidate ops: branch_relu)") in line
    # every pair before it passes; the layers after it inherit the error
    before = [r for r in report.results if r.position < fd.position]
    assert before and all(r.passed for r in before)


def test_error_entering_through_x_times_255_in_forward(example):
    report = layerdiff.compare(example, Scaled255(example).eval(), SPEC)
    fd = report.first_divergence
    assert fd is not None and fd.position == 0 and fd.pair.ref_name.startswith("conv1")
    entry = report.entry
    assert entry.inside is False and len(entry.cand) == 1
    assert entry.cand[0].kind in ("mul", "__mul__"), entry.cand[0]
    assert f"through candidate ops: {entry.cand[0].name}" in entry.text()


def test_error_in_the_pair_itself(example):
    port = planted_port(example, lambda p: p.res2a_branch2b.weight.mul_(1.5))
    report = layerdiff.compare(example, port, SPEC)
    fd = report.first_divergence
    assert fd.pair.ref[0].name == "res2a_branch2b" and fd.local_passed is False
    assert report.entry.inside is True
    assert "(error entered in the pair itself)" in _summary(report)


# -- coverage ---------------------------------------------------------------------------------


def test_port_missing_its_tail_fails(tmp_path, capsys):
    full = _example_folder()
    cut = write_example_without(tmp_path / "cut", {"fc10", "prob"})
    report = layerdiff.compare(full, cut, "randn:0")
    assert all(r.passed for r in report.results) and not report
    assert [r.name for r in report.coverage.not_ported] == ["fc10"]
    assert "not ported: fc10 (InnerProduct)" in str(report)
    assert "prob (Softmax) not compared: the port ends before it" in report.notes
    code = main(["compare", str(full), str(cut), "--input", "randn:0", "--summary-only"])
    out = capsys.readouterr().out
    assert code == 1 and "not ported: fc10 (InnerProduct)" in out
    assert "PASS" not in out


def test_uncompared_softmax_tail_is_a_note_and_extra_candidate_ops_are_named(tmp_path):
    full = _example_folder()
    no_prob = write_example_without(tmp_path / "noprob", {"prob"})
    report = layerdiff.compare(full, no_prob, "randn:0")
    assert report and report.notes[-1] == "prob (Softmax) not compared: the port ends before it"
    back = layerdiff.compare(no_prob, full, "randn:0")
    assert back and not back.coverage.not_ported
    assert back.notes[-1] == "candidate applies 1 op after its last aligned layer: prob"


def test_missing_weighted_layers_in_the_middle_fail(example):
    """A port that skips a conv + BN + Scale in the middle: each is named as not ported."""

    class NoBranch2b(GraphPort):
        def __init__(self, net):
            super().__init__(net)
            gone = {"res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b"}
            self.steps = [(n, ["pool1", "res2a_branch2a"] if n == "res2a" else b, t)
                          for n, b, t in self.steps if n not in gone]

    report = layerdiff.compare(example, NoBranch2b(example).eval(), SPEC)
    assert not report
    assert [r.name for r in report.coverage.not_ported] == [
        "res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b"]
    assert ("not ported: res2a_branch2b (Convolution), bn2a_branch2b (BatchNorm), "
            "scale2a_branch2b (Scale)") in str(report)


# -- one acceptance rule ----------------------------------------------------------------------


def _planted_ports(example):
    yield planted_port(example, lambda p: p.conv1.weight.copy_(p.conv1.weight.flip(1)))
    yield planted_port(example, lambda p: p.bn2a_branch2a.running_var.mul_(999.98))
    yield planted_port(example, lambda p: p.scale_conv1.bias.zero_())
    yield extra_relu_before_add(example)
    yield Scaled255(example).eval()


def test_no_probe_raises_on_planted_ports(example, probe_errors):
    for port in _planted_ports(example):
        report = layerdiff.compare(example, port, SPEC)
        assert not report
        for f in report.findings:
            assert f.kind != "probe_error"
    assert probe_errors.messages() == []


def test_a_raising_probe_is_logged_never_a_finding(example, probe_errors):
    def broken(case):
        raise ValueError("operands could not be broadcast")

    PROBES.append(Probe("broken_for_test", broken))
    try:
        port = planted_port(example, lambda p: p.res2a_branch2b.weight.mul_(1.5))
        report = layerdiff.compare(example, port, SPEC)
    finally:
        PROBES.remove(next(p for p in PROBES if p.name == "broken_for_test"))
    assert not any(f.probe == "broken_for_test" or "broadcast" in f.cause
                   for f in report.findings)
    assert any("broken_for_test" in m and "broadcast" in m for m in probe_errors.messages())


def test_a_finding_that_does_not_remove_the_error_is_ruled_out(example):
    port = planted_port(example, lambda p: p.res2a_branch2b.weight.mul_(1.5))
    report = layerdiff.compare(example, port, SPEC, diagnose=False)
    fd = report.first_divergence
    half = Finding("made_up", f"{fd.pair.ref_name} <-> {fd.pair.cand_name}", "half a fix", "",
                   "do something", 0.5, fd.local.max_abs, fd.local.max_abs / 2, "test")
    wrong = Finding("made_up_far", half.layer, "explains but misses tolerance", "", "x", 0.95,
                    fd.local.max_abs, fd.tolerance * 10 + fd.local.max_abs * 0.05, "test")
    PROBES.append(Probe("made_up", lambda case: [half, wrong]))
    try:
        diagnose(report)
    finally:
        PROBES.remove(next(p for p in PROBES if p.name == "made_up"))
    assert not {"made_up", "made_up_far"} & {f.kind for f in report.findings}
    assert {f.kind for f in report.ruled_out} >= {"made_up", "made_up_far"}
    console = Console(width=400, record=True)
    console.print(explain(report, fd.pair.ref_name))
    text = console.export_text()
    assert "ruled out: made_up (test): its re-run removes 50.0% of the error" in text


def test_passing_port_gets_no_finding(example):
    port = GraphPort(example).eval()
    report = layerdiff.compare(example, port, SPEC)
    assert report and report.findings == [] and report.first_divergence is None


def test_shape_mismatch_is_the_first_divergence(example):
    """A pair with the wrong shape fails end to end and is the first divergence."""
    port = planted_port(example)
    port.pool1 = torch.nn.MaxPool2d(3, 2, ceil_mode=False)
    report = layerdiff.compare(example, port, SPEC)
    fd = report.first_divergence
    assert fd is not None and fd.pair.ref_name == "pool1"
    assert not fd.metrics.shape_match and report.entry.inside is True
    assert np.isnan(fd.metrics.max_abs) or fd.metrics.max_abs > fd.tolerance

"""Reduced precision on the CPU: what a GPU run will show, checked where CI runs.

A float16/bfloat16 candidate of a correct port is labelled "precision, not a bug" with its
measured error, and gets no finding with a fix; a real bug (BatchNorm statistics not divided by
Caffe's factor) inside a bfloat16 port is still found, and not called rounding. TF32 only exists
on CUDA: its label comes from the flags the capture records in the trace meta, patched here.
The device check's verdicts (benchmarks/device_check.py) are checked on the same reports.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from layerdiff.adapters.torch import capture_torch
from ports import GraphPort, planted_port

import layerdiff
from layerdiff.cli import main
from layerdiff.diagnose import diagnose
from layerdiff.diagnose.probes.precision import EPS, reduced_format
from layerdiff.examples import write_example
from layerdiff.report import write_outputs
from layerdiff.sources import ModelOptions

SPEC = "uniform:-1,1:3"
BN = "bn_conv1 <-> bn_conv1"


def _load_device_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod
    spec.loader.exec_module(mod)
    return mod


dc = _load_device_check()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The built-in example: conv/BatchNorm(s = 999.98)/Scale/ReLU/pool, a residual block, fc."""
    d = tmp_path_factory.mktemp("example") / "ex"
    write_example(d)
    return layerdiff.load_caffe(d)


def _doc(report, tmp_path: Path) -> dict:
    """The report as ``compare --json`` writes it (what the device check reads)."""
    js = tmp_path / "report.json"
    write_outputs(report, json_path=str(js), force=True)
    return json.loads(js.read_text())


def _pair(result) -> str:
    return f"{result.pair.ref_name} <-> {result.pair.cand_name}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_correct_port_in_reduced_precision_is_precision_not_a_bug(net, dtype, tmp_path):
    report = layerdiff.compare(net, GraphPort(net).eval(), SPEC,
                               cand_options=ModelOptions(dtype=dtype))
    assert not report  # the rounding does exceed the float32 tolerance ...
    assert report.findings and {f.kind for f in report.findings} == {"precision"}
    for f in report.findings:  # ... and every finding says so, with its numbers
        assert f.data["format"] == dtype and "not a bug" in f.cause
        assert f.fix.startswith("not a bug")
        assert f.error_before > 0 and f"max|d| = {f.error_before:.3g}" in f.evidence
        assert f.data["rel"] < 16 * EPS[dtype]
    labelled = {f.layer for f in report.findings}
    assert _pair(report.first_divergence) in labelled

    doc = _doc(report, tmp_path)
    v = dc.verdict(doc)
    assert v["label"] == f"precision ({dtype}), not a bug" and not v["bugs"]
    assert dc.check("fixed", v, dc.pair_order(doc)) == (True, "")
    err = dc.per_layer_error(doc["pairs"])
    assert err["layers"] == len(report.results)
    assert 0 < err["median_rel"] <= err["max_rel"] < 16 * EPS[dtype]


def test_undivided_batchnorm_statistics_in_a_bfloat16_port(net, tmp_path):
    report = layerdiff.compare(net, GraphPort(net, divide_bn=False).eval(), SPEC,
                               cand_options=ModelOptions(dtype="bfloat16"))
    at_bn = [f for f in report.findings if f.layer == BN]
    assert at_bn and at_bn[0].kind == "bn_scale_factor" and at_bn[0].explained >= 0.99
    assert not [f for f in at_bn if f.kind.startswith("precision")]  # not called rounding
    # before the BatchNorm, only rounding (conv1 in bfloat16), never a cause
    order = [_pair(r) for r in report.results]
    before = {f.kind for f in report.findings if order.index(f.layer) < order.index(BN)}
    assert before <= {"precision"}

    doc = _doc(report, tmp_path)
    v = dc.verdict(doc)
    assert v["label"] == f"bug: bn_scale_factor at {BN} (100%)"
    assert dc.check("buggy", v, dc.pair_order(doc), bug_layer=BN) == (True, "")
    # the same verdict for the fixed port would be a false divergence with a cause
    assert dc.check("fixed", v, dc.pair_order(doc))[0] is False


def test_a_verdict_without_a_label_fails_the_check():
    doc = {"passed": False, "findings": [], "pairs": [],
           "first_divergence": {"reference": "conv1", "candidate": "conv1"}}
    v = dc.verdict(doc)
    assert v["label"] == "divergence, no cause found"
    assert dc.check("fixed", v, [])[0] is False and dc.check("buggy", v, [])[0] is False
    assert dc.verdict(dict(doc, passed=True))["label"] == "pass"


# -- TF32: the label follows the recorded flags ---------------------------------------------------
def _tf32_meta(report, **flags) -> None:
    """What a CUDA capture records (a CPU capture never computes in TF32)."""
    report.candidate.meta.update({"device": "cuda:0", "allow_tf32_cudnn": True,
                                  "allow_tf32_matmul": False, **flags})


def test_tf32_format_from_the_meta(net):
    report = layerdiff.compare(net, GraphPort(net).eval(), SPEC, diagnose=False)
    conv = next(r.pair.cand for r in report.results if r.pair.ref_name == "conv1")
    fc = next(r.pair.cand for r in report.results if r.pair.ref_name == "fc10")
    meta = dict(report.candidate.meta, device="cuda:0", allow_tf32_cudnn=True,
                allow_tf32_matmul=False)
    assert reduced_format(meta, conv) == "tf32"
    assert reduced_format(meta, fc) is None  # cuDNN's flag does not cover matrix products
    assert reduced_format(dict(meta, allow_tf32_matmul=True), fc) == "tf32"
    assert reduced_format(dict(meta, device="cpu"), conv) is None
    assert reduced_format(dict(meta, allow_tf32_cudnn=False), conv) is None


def test_tf32_passing_port_gets_no_finding(net):
    report = layerdiff.compare(net, GraphPort(net).eval(), SPEC, diagnose=False)
    _tf32_meta(report, allow_tf32_matmul=True)
    diagnose(report)
    assert report and report.findings == []


def test_tf32_does_not_hide_a_real_bug(net):
    def flip(p):
        p.conv1.weight.copy_(p.conv1.weight.flip(2, 3).clone())

    report = layerdiff.compare(net, planted_port(net, flip), SPEC, diagnose=False)
    _tf32_meta(report)
    diagnose(report)
    at_conv = [f.kind for f in report.findings if f.layer == "conv1 <-> conv1"]
    assert "conv_kernel_flipped" in at_conv and "precision" not in at_conv


def test_tf32_option_is_recorded_in_the_trace(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.py").write_text(
        "import torch\nINPUT_SHAPE = (1, 2, 5, 5)\n\n\ndef build():\n"
        "    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), "
        "torch.nn.ReLU())\n")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for mode, want in (("on", True), ("off", False)):
            npz = tmp_path / f"{mode}.npz"
            assert main(["run", str(tmp_path / "m"), "--tf32", mode, "--save", str(npz)]) == 0
            meta = layerdiff.Trace.load(npz).meta
            assert meta["allow_tf32_cudnn"] is want and meta["allow_tf32_matmul"] is want
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    capsys.readouterr()


def test_tf32_meta_under_torchs_newer_precision_setting():
    """With ``torch.backends.fp32_precision`` set, torch refuses to read the older allow_tf32
    flags; the capture still records what runs."""
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision setting")
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU())
    x = torch.zeros(1, 2, 5, 5).numpy()
    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = (torch.backends.fp32_precision, mm.fp32_precision, conv.fp32_precision)
    torch.backends.fp32_precision = mm.fp32_precision = "tf32"
    conv.fp32_precision = "ieee"
    try:
        meta = capture_torch(model, x).meta
    finally:
        torch.backends.fp32_precision, mm.fp32_precision, conv.fp32_precision = old
    assert meta["allow_tf32_matmul"] is True and meta["allow_tf32_cudnn"] is False


def test_tf32_switches_work_under_torchs_newer_precision_setting():
    """The precision probe's exact-float32 re-runs and ``--tf32`` write torch's per-backend
    ``fp32_precision`` settings: no raise once ``torch.backends.fp32_precision`` is set, and the
    flags are back as they were afterwards."""
    from layerdiff.adapters.torch_capture import set_tf32, tf32_flags

    from layerdiff.diagnose.probes.precision import tf32_off

    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = (torch.backends.fp32_precision, mm.fp32_precision, conv.fp32_precision)
    torch.backends.fp32_precision = "ieee"
    try:
        set_tf32(True)
        assert tf32_flags() == (True, True)
        with tf32_off():
            assert tf32_flags() == (False, False)
        assert tf32_flags() == (True, True)
        set_tf32(False)
        assert tf32_flags() == (False, False)
    finally:
        torch.backends.fp32_precision, mm.fp32_precision, conv.fp32_precision = old

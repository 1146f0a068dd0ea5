"""``--fix-out``: every planted bug with a proven fix is repaired into a port that passes; the
candidate folder is never written; bugs without a safe patch are listed as manual (exit 1)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_checks import cli_fails, snapshot
from fix_ports import MANUAL, PLANTS, load_net, write_port
from golden import CORPUS, require_shared

import layerdiff
from layerdiff.cli import main
from layerdiff.fix import fix_port

SPEC = "uniform:-1,1:3"


def _repair(tmp_path, kind: str):
    """(report before, outcome) of one planted port, asserting the candidate is untouched."""
    net_name = {**PLANTS, **MANUAL}[kind][0]
    cand = write_port(tmp_path / "cand", kind)
    before = snapshot(cand)
    report = layerdiff.compare(load_net(net_name), str(cand), SPEC)
    outcome = fix_port(report, tmp_path / "fixed")
    assert snapshot(cand) == before, "the candidate folder changed"
    return report, outcome


@pytest.mark.parametrize("kind", list(PLANTS))
def test_planted_bug_is_repaired_and_passes(tmp_path, kind):
    require_shared()
    report, outcome = _repair(tmp_path, kind)
    b, a = outcome.summaries()
    levels = ", ".join(sorted({x.level for x in outcome.applied}))
    print(f"\n| {kind} | {b.first_divergence} | {len(outcome.applied)}: {levels} "
          f"| {outcome.rounds} | {'PASS' if a.passed else 'FAIL'} | {b.cells()[2]} -> "
          f"{a.cells()[2]} |")
    assert outcome.applied and not outcome.manual, [f.kind for f in outcome.manual]
    assert outcome.after, [(r.pair.ref_name, r.metrics.max_abs) for r in outcome.after.failures]
    assert not outcome.after.findings
    out = outcome.out_dir
    assert {"model.py", "weights.pt", "FIXES.md", "original"} <= {p.name for p in out.iterdir()}
    notes = (out / "FIXES.md").read_text()
    assert "The repaired port passes." in notes
    for a in outcome.applied:
        assert f"`{a.finding.kind}`" in notes and a.finding.fix in notes
    # weights.pt is a plain weights-only state dict
    sd = torch.load(out / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    if "rounds" in kind:  # more failing layers than one diagnosis probes
        assert outcome.rounds > 1 and len(outcome.applied) > 8
        assert f"It took {outcome.rounds} rounds" in notes
    if report:  # a passing comparison with a finding (train mode): the fix is still applied
        assert outcome.applied[0].finding.kind == "model_train_mode"


def test_code_level_fix_is_one_commented_line_per_patch(tmp_path):
    require_shared()
    _, outcome = _repair(tmp_path, "bn_eps")
    [a] = outcome.applied
    assert a.level == "code" and not a.weight_lines
    src = (outcome.out_dir / "model.py").read_text()
    assert "# bn_eps at BatchNorm2 <-> BatchNorm2\n" in src
    assert 'model.get_submodule("BatchNorm2").eps = 1e-05' in src


def test_weight_level_fix_changes_only_weights_pt(tmp_path):
    require_shared()
    _, outcome = _repair(tmp_path, "conv_kernel_flipped")
    [a] = outcome.applied
    assert a.level == "weights" and not a.code_lines
    assert "pass  # no code-level fix" in (outcome.out_dir / "model.py").read_text()
    want = torch.from_numpy(np.array(load_net("resnet20").layer("Convolution7").blobs[0].data))
    got = torch.load(outcome.out_dir / "weights.pt", weights_only=True)["Convolution7.weight"]
    assert torch.equal(got, want.reshape(got.shape).float())


def test_no_safe_patch_is_listed_as_manual_and_exits_1(tmp_path, capsys):
    require_shared()
    cand = write_port(tmp_path / "cand", "inline_preprocessing")
    before = snapshot(cand)
    code = main(["compare", str(CORPUS / "cifar10_full"), str(cand), "--shape", "1,3,32,32",
                 "--input", SPEC, "--summary-only", "--fix-out", str(tmp_path / "fixed")])
    out = capsys.readouterr().out
    assert code == 1
    assert "manual: input_channel_order" in out and "nothing written" in out
    assert not (tmp_path / "fixed").exists()
    assert snapshot(cand) == before


def test_manual_bug_listed_while_the_others_are_applied(tmp_path, capsys):
    """A flipped conv1 (patched) and a functional pooling call (no patch): the conv is fixed,
    the pooling is listed as manual, and the repaired port now first diverges there."""
    require_shared()
    report, outcome = _repair(tmp_path, "flipped conv1 + functional pool3")
    assert report.first_divergence.pair.ref_name == "conv1"
    assert [a.finding.kind for a in outcome.applied] == ["bgr_rgb_first_conv"]
    assert [f.kind for f in outcome.manual] == ["pool_padding_vs_ceil"]
    assert not outcome.passed
    assert outcome.after.first_divergence.pair.ref_name == "pool3"
    notes = (outcome.out_dir / "FIXES.md").read_text()
    assert "still diverges" in notes and "Left to you" in notes and "pool_padding_vs_ceil" in notes


def test_cli_real_resnet20_undivided_bn_stats_repaired(tmp_path):
    """The real CIFAR ResNet-20 weights, a port that copied every BatchNorm's statistics
    without dividing by blob 2: one real `layerdiff compare --fix-out` process repairs it."""
    require_shared()
    cand = write_port(tmp_path / "cand", "bn_scale_factor (undivided, every BN)")
    before = snapshot(cand)
    out = tmp_path / "fixed"
    proc = subprocess.run(
        [sys.executable, "-m", "layerdiff", "compare", str(CORPUS / "cifar10_resnet20_junyuseu"),
         str(cand), "--shape", "1,3,32,32", "--input", SPEC, "--summary-only",
         "--fix-out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", proc.stdout).split())  # no box lines
    # every BatchNorm's mean and var, not only the diagnosed layers'
    assert "applied bn_scale_factor at BatchNorm1 <-> BatchNorm1 (weights: 42 statements)" in text
    assert "1/93" in text and "after none 93/93" in text  # before / after rows
    assert "PASS: the repaired port agrees with the reference" in text
    assert snapshot(cand) == before
    # DIR is an ordinary port folder: compare it on its own, it passes with no finding
    again = layerdiff.compare(load_net("resnet20"), str(out), SPEC)
    assert again and not again.findings
    # 19 BatchNorms, each divided by its own blob 2 (999.98 after training)
    sd = torch.load(out / "weights.pt", weights_only=True)
    net = load_net("resnet20")
    for name in ("BatchNorm1", "BatchNorm19"):
        blobs = [np.asarray(b.data, np.float64) for b in net.layer(name).blobs]
        want = blobs[0].reshape(-1) / blobs[2].reshape(-1)[0]
        np.testing.assert_allclose(sd[f"{name}.running_mean"].numpy(), want, rtol=1e-6)


def test_report_fix_api_returns_the_new_report(tmp_path):
    require_shared()
    cand = write_port(tmp_path / "cand", "missing_bias (conv)")
    report = layerdiff.compare(load_net("lenet"), str(cand), SPEC)
    assert not report
    fixed = report.fix(tmp_path / "fixed")
    assert fixed and fixed is not report and report.fixes.after is fixed
    assert report.fixes.applied[0].level == "code"  # bias=None -> a new Parameter
    assert "m.bias = torch.nn.Parameter" in (tmp_path / "fixed" / "model.py").read_text()
    from layerdiff.html import to_html

    page = to_html(report)  # the HTML report of the comparison gets a fixes section
    assert "<h2>Fixes</h2>" in page and "the repaired port agrees" in page
    assert "missing_bias" in page and "m.bias = torch.nn.Parameter" in page


def _failing_lenet(tmp_path):
    cand = write_port(tmp_path / "cand", "flatten_order")
    return cand, str(CORPUS / "lenet_mnist")


def test_refuses_a_non_empty_out_dir_unless_forced(tmp_path, capsys):
    require_shared()
    cand, ref = _failing_lenet(tmp_path)
    out = tmp_path / "fixed"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli_fails(capsys, ["compare", ref, cand, "--input", SPEC, "--fix-out", out],
              "--fix-out", "not empty", "--force", untouched=tmp_path)
    assert main(["compare", ref, str(cand), "--input", SPEC, "--summary-only", "--fix-out",
                 str(out), "--force"]) == 0
    assert (out / "FIXES.md").is_file()
    assert (out / "keep.txt").read_text() == "mine"  # --force replaces only what a fix writes


def test_refuses_out_dir_inside_the_candidate(tmp_path, capsys):
    require_shared()
    cand, ref = _failing_lenet(tmp_path)
    cli_fails(capsys, ["compare", ref, cand, "--fix-out", cand / "fixed"], "overlaps",
              untouched=cand)


def test_refuses_a_saved_trace_and_an_archive(tmp_path, capsys):
    require_shared()
    report = layerdiff.compare(load_net("lenet"), str(_failing_lenet(tmp_path)[0]), SPEC,
                               diagnose=False)
    trace = tmp_path / "cand.npz"
    report.candidate.save(trace)
    ref = str(CORPUS / "lenet_mnist")
    cli_fails(capsys, ["compare", ref, trace, "--fix-out", tmp_path / "o"],
              "nothing to patch in a trace", untouched=tmp_path)
    archive = tmp_path / "arch"
    archive.mkdir()
    torch.save(torch.nn.Linear(2, 2).state_dict(), archive / "port.pt")
    cli_fails(capsys, ["compare", ref, archive, "--fix-out", tmp_path / "o"], "model.py",
              untouched=tmp_path)
    cli_fails(capsys, ["compare", ref, ref, "--fix-out", tmp_path / "o"],
              "cannot repair caffe candidates", untouched=tmp_path)
    assert not (tmp_path / "o").exists()


def test_layering_fix_sits_above_comparator_and_diagnosis():
    """layerdiff.fix imports the comparator and the diagnosis, never the reverse (Report.fix
    imports it lazily, inside the method)."""
    import ast
    from pathlib import Path

    root = Path(layerdiff.__file__).parent
    lower = [root / "comparator.py", root / "metrics.py", root / "trace.py",
             *(root / "diagnose").rglob("*.py"), *(root / "align").rglob("*.py")]
    for path in lower:
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + \
            [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("layerdiff.fix")], path
        if path.parent.name in ("diagnose", "probes"):
            text = path.read_text()  # not even a lazy import in the diagnosis
            assert "from layerdiff.fix" not in text and "import layerdiff.fix" not in text, path


def test_patch_statements_are_sorted_by_what_they_change():
    """Tensor values only -> weight-level; attributes, mode, new parameters -> code-level; a
    repeated statement changes nothing the second time it is counted against."""
    from torch import nn

    from layerdiff.diagnose.finding import Finding
    from layerdiff.diagnose.patch import Patch, module_patch
    from layerdiff.fix.apply import apply_patches, patchable

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-3))
    fixed.load_state_dict(model.state_dict())
    with torch.no_grad():
        fixed[0].weight.copy_(model[0].weight.flip(2, 3))
        fixed[0].bias = nn.Parameter(torch.ones(4))
        fixed[1].running_mean.fill_(2.0)
    conv, bn = module_patch("0", model[0], fixed[0]), module_patch("1", model[1], fixed[1])
    f1 = conv.attach(Finding("conv_kernel_flipped", "a", "c", "e", "fix"))
    f2 = bn.attach(Finding("bn_eps", "b", "c", "e", "fix"))
    f3 = Finding("model_train_mode", "", "c", "e", "model.eval()", patch="model.eval()")
    manual = Finding("concat_order", "d", "c", "e", "torch.cat([b, a])")
    auto, left = patchable([f1, f2, f3, manual, f2])
    assert auto == [f1, f2, f3] and left == [manual]
    done = apply_patches(model, auto)
    assert [a.level for a in done] == ["code+weights", "code+weights", "code"]
    assert len(done[0].weight_lines) == 1 and "bias" in done[0].code_lines[0]
    assert "eps = 0.001" in done[1].code_lines[0] and "running_mean" in done[1].weight_lines[0]
    assert torch.equal(model[0].weight, fixed[0].weight) and model[1].eps == 1e-3
    assert not model.training
    # the JSON form names the arrays, never holds them
    assert f1.to_dict()["patch_arrays"] == ["0.bias", "0.weight"]
    unsafe = Patch()
    unsafe.set_attr("x", "not an identifier", 1)
    assert unsafe.attach(Finding("k", "l", "c", "e", "fix")).patch == ""

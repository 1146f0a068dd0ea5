"""``layerdiff demo``: the reported story from the package alone, and the files it leaves."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from golden import CORPUS, require_shared
from rich.console import Console

import layerdiff
from layerdiff import demo
from layerdiff.cli import main
from layerdiff.demo.resnet50 import BN_FACTOR, resnet50_prototxt


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One full demo (about 10 s), kept in a folder, with its printed output."""
    root = tmp_path_factory.mktemp("demo") / "kept"
    buf = io.StringIO()
    code = demo.run_demo(root, Console(file=buf, width=160, highlight=False))
    return code, buf.getvalue(), root


def test_demo_tells_the_story(demo_run):
    code, text, root = demo_run
    assert code == 0, text
    assert re.search(r"1 +│ bn_conv1\+scale_conv1 +│ bn1 .*FIRST DIVERGENCE", text), text
    assert "DIVERGENCE: 1 of 174 aligned layers agree" in text
    # step 3: --fix-out repairs the port and the repaired port passes
    # all 53 BatchNorms (mean and var), not only the diagnosed ones
    assert "applied bn_scale_factor at bn_conv1+scale_conv1 <-> bn1 (weights: 106 statements)" \
        in text
    assert "PASS: the repaired port agrees with the reference (174 aligned layers)" in text
    assert re.search(r"after +│ none +│ 174/174", text), text
    assert "as expected" in text and re.search(r"demo wall time \d+\.\ds", text)
    # the diagnosis says why, with the fix
    assert "bn_scale_factor" in text and "999.98" in text
    assert "bn_scale_factor" in (root / "report.html").read_text()
    # how to rerun each step by hand, and where the files are
    assert f"cd {root}" in text
    assert "layerdiff compare caffe_resnet50 torch_port --input uniform:-1,1:0" in text
    assert ("layerdiff compare caffe_resnet50 torch_port --input uniform:-1,1:0 --fix-out "
            "torch_port_fixed --force") in text


def test_demo_files(demo_run):
    _, _, root = demo_run
    for rel in ("caffe_resnet50/deploy.prototxt", "caffe_resnet50/resnet50.caffemodel",
                "torch_port/model.py", "torch_port/weights.pt", "torch_port_fixed/model.py",
                "torch_port_fixed/weights.pt", "torch_port_fixed/FIXES.md",
                "torch_port_fixed/original/model.py", "report.html"):
        assert (root / rel).is_file(), rel
    # the port's model.py is standalone: torch only, no layerdiff import
    assert "layerdiff" not in (root / "torch_port" / "model.py").read_text().split('"""')[2]
    page = (root / "report.html").read_text()
    assert "bn_conv1+scale_conv1" in page and 'class="first"' in page
    assert "The repaired port passes." in (root / "torch_port_fixed" / "FIXES.md").read_text()
    assert "<h2>Fixes</h2>" in page and "the repaired port agrees" in page


def test_demo_batchnorm_statistics_are_realistic(demo_run):
    """Stored x s with s in blob 3, and calibrated: bn_conv1 normalises the demo input."""
    _, _, root = demo_run
    net = layerdiff.load_caffe(root / "caffe_resnet50")
    bns = [lay for lay in net.layers if lay.type == "BatchNorm"]
    assert len(bns) == 53
    for lay in bns:
        assert lay.blobs[2].data[0] == pytest.approx(BN_FACTOR)
    mean = net.layer("bn_conv1").blobs[0].data
    assert np.abs(mean).max() > 10  # stored multiplied by ~1000
    from layerdiff.engine import run_caffe
    from layerdiff.inputs import make_inputs, parse_specs

    x = make_inputs(parse_specs(demo.INPUT), dict(net.inputs))
    trace = run_caffe(net, x)
    y = trace["bn_conv1"].output.astype(np.float64)
    assert np.abs(y.mean(axis=(0, 2, 3))).max() < 1e-3
    assert np.abs(y.std(axis=(0, 2, 3)) - 1).max() < 1e-3
    # deep in the net activations stay in a trained network's range (no blow-up, no collapse)
    for name in ("res3a", "res4a", "res5c"):
        s = float(trace[name].output.std())
        assert 0.3 < s < 10, (name, s)


def test_demo_rerun_commands(demo_run, capsys):
    """The printed commands work as printed (from the kept folder)."""
    _, _, root = demo_run
    code = main(["compare", str(root / "caffe_resnet50"), str(root / "torch_port"),
                 "--input", demo.INPUT, "--summary-only"])
    out = capsys.readouterr().out
    assert code == 1 and "first divergence: bn_conv1+scale_conv1 <-> bn1" in out


def test_prototxt_is_kaiminghe_resnet50():
    require_shared()
    assert resnet50_prototxt() == (CORPUS / "resnet50_kaiminghe" / "deploy.prototxt").read_text()


def test_demo_keep_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(["demo", "--keep", str(tmp_path)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_demo_without_keep_cleans_up(monkeypatch):
    seen: list[Path] = []

    def fake_run(root, kept, console, t0):
        (root / "file").write_text("x")
        seen.append(root)
        assert not kept
        return 0

    monkeypatch.setattr(demo, "_run", fake_run)
    assert demo.run_demo(None, Console(file=io.StringIO())) == 0
    assert seen and not seen[0].exists()

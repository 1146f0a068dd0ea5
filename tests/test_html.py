"""The self-contained HTML report: content, no external resources, renders in a real Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from ports import GraphPort

import layerdiff
from layerdiff.cli import main
from layerdiff.diagnose.finding import Finding
from layerdiff.html import group_findings, to_html, write_html

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                  "--v=0"]


@pytest.fixture
def buggy_report(example_dir):
    net = layerdiff.load_caffe(example_dir)
    report = layerdiff.compare(net, GraphPort(net, divide_bn=False).eval(), "randn:0")
    # A finding of each shape, whatever probes are installed: per-layer, a repeat, model-wide.
    report.findings = [
        Finding("bn_scale_factor", "bn_conv1+scale_conv1 <-> bn_conv1",
                "BatchNorm statistics copied without dividing by the scale factor <s>",
                "running_mean[0] = 12.3 equals blob0[0]", "bn.running_mean /= 999.98",
                1.0, 11.7, 9.5e-7, "test"),
        Finding("bn_scale_factor", "bn2a_branch2a+scale2a_branch2a <-> bn2a_branch2a",
                "same", "running_mean[1] = 3.2", "bn2a.running_mean /= 999.98", 1.0, 5.0, 1e-6,
                "test"),
        Finding("train_mode", "", "the model arrived in train mode", "2 BatchNorm layers",
                "model.eval()", None, None, None, "test"),
    ]
    return report


def test_html_content(buggy_report):
    page = to_html(buggy_report)
    fd = buggy_report.first_divergence
    assert fd.pair.ref_name == "bn_conv1"  # GraphPort keeps BatchNorm and Scale apart
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "DIVERGENCE" in page and "first divergence" in page
    # one table row per aligned pair, the first divergence marked
    assert len(re.findall(r'<tr id="pair-\d+"', page)) == len(buggy_report.results)
    assert f'<tr id="pair-{fd.position}" class="first">' in page
    # findings: grouped (the repeat folds into the first card), escaped, model-wide separate
    assert page.count('class="card finding"') == 2
    assert "the same cause at 1 more place(s)" in page
    assert "&lt;s&gt;" in page and "<s>" not in page
    assert "bn.running_mean /= 999.98" in page and "model-wide" in page
    # the chart: propagated points for every pair, local markers, noise band, tolerance
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count("<circle") == len(buggy_report.results)
    assert "<polygon" in svg and "stroke-dasharray" in svg and "first divergence:" in svg


def test_html_is_self_contained(buggy_report):
    page = to_html(buggy_report)
    for banned in ("<script", "<link", "<iframe", "<img", "@import", "url(", " src="):
        assert banned not in page, banned
    # the only URL is the SVG namespace, which is a name and never fetched
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_html_passing_report(example_dir):
    net = layerdiff.load_caffe(example_dir)
    report = layerdiff.compare(net, GraphPort(net).eval(), "randn:0")
    page = to_html(report)
    assert report and "PASS" in page and "Findings" not in page
    assert "first divergence:" not in page


def test_group_findings_keeps_order_and_folds_repeats():
    a = Finding("k1", "L1", "c", "e", "f")
    b = Finding("k2", "", "model", "e", "f")
    c = Finding("k1", "L2", "c", "e", "f")
    d = Finding("k1", "L1", "c again", "e", "f")
    assert group_findings([a, b, c, d]) == [(a, [c]), (b, [])]


def test_write_html_refuses_existing(buggy_report, tmp_path):
    target = tmp_path / "r.html"
    target.write_text("keep me")
    with pytest.raises(layerdiff.LayerdiffError, match="already exists"):
        write_html(buggy_report, target)
    assert target.read_text() == "keep me"
    write_html(buggy_report, target, force=True)
    assert target.read_text().startswith("<!doctype html>")


def test_cli_html(example_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    args = ["compare", str(example_dir), str(example_dir), "--input", "randn:1",
            "--summary-only", "--html", str(out)]
    assert main(args) == 0
    assert out.is_file() and "PASS" in out.read_text()
    assert f"wrote {out}" in capsys.readouterr().out.replace("\n", "")
    assert main(args) == 2  # refused: exists
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


# -- a real browser ---------------------------------------------------------------------------
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "chromium not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " and CI=true: .ci/run installs it")
        pytest.skip(msg)
    return exe


def _run_chromium(exe: str, page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    profile.mkdir()
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra,
                           page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)


def _console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message (errors, CSP violations, failed loads) as CONSOLE.
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def test_console_detection_works(tmp_path):
    """The check below can see errors: a page with a script error and a blocked load."""
    exe = _chromium()
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><meta http-equiv='Content-Security-Policy' "
                    "content=\"default-src 'none'; script-src 'unsafe-inline'\">"
                    "<script>console.error('deliberate')</script>"
                    "<img src='https://example.invalid/x.png'>")
    run = _run_chromium(exe, page, tmp_path, "--dump-dom")
    lines = _console_lines(run.stderr)
    assert any("deliberate" in ln for ln in lines), run.stderr[-2000:]
    assert any("Content Security Policy" in ln for ln in lines), run.stderr[-2000:]


def test_html_renders_in_chromium(buggy_report, tmp_path):
    exe = _chromium()
    page = write_html(buggy_report, tmp_path / "report.html")
    dom = _run_chromium(exe, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_lines(dom.stderr) == []
    assert "<svg" in dom.stdout and 'class="first"' in dom.stdout
    shot = tmp_path / "report.png"
    run = _run_chromium(exe, page, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600",
                        "--hide-scrollbars")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_lines(run.stderr) == []
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 1600)
    assert len(png) > 30_000  # a blank page compresses to a few KB
    print(f"screenshot: {shot}")


def test_html_shape_mismatch_is_charted(example_dir):
    """Pairs without an error value (shapes differ) still show: a cross on the top edge."""
    import torch

    net = layerdiff.load_caffe(example_dir)
    port = GraphPort(net).eval()
    port.pool1 = torch.nn.MaxPool2d(3, 2, ceil_mode=False)  # Caffe rounds up: 16x16 vs 15x15
    report = layerdiff.compare(net, port, "randn:0")
    bad = [r for r in report.results if not r.metrics.shape_match]
    assert bad and report.first_divergence is bad[0]
    page = to_html(report)
    assert page.count("<path d=") == len(bad)
    assert "shapes differ (no error value)" in page and "shape [1, 8, 16, 16] vs" in page

"""``layerdiff demo``: the reported story, end to end, from the package alone.

A Caffe ResNet-50 (KaimingHe's deploy definition, generated in code, with weights whose
BatchNorm statistics are measured on the demo input) and a torchvision-style PyTorch port of
it whose weight converter copied the BatchNorm running statistics without dividing by Caffe's
moving-average scale factor (the third BatchNorm blob, 999.98). ``compare`` finds the first
divergence at the first BatchNorm group (``bn_conv1``/``scale_conv1`` <-> ``bn1``) and the
diagnosis says why; ``--fix-out`` then writes the repaired port and it passes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from layerdiff.errors import LayerdiffError

#: The demo input: deterministic, and random so every channel differs (a constant input
#: cannot reveal a channel swap and makes BatchNorm divide by near-zero variances).
INPUT = "uniform:-1,1:0"
#: Where the bug shows first.
EXPECTED_FIRST = ("bn_conv1+scale_conv1", "bn1")


@dataclass
class Scenario:
    root: Path
    #: Caffe model directory: deploy.prototxt + resnet50.caffemodel
    caffe: Path
    #: the buggy torch port: model.py + weights.pt
    port: Path
    #: where ``--fix-out`` writes the repaired port (not built: the demo repairs into it)
    fixed: Path
    input: str = INPUT


def build_scenario(root: str | Path, size: int = 224, seed: int = 0) -> Scenario:
    """Write the Caffe model and the buggy torch port into ``root`` (new or empty)."""
    import numpy as np
    import torch

    from layerdiff.caffe import load_caffe
    from layerdiff.demo.resnet50 import (
        resnet50_prototxt,
        resnet50_state_dict,
        resnet50_weights,
        write_caffemodel,
    )
    from layerdiff.inputs import make_inputs, parse_specs

    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise LayerdiffError(f"{root}: exists and is not an empty directory; choose another")
    sc = Scenario(root, root / "caffe_resnet50", root / "torch_port", root / "torch_port_fixed")
    sc.caffe.mkdir(parents=True)
    (sc.caffe / "deploy.prototxt").write_text(resnet50_prototxt(size))
    net = load_caffe(sc.caffe / "deploy.prototxt")
    # The same array compare will feed (make_inputs draws float64, then casts).
    data = make_inputs(parse_specs(sc.input), dict(net.inputs))["data"].astype(np.float32)
    weights = resnet50_weights(net, data, seed=seed)
    write_caffemodel(sc.caffe / "resnet50.caffemodel", weights,
                     {lay.name: lay.type for lay in net.layers})
    model_py = Path(__file__).with_name("torch_resnet50.py").read_text()
    sc.port.mkdir()
    (sc.port / "model.py").write_text(model_py)
    # The eps is Caffe's default 1e-5, torch's too: the state_dict is the whole port.
    torch.save(resnet50_state_dict(net, divide_bn=False), sc.port / "weights.pt")
    return sc


def write_correct_port(sc: Scenario, dest: str | Path | None = None) -> Path:
    """A hand-made correct port (BatchNorm statistics divided by s) of the scenario's Caffe
    model, for tests and benchmarks; the demo itself repairs the buggy port instead."""
    import torch

    from layerdiff.caffe import load_caffe
    from layerdiff.demo.resnet50 import resnet50_state_dict

    out = Path(dest) if dest is not None else sc.root / "torch_port_correct"
    out.mkdir(parents=True)
    (out / "model.py").write_text((sc.port / "model.py").read_text())
    net = load_caffe(prototxt=sc.caffe / "deploy.prototxt",
                     weights=sc.caffe / "resnet50.caffemodel")
    torch.save(resnet50_state_dict(net, divide_bn=True), out / "weights.pt")
    return out


def run_demo(keep: str | Path | None = None, console: Console | None = None) -> int:
    """Build the scenario, compare the buggy port, repair it with ``--fix-out`` and compare
    the repaired port. 0 when it went as told."""
    console = console or Console(highlight=False)
    t0 = time.perf_counter()
    tmp = None
    if keep is None:
        tmp = tempfile.mkdtemp(prefix="layerdiff-demo-")
        root = Path(tmp)
    else:
        root = Path(keep).resolve()
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LayerdiffError(f"{root}: exists and is not an empty directory; choose another")
    import torch

    # One torch thread: the comparison and its diagnosis run hundreds of small per-layer ops,
    # where waking (spin-waiting) OpenMP threads costs more than it saves: measured on 2 cores,
    # the demo takes ~6 s single-threaded and ~12 s with default threads (BLAS: scripts/demo.sh).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(root, keep is not None, console, t0)
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(root: Path, kept: bool, console: Console, t0: float) -> int:
    from layerdiff.html import write_html

    console.print("[bold]layerdiff demo[/]: a Caffe ResNet-50 and its PyTorch port disagree. "
                  "Where, by how much, and why?\n")
    console.print(f"[bold]1/3[/] build the scenario in {root}")
    t = time.perf_counter()
    sc = build_scenario(root)
    console.print(f"  caffe_resnet50/     KaimingHe's ResNet-50 deploy prototxt (224x224) and a "
                  f"caffemodel whose BatchNorm\n"
                  f"                      statistics were measured on the demo input, stored "
                  f"x999.98 (the third blob)\n"
                  f"  torch_port/         torchvision-style model.py + weights.pt; its converter "
                  f"copied the BatchNorm\n"
                  f"                      running mean/var as stored, not divided by the third "
                  f"blob\n"
                  f"  [dim]({time.perf_counter() - t:.1f}s)[/]\n")

    html = sc.root / "report.html"
    cmd_bad = (f"layerdiff compare caffe_resnet50 torch_port --input {sc.input} "
               f"--html report.html")
    console.print(f"[bold]2/3[/] [cyan]$ {cmd_bad}[/]")
    t = time.perf_counter()
    bad = _compare(sc.caffe, sc.port, sc.input)
    console.print(_head_table(bad))
    _summary(bad, console)
    console.print(f"  [dim]({time.perf_counter() - t:.1f}s; the full table: run the command "
                  "by hand or open report.html)[/]\n")

    cmd_fixed = (f"layerdiff compare caffe_resnet50 torch_port --input {sc.input} "
                 f"--fix-out torch_port_fixed")
    console.print(f"[bold]3/3[/] apply the proven fix and compare again: [cyan]$ {cmd_fixed}[/]")
    t = time.perf_counter()
    outcome = _repair(bad, sc.fixed, console)
    write_html(bad, html, title="layerdiff demo: Caffe ResNet-50 vs the buggy torch port")
    console.print(f"  [dim]({time.perf_counter() - t:.1f}s; torch_port_fixed/FIXES.md says what "
                  "changed)[/]\n")
    fixed = outcome.after

    fd = bad.first_divergence
    where = (fd.pair.ref_name, fd.pair.cand_name) if fd is not None else None
    ok = not bad and where == EXPECTED_FIRST and outcome.written and bool(fixed)
    total = time.perf_counter() - t0
    if kept:
        console.print(f"files kept in [bold]{sc.root}[/] (report.html: the HTML report). "
                      "Rerun each step by hand:")
        console.print(f"  cd {sc.root}\n"
                      f"  layerdiff inspect caffe_resnet50        # the model and its port traps\n"
                      f"  {cmd_bad} --force\n  {cmd_fixed} --force\n"
                      f"  layerdiff align caffe_resnet50 torch_port   # how the names paired")
    else:
        console.print("files removed; [bold]layerdiff demo --keep DIR[/] keeps them (and the "
                      "HTML report) to rerun each step by hand:")
        console.print(f"  layerdiff demo --keep DIR && cd DIR\n  {cmd_bad} --force\n"
                      f"  {cmd_fixed} --force")
    verdict = ("[green]as expected[/]: the first divergence is the first BatchNorm group and "
               "the repaired port passes" if ok else
               f"[red]unexpected[/]: first divergence {where}, repaired port "
               f"{'passes' if fixed else 'fails'}")
    console.print(f"\n{verdict} (demo wall time {total:.1f}s)")
    return 0 if ok else 1


def _compare(ref: Path, cand: Path, spec: str):
    """``compare`` as the command runs it, with its progress bar (on stderr, transient)."""
    from layerdiff.api import compare
    from layerdiff.progress import progress_bar

    bar, progress = progress_bar(Console(stderr=True, highlight=False))
    with bar:
        return compare(str(ref), str(cand), spec, progress=progress)


def _repair(report, out: Path, console: Console):
    """``--fix-out`` as the command runs it: repair, compare again, print before/after."""
    from layerdiff.fix import fix_port
    from layerdiff.fix.show import show
    from layerdiff.progress import progress_bar

    bar, progress = progress_bar(Console(stderr=True, highlight=False))
    with bar:
        outcome = fix_port(report, out, progress=progress)
    show(outcome, console)
    return outcome


def _summary(report, console: Console) -> None:
    """The summary panel, then the findings grouped by cause (one bug repeated in all 53
    BatchNorms reads as one finding naming its other layers)."""
    from layerdiff.report import findings_panel, summary_panel

    console.print(summary_panel(report))
    if report.findings:
        console.print(findings_panel(report))
    elif not report:
        console.print("  (no diagnosis finding: no probe explained the divergence)")


def _head_table(report, rows: int = 6) -> Table:
    """The first rows of the per-layer table: where the error is born."""
    from layerdiff.report import _f

    fd = report.first_divergence
    table = Table(header_style="bold", title=f"first {rows} of {len(report.results)} aligned "
                  "layers", title_justify="left")
    for col in ("#", "reference", "candidate", "match", "max abs", "local", "tol", ""):
        table.add_column(col, justify="right" if col in ("#", "max abs", "local", "tol")
                         else "left")
    for r in report.results[:rows]:
        status = "ok" if r.passed else ("FIRST DIVERGENCE" if r is fd else (
            "inherited" if r.local_passed else "FAIL"))
        table.add_row(str(r.position), r.pair.ref_name, r.pair.cand_name, r.pair.method,
                      _f(r.metrics.max_abs), _f(r.local.max_abs) if r.local else "-",
                      _f(r.tolerance), status,
                      style=None if r.passed else ("bold red" if r is fd else "red"))
    return table


__all__ = ["EXPECTED_FIRST", "INPUT", "Scenario", "build_scenario", "run_demo"]

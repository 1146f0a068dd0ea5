"""``--fix-out`` on the terminal: what was applied, what is left, before/after in numbers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from layerdiff.comparator import Report
from layerdiff.fix import FixOutcome, fix_port


def fix_and_show(report: Report, out_dir: str | Path, force: bool, console: Console,
                 progress_bar: Callable[[], tuple[Any, Any]]) -> int:
    """Repair, re-compare and print; the exit code: 0 the repaired port passes, 1 it does not
    (or nothing could be applied to a failing port)."""
    bar, progress = progress_bar()
    with bar:
        outcome = fix_port(report, out_dir, force=force, progress=progress)
    show(outcome, console)
    return 0 if outcome.passed else 1


def show(outcome: FixOutcome, console: Console) -> None:
    if not outcome.written:
        what = "the port passes and no finding has a fix to apply" if outcome.before else \
            "no finding has a safe automatic fix"
        console.print(f"--fix-out: nothing written to {escape(str(outcome.out_dir))}: {what}")
        _manual(outcome, console)
        return
    files = "the patched .onnx, FIXES.md" if outcome.framework == "onnx" else \
        "model.py, weights.pt, FIXES.md"
    console.print(f"[bold]--fix-out[/]: wrote the repaired port to "
                  f"{escape(str(outcome.out_dir))} ({files})")
    for a in outcome.applied:
        f = a.finding
        where = f" at {f.layer}" if f.layer else ""
        n = len(a.weight_lines) + len(a.code_lines)
        console.print(f"  applied {f.kind}{escape(where)} ({a.level}: {n} statement"
                      f"{'s' if n != 1 else ''})", soft_wrap=True)
    if outcome.rounds > 1:
        console.print(f"  ({outcome.rounds} rounds: comparing the repaired port proved fixes for "
                      "layers the first diagnosis did not reach)")
    _manual(outcome, console)
    before, after = outcome.summaries()
    table = Table(title="before / after the fixes", title_justify="left", header_style="bold")
    for col in ("", "first divergence", "layers agreeing", "max error at the output"):
        table.add_column(col)
    table.add_row("before", *before.cells())
    table.add_row("after", *after.cells())
    console.print(table)
    if after.passed:
        console.print(f"[bold green]PASS[/]: the repaired port agrees with the reference "
                      f"({after.layers} aligned layers)")
    else:
        console.print(f"[bold red]FAIL[/]: the repaired port still diverges; first divergence "
                      f"{escape(after.first_divergence)}", soft_wrap=True)


def _manual(outcome: FixOutcome, console: Console) -> None:
    for f in outcome.manual:
        where = f" at {f.layer}" if f.layer else ""
        console.print(f"  manual: {f.kind}{escape(where)}: {escape(f.fix)}", soft_wrap=True)

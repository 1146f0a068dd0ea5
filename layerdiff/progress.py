"""The transient progress bar of long runs (stderr), shared by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console


def progress_bar(console: Console) -> tuple[Any, Callable[[str, int, int, str], None]]:
    """``(bar, progress)``: use ``with bar:`` around the run, pass ``progress`` to it."""
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.fields[layer]}"), console=console, transient=True)
    tasks: dict[str, int] = {}

    def progress(side: str, i: int, n: int, name: str) -> None:
        if side not in tasks:
            tasks[side] = bar.add_task(side, total=n, layer="")
        bar.update(tasks[side], total=n, completed=i, layer=name[:40])

    return bar, progress

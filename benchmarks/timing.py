"""Interleaved timing shared by the benchmarks: every round runs each case once, in turn, so
machine noise (other load, frequency changes) falls on all cases alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each run, after one warm-up call of each (allocator, caches)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times

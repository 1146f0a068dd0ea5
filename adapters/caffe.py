"""Caffe adapter: a Caffe model (prototxt + caffemodel) run by layerdiff's NumPy engine.

No Caffe install is involved: ``layerdiff.engine`` reproduces Caffe's TEST-phase arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from layerdiff.caffe import CaffeNet, load_caffe
from layerdiff.engine import run_caffe
from layerdiff.trace import Trace

__all__ = ["capture_caffe", "load_caffe"]


def capture_caffe(
    net: CaffeNet,
    inputs: dict[str, np.ndarray],
    dtype: str = "float32",
    stream_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Trace:
    """Run ``net`` on ``inputs`` and return the trace of every layer (in-place ones included)."""
    return run_caffe(net, inputs, dtype=dtype, stream_dir=stream_dir, progress=progress)

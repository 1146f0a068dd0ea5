"""Shared fixtures and test-wide settings."""

from __future__ import annotations

import os

# The golden traces were recorded with single-threaded OpenBLAS. With one thread our float32
# GEMMs sum in Caffe's order and whole ResNets agree with Caffe to ~5e-7; with two they drift
# to ~1e-3 (measured), which would hide engine errors. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from layerdiff.examples import write_example  # noqa: E402


@pytest.fixture
def example_dir(tmp_path):
    """The built-in example Caffe model written to a temporary directory."""
    d = tmp_path / "example"
    write_example(d)
    return d

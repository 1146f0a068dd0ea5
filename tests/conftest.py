"""Shared fixtures."""

from __future__ import annotations

import pytest

from layerdiff.examples import write_example


@pytest.fixture
def example_dir(tmp_path):
    """The built-in example Caffe model written to a temporary directory."""
    d = tmp_path / "example"
    write_example(d)
    return d

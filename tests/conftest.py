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


class _ProbeErrors:
    """Collects the diagnosis' "probe ... raised" log records (a probe that raises is never a
    finding, only a debug log line, so tests must look for it here)."""

    def __init__(self) -> None:
        import logging

        self.records: list = []
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self.records.append
        self.logger = logging.getLogger("layerdiff.diagnose")

    def __enter__(self) -> _ProbeErrors:
        import logging

        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    def messages(self) -> list[str]:
        return [f"{r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
                for r in self.records if "raised" in r.getMessage()]


@pytest.fixture
def probe_errors():
    """The probe errors logged during the test (a test that expects some asks for this)."""
    with _ProbeErrors() as errors:
        yield errors


@pytest.fixture(autouse=True)
def no_probe_error(request):
    """Every test fails when a diagnosis probe raised during it (planted-bug ports included),
    unless it asks for ``probe_errors`` itself."""
    if "probe_errors" in request.fixturenames:
        yield
        return
    with _ProbeErrors() as errors:
        yield
    assert not errors.messages(), f"a diagnosis probe raised: {errors.messages()}"

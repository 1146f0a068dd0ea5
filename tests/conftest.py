"""Shared fixtures and test-wide settings.

Skip policy: under ``CI=true`` a skipped test fails the session (exit code 1), unless its skip
reason starts with ``hardware:`` (e.g. ``hardware: no CUDA device`` for ``@pytest.mark.cuda``
tests), the only documented kind: CI must check everything the machine can run. A missing tool
or data set is not a hardware reason; such tests call ``pytest.fail`` under CI instead.
"""

from __future__ import annotations

import os

# Single-threaded OpenBLAS is a speed choice, not a correctness condition: on 2 cores
# test_demo + test_compare_torch + test_audit take 22 s with 1 thread, 30 s with 2 (measured);
# the golden nets take the same wall time either way, with 28% more CPU with 2. The golden
# checks hold with any thread count and kernel (test_portability.py runs them with 1 and 2).
# Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from layerdiff.examples import write_example  # noqa: E402

HARDWARE_SKIP = "hardware:"
_skips: list[tuple[str, str]] = []


@pytest.fixture
def example_dir(tmp_path):
    """The built-in example Caffe model written to a temporary directory."""
    d = tmp_path / "example"
    write_example(d)
    return d


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _note_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(HARDWARE_SKIP):
            _skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def _ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and _skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not (_ci() and _skips):
        return
    terminalreporter.section("skips are failures under CI=true", red=True)
    terminalreporter.write_line(f"{len(_skips)} test(s) skipped for a reason other than "
                                f"'{HARDWARE_SKIP} ...' (see tests/conftest.py):", red=True)
    for nodeid, reason in _skips:
        terminalreporter.write_line(f"  {nodeid}: {reason}")


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

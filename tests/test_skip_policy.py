"""The CI skip policy of tests/conftest.py, run on a throwaway test folder in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = '''
import pytest

def test_runs():
    pass

def test_cuda():
    pytest.skip("hardware: no CUDA device")
'''
NON_HARDWARE = '''
import pytest

def test_tool():
    pytest.skip("some tool not installed")

@pytest.mark.skipif(True, reason="not today")
def test_marked():
    pass
'''

MODULE_SKIP = '''
import pytest

pytest.skip("no data here", allow_module_level=True)
'''


def _pytest(folder: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(folder), str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def suite(tmp_path):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(TESTS)
    return tmp_path


def test_hardware_skip_passes_under_ci(suite):
    res = _pytest(suite, ci=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 1 skipped" in res.stdout


def test_other_skips_fail_under_ci_and_are_listed(suite):
    (suite / "test_b.py").write_text(NON_HARDWARE)
    (suite / "test_c.py").write_text(MODULE_SKIP)
    res = _pytest(suite, ci=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "test_c.py: no data here" in res.stdout
    assert "3 test(s) skipped for a reason other than 'hardware: ...'" in res.stdout
    assert "test_b.py::test_tool: some tool not installed" in res.stdout
    assert "test_b.py::test_marked: not today" in res.stdout
    assert "test_cuda" not in res.stdout.split("skips are failures")[1]
    assert _pytest(suite, ci=False).returncode == 0  # locally a skip is only reported

"""Every unit golden (BVLC Caffe, one layer variant each) and fork unit golden (OpenCV dnn).

Per layer, teacher-forced: ``max|engine - caffe| <= 1e-5 * max(1, max|caffe|)`` (the golden
README's bound; its float32 recompute worst case is 6e-7). End to end the unit nets are at most
a few layers deep, and the same bound holds.
"""

from __future__ import annotations

import pytest
from golden import (
    UNIT_TOL,
    check_end_to_end,
    check_teacher_forced,
    golden_dirs,
    load_golden,
    recorded_keys,
)


def _cases(kind: str):
    dirs = golden_dirs(kind)
    if not dirs:
        return [pytest.param(None, id="no-shared-data")]
    return [pytest.param(d, id=d.name) for d in dirs]


@pytest.mark.parametrize("case", _cases("unit"))
def test_unit_teacher_forced(case):
    g = load_golden(case)
    errs = check_teacher_forced(g, UNIT_TOL)
    assert errs and set(errs) == recorded_keys(g), f"{case.name}: not every output was compared"


@pytest.mark.parametrize("case", _cases("unit"))
def test_unit_end_to_end(case):
    g = load_golden(case)
    errs = check_end_to_end(g, UNIT_TOL)
    assert errs and set(errs) == recorded_keys(g), f"{case.name}: not every output was compared"


@pytest.mark.parametrize("case", _cases("fork"))
def test_fork_teacher_forced(case):
    g = load_golden(case)
    errs = check_teacher_forced(g, UNIT_TOL)
    assert errs and set(errs) == recorded_keys(g), f"{case.name}: not every output was compared"


@pytest.mark.parametrize("case", _cases("fork"))
def test_fork_end_to_end(case):
    g = load_golden(case)
    errs = check_end_to_end(g, UNIT_TOL)
    assert errs and set(errs) == recorded_keys(g), f"{case.name}: not every output was compared"

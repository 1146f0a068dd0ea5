"""Whole corpus nets against BVLC Caffe (nets/) and OpenCV dnn (fork_nets/) recordings.

End to end, error grows with depth. Bounds (max|ours - ref| / max(1, max|ref|), per layer):
- 1e-4 for the uniform-input nets (golden README: a float32 ResNet-50 port stays near 5e-6 of
  float64 on uniform input, so 1e-4 leaves room for Caffe's own rounding);
- the deep ResNets accumulate more: Caffe's own float32 output is 1.6e-4 (ResNet-50) and 8.9e-4
  (ResNet-101) away from our float64 run of the same weights, so a float32 engine cannot be
  held closer than about that; their bounds are 3e-4 and 2e-3, and
  `test_deep_net_error_is_caffes_own_rounding` proves the float64 reference is as far;
- 5e-3 for resnet50_seed_ones: its constant input leaves channels nearly constant, so the
  calibrated BatchNorm variances are tiny and BN amplifies rounding (README: up to 1.5e-3
  between float32 and float64, and Caffe is one float32 run).
Full traces are also checked teacher-forced per layer at the unit bound 1e-5.
"""

from __future__ import annotations

import pytest
from golden import UNIT_TOL, check_end_to_end, check_teacher_forced, golden_dirs, load_golden

E2E_TOL = 1e-4
LOOSE = {"resnet50_seed_ones": 5e-3, "resnet50_kaiminghe": 3e-4, "resnet101_kaiminghe": 2e-3}


def _cases(kind: str):
    dirs = golden_dirs(kind)
    if not dirs:
        return [pytest.param(None, id="no-shared-data")]
    return [pytest.param(d, id=d.name) for d in dirs]


@pytest.mark.parametrize("case", _cases("nets") + _cases("fork_nets"))
def test_net_end_to_end(case):
    g = load_golden(case)
    errs = check_end_to_end(g, LOOSE.get(g.path.name, E2E_TOL))
    assert len(errs) >= len(g.meta["layers"]) // 2


@pytest.mark.parametrize("case", _cases("nets"))
def test_net_teacher_forced(case):
    g = load_golden(case)
    if g.sampled:
        pytest.skip("sampled trace: bottoms are not stored whole, so no teacher forcing")
    check_teacher_forced(g, UNIT_TOL)


@pytest.mark.parametrize("name", ["resnet50_kaiminghe", "resnet101_kaiminghe"])
def test_deep_net_error_is_caffes_own_rounding(name):
    """The looser deep-net bounds are Caffe's float32 noise, not engine error: a float64 run
    (near-exact) is at least half as far from Caffe as our float32 run."""
    from golden import GOLDEN

    g = load_golden(GOLDEN / "nets" / name)
    err32 = max(check_end_to_end(g, LOOSE[name]).values())
    err64 = max(check_end_to_end(g, LOOSE[name], dtype="float64").values())
    assert err32 > E2E_TOL / 2, "the deep-net bound could be tightened"
    assert err64 >= 0.5 * err32, f"float32 {err32:.3g} vs float64 {err64:.3g}: engine error"

"""Whole corpus nets against BVLC Caffe (nets/) and OpenCV dnn (fork_nets/) recordings.

End to end, every recorded layer output must satisfy, scaled by ``max(1, max|golden|)``::

    max|ours32 - golden| <= max(1e-4, K * max|golden - ours64|)

``ours64`` is our engine on the same net and input in float64, so the second term is Caffe's own
float32 rounding at that layer ("noise"). Why not 1e-4 alone: OpenBLAS picks its GEMM kernel from
the CPU (or OPENBLAS_CORETYPE), and each kernel sums in its own order. Caffe's noise is 1.6e-4 on
ResNet-50, 8.9e-4 on ResNet-101 and 1.5e-3 on the constant-input resnet50_seed_ones, so on a
kernel other than the one the goldens happened to match (Haswell, 1 thread; measured: SkylakeX,
Sandybridge, Nehalem, Katmai and Haswell with 2 threads all differ) our float32 run is as far from
Caffe as Caffe is from exact arithmetic.

Why K = 3: by the triangle inequality ``|ours32 - golden| <= |ours32 - ours64| + noise``, so an
engine whose float32 rounding is no larger than Caffe's stays within 2 x noise; 3 leaves room
for ours to round up to twice as coarsely. Measured worst ``err / noise`` over the layers past
the 1e-4 floor (tests/README.md has the table, kernel x net, 1 and 2 threads): 2.17
(resnet50_seed_ones, Prescott/Katmai); 1.99 under SkylakeX. Only the three deep ResNets ever pass
the floor. A real error is not hidden: test_noise_bound_still_catches_a_wrong_layer plants a 0.1%
weight error that the bound rejects.

For sampled traces (512 values per layer) the noise is measured on the sampled elements and, for
the whole-tensor min and max, on those. Full traces are also checked teacher-forced per layer at
the unit bound 1e-5 (sampled traces cannot be: their bottoms are not stored whole).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from golden import (
    GOLDEN,
    UNIT_TOL,
    Golden,
    check_end_to_end_with_noise,
    check_teacher_forced,
    float64_run,
    golden_dirs,
    layer_records,
    load_golden,
    recorded_keys,
)

from layerdiff.engine import run_caffe

E2E_TOL = 1e-4
NOISE_K = 3.0


def _cases(kind: str, trace: str | None = None):
    dirs = golden_dirs(kind, trace)
    if not dirs:
        return [pytest.param(None, id="no-shared-data")]
    return [pytest.param(d, id=d.name) for d in dirs]


@lru_cache(maxsize=1)
def _golden_and_float64(path: Path) -> tuple[Golden, dict]:
    """One float64 run per net; a deep net's trace is ~0.5 GB, so only the latest is kept."""
    g = load_golden(path)
    return g, float64_run(g)


@pytest.mark.parametrize("case", _cases("nets") + _cases("fork_nets"))
def test_net_end_to_end(case):
    g, trace64 = _golden_and_float64(case) if case else (load_golden(case), None)
    errs = check_end_to_end_with_noise(g, E2E_TOL, NOISE_K, trace64)
    assert set(errs) == recorded_keys(g), "every recorded layer output must be compared"


@pytest.mark.parametrize("case", _cases("nets", trace="full"))
def test_net_teacher_forced(case):
    g = load_golden(case)
    errs = check_teacher_forced(g, UNIT_TOL)
    assert errs and set(errs) == recorded_keys(g), f"{case.name}: not every output was compared"


def test_float32_engine_rounds_like_caffe():
    """On a constant input Caffe's float32 rounding is large (1.5e-3 from float64, the golden
    README): there the noise term, not 1e-4, decides. True on every OpenBLAS kernel: our float32
    run is within K x noise of Caffe at every layer, and rounds as coarsely as Caffe does
    (its distance from our float64 run is Caffe's noise within a factor K either way)."""
    g, trace64 = _golden_and_float64(GOLDEN / "nets" / "resnet50_seed_ones")
    trace32 = run_caffe(g.net, g.feeds, dtype="float32")
    errs = check_end_to_end_with_noise(g, E2E_TOL, NOISE_K, trace64)
    noise = max(e.noise for e in errs.values())
    assert noise > 10 * E2E_TOL, f"Caffe's noise {noise:.3g}: this golden no longer tests it"
    own = max(_sampled_diff(g, key, trace32, trace64, rec, k) for rec, k, key in layer_records(g))
    assert noise / NOISE_K <= own <= NOISE_K * noise, f"ours {own:.3g} vs Caffe {noise:.3g}"


def test_noise_bound_still_catches_a_wrong_layer():
    """K x noise does not swallow a real error: res2a_branch2b's weights off by 0.1%."""
    path = GOLDEN / "nets" / "resnet50_kaiminghe"
    _, trace64 = _golden_and_float64(path)
    g = load_golden(path)  # a fresh copy: the cached net stays intact
    blob = g.net.layer("res2a_branch2b").blobs[0]
    blob.data = blob.data * np.float32(1.001)
    with pytest.raises(AssertionError, match=r"res2a_branch2b\|res2a_branch2b.*Caffe's own noise"):
        check_end_to_end_with_noise(g, E2E_TOL, NOISE_K, trace64)


def _sampled_diff(g: Golden, key: str, a: dict, b: dict, rec: dict, k: int) -> float:
    """max|a - b| of one output on the golden's sampled elements, scaled like the check."""
    idx = g.trace[key + "|idx"]
    x = a[rec["name"]].outputs[k].reshape(-1)[idx].astype(np.float64)
    y = b[rec["name"]].outputs[k].reshape(-1)[idx].astype(np.float64)
    scale = max(1.0, float(np.abs(g.trace[key + "|val"]).max()))
    return float(np.abs(x - y).max()) / scale

"""Per-pair metrics: exact values on small arrays, shape mismatch as a result."""

from __future__ import annotations

import math

import numpy as np

from layerdiff.metrics import measure


def test_values():
    ref = np.array([[1.0, -2.0], [3.0, 4.0]])
    cand = np.array([[1.0, -2.0], [3.5, 4.0]])
    m = measure(ref, cand)
    assert m.shape_match and not m.reshaped
    assert m.max_abs == 0.5 and m.mean_abs == 0.125 and m.worst_index == (1, 0)
    assert math.isclose(m.rmse, math.sqrt(0.25 / 4))
    assert math.isclose(m.snr_db, 10 * math.log10(30 / 0.25))
    assert math.isclose(m.max_rel, 0.5 / (3.0 + 4e-6), rel_tol=1e-9)
    assert m.ref_max_abs == 4.0 and 0.99 < m.cosine < 1.0
    assert m.passes(0.5) and not m.passes(0.49)


def test_identical_and_reshaped():
    a = np.arange(6.0).reshape(1, 6)
    m = measure(a, a.reshape(1, 6, 1, 1))
    assert m.shape_match and m.reshaped and m.max_abs == 0 and m.snr_db == math.inf
    assert m.cosine == 1.0


def test_shape_mismatch_is_a_result():
    m = measure(np.zeros((1, 3, 4, 4)), np.zeros((1, 3, 5, 5)))
    assert not m.shape_match and math.isnan(m.max_abs) and not m.passes(1e9)
    assert m.to_dict()["cand_shape"] == [1, 3, 5, 5]


def test_nan_inf_accounting():
    ref = np.array([1.0, np.nan, np.inf, 2.0])
    cand = np.array([1.0, np.nan, 5.0, np.nan])
    m = measure(ref, cand)
    assert m.nan_mismatch == 1 and m.inf_mismatch == 1
    assert m.max_abs == 0.0 and not m.passes(1.0)
    same = measure(ref, ref.copy())
    assert same.nan_mismatch == 0 and same.inf_mismatch == 0 and same.passes(0.0)

"""Error metrics between a reference output and a candidate output.

A shape mismatch is a result (``shape_match`` False, errors NaN), never an exception. Shapes
that differ only by size-1 axes or a flatten (same element count, e.g. Caffe's (N, C) after
InnerProduct vs a (N, C, 1, 1) conv head) are compared element-wise and flagged ``reshaped``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class Metrics:
    ref_shape: tuple[int, ...]
    cand_shape: tuple[int, ...]
    shape_match: bool
    reshaped: bool
    max_abs: float
    mean_abs: float
    #: max |d| / (|ref| + 1e-6 max|ref|): relative error that does not explode at zeros
    max_rel: float
    rmse: float
    cosine: float
    snr_db: float
    nan_mismatch: int
    inf_mismatch: int
    #: C-order index (in the reference's shape) of the largest absolute error
    worst_index: tuple[int, ...] | None
    ref_max_abs: float

    def passes(self, tolerance: float) -> bool:
        """Shapes and NaN/Inf positions agree and ``max|ref - cand| <= tolerance``."""
        return (self.shape_match and self.nan_mismatch == 0 and self.inf_mismatch == 0
                and self.max_abs <= tolerance)

    def scaled_error(self) -> float:
        """max|d| / max(1e-12, max|ref|): the error relative to the layer's magnitude."""
        return self.max_abs / max(self.ref_max_abs, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref_shape"], d["cand_shape"] = list(self.ref_shape), list(self.cand_shape)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        return d


def measure(ref: np.ndarray, cand: np.ndarray) -> Metrics:
    """All metrics of ``cand`` against ``ref`` (computed in float64)."""
    ref, cand = np.asarray(ref), np.asarray(cand)
    rs, cs = tuple(ref.shape), tuple(cand.shape)
    nan = math.nan
    if ref.size != cand.size:
        return Metrics(rs, cs, False, False, nan, nan, nan, nan, nan, nan, 0, 0, None,
                       _max_abs(ref))
    reshaped = rs != cs
    r = ref.astype(np.float64, copy=False).reshape(-1)
    c = cand.astype(np.float64, copy=False).reshape(-1)
    nan_mis = inf_mis = 0
    ok = None  # all finite: the usual case, checked in one pass per side
    if not (np.isfinite(r).all() and np.isfinite(c).all()):
        rn, cn = np.isnan(r), np.isnan(c)
        ri, ci = np.isinf(r), np.isinf(c)
        nan_mis = int(np.count_nonzero(rn != cn))
        inf_mis = int(np.count_nonzero((ri != ci) | (ri & ci & (np.sign(r) != np.sign(c)))))
        ok = ~(rn | cn | ri | ci)
        r, c = r[ok], c[ok]
    ref_max = float(np.abs(r).max()) if r.size else 0.0
    if r.size == 0:
        return Metrics(rs, cs, True, reshaped, 0.0, 0.0, 0.0, 0.0, 1.0, math.inf, nan_mis,
                       inf_mis, None, ref_max)
    d = np.abs(c - r)
    k = int(np.argmax(d))
    worst_flat = int(np.flatnonzero(ok)[k]) if ok is not None else k
    max_abs = float(d[k])
    rel = d / (np.abs(r) + 1e-6 * ref_max + 1e-30)
    sq = float(np.dot(d, d))
    ref_energy = float(np.dot(r, r))
    denom = math.sqrt(ref_energy * float(np.dot(c, c)))
    cosine = float(np.dot(r, c)) / denom if denom > 0 else (1.0 if sq == 0 else 0.0)
    snr = math.inf if sq == 0 else (10 * math.log10(ref_energy / sq) if ref_energy > 0
                                     else -math.inf)
    return Metrics(rs, cs, True, reshaped, max_abs, float(d.mean()), float(rel.max()),
                   math.sqrt(sq / d.size), cosine, snr, nan_mis, inf_mis,
                   tuple(int(i) for i in np.unravel_index(worst_flat, rs)), ref_max)


def _max_abs(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.abs(a).max()) if a.size else 0.0

"""Tie layers by their weights: a candidate parameter equal to a reference blob (possibly after
a transpose, a channel flip, or dividing by Caffe's BatchNorm scale factor) names the pair, even
when the two ports named their layers differently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from layerdiff.trace import Record

# Which reference blob identifies a layer, and which candidate parameters may hold it.
# (reference kind, blob key) -> candidate parameter names.
IDENTIFYING: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "Convolution": [("0", ("weight",))],
    "ConvolutionDepthwise": [("0", ("weight",))],
    "DepthwiseConvolution": [("0", ("weight",))],
    "Deconvolution": [("0", ("weight",))],
    "InnerProduct": [("0", ("weight",))],
    "Embed": [("0", ("weight",))],
    "PReLU": [("0", ("weight",))],
    "BatchNorm": [("0", ("running_mean",)), ("1", ("running_var",))],
    "Scale": [("0", ("weight",)), ("1", ("bias",))],
    "Bias": [("0", ("bias",))],
    "BN": [("0", ("weight",)), ("2", ("running_mean",))],
    "Normalize": [("0", ("weight",))],
}


@dataclass(frozen=True)
class Tie:
    ref: int  # reference record index
    cand: int  # candidate record index
    transform: str  # "" (equal) or what made them equal


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = float(np.abs(a).max()) if a.size else 0.0
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-3, atol=1e-6 * scale + 1e-12))


def _variants(ref: Record, key: str, blob: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The forms a correct or a typical wrong port may have stored ``blob`` in."""
    flat = np.asarray(blob, dtype=np.float64)
    out = [("", flat)]
    if ref.kind == "BatchNorm" and key in ("0", "1") and "2" in ref.params:
        s = float(np.asarray(ref.params["2"]).reshape(-1)[0])
        if s not in (0.0, 1.0):
            out.append((f"divided by the scale factor {s:g}", flat / s))
    if flat.ndim == 2:
        out.append(("transposed", flat.T))
    if flat.ndim == 4 and flat.shape[1] == 3:
        out.append(("input channels reversed (BGR/RGB)", flat[:, ::-1]))
    if flat.ndim == 4 and flat.shape[2:] != (1, 1):
        out.append(("kernel flipped", flat[:, :, ::-1, ::-1]))
    return out


def tie_by_parameters(ref: list[Record], cand: list[Record]) -> list[Tie]:
    """Every (reference record, candidate record) pair whose identifying weights agree."""
    by_size: dict[int, list[tuple[Record, str, np.ndarray]]] = defaultdict(list)
    for c in cand:
        for name, arr in c.params.items():
            leaf = name.rsplit(".", 1)[-1]
            a = np.asarray(arr)
            by_size[a.size].append((c, leaf, a))
    ties: list[Tie] = []
    for r in ref:
        for key, names in IDENTIFYING.get(r.kind, []):
            if key not in r.params:
                continue
            blob = np.asarray(r.params[key])
            if blob.size < 2 or float(np.ptp(blob)) == 0.0:
                continue  # a constant blob (all-ones gamma, zero bias) identifies nothing
            found = None
            for c, leaf, arr in by_size.get(blob.size, []):
                # torch names (weight, running_mean, ...), or the same blob of a Caffe layer
                if leaf not in names and not (leaf == key and c.kind == r.kind):
                    continue
                got = np.asarray(arr, dtype=np.float64)
                for transform, form in _variants(r, key, blob):
                    if form.size == got.size and _close(form.reshape(got.shape)
                                                        if form.ndim != got.ndim else form, got):
                        found = Tie(r.index, c.index, transform)
                        break
                if found:
                    break
            if found:
                ties.append(found)
                break
    return ties

"""Tie layers by their weights: a candidate parameter equal to a reference blob (possibly after
a transpose, a channel flip, or dividing by Caffe's BatchNorm scale factor) names the pair, even
when the two ports named their layers differently.

A kernel with a BatchNorm folded into it (``w' = w * gamma / sqrt(var + eps)`` per output
channel) ties to the unfolded kernel too: each output channel is a multiple, positive or
negative, of the other's. Candidates are first bucketed by shape, then screened by a per-channel
signature that such a factor leaves unchanged; only a signature match is verified in full.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from layerdiff.trace import Record

# Reference kinds whose first blob is a kernel (output channels first) that a BatchNorm after
# the layer may have been folded into.
FOLDABLE = {"Convolution", "ConvolutionDepthwise", "DepthwiseConvolution", "InnerProduct"}
FOLDED = "kernel scaled per output channel"

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


def channel_ratios(scaled: np.ndarray, plain: np.ndarray, rtol: float = 1e-3
                   ) -> np.ndarray | None:
    """Per output channel (axis 0) the factor ``r`` with ``scaled[c] = r[c] * plain[c]``, or
    None when some channel is not such a multiple.

    An all-zero ``plain`` channel gets ``nan`` (any factor fits when ``scaled[c]`` is zero too).
    A channel may differ by float32 rounding: ``rtol`` of its own largest value, plus a floor of
    ``1e-6`` of the whole kernel's for channels of tiny values.
    """
    if scaled.shape != plain.shape or scaled.ndim < 2 or not scaled.size:
        return None
    a = np.asarray(scaled, np.float64).reshape(scaled.shape[0], -1)
    b = np.asarray(plain, np.float64).reshape(plain.shape[0], -1)
    den = np.einsum("ij,ij->i", b, b)
    live = den > 0
    ratio = np.full(a.shape[0], np.nan)
    ratio[live] = np.einsum("ij,ij->i", a[live], b[live]) / den[live]
    fit = np.where(live[:, None], ratio[:, None] * b, 0.0)
    peak = np.abs(a).max(axis=1)
    floor = 1e-6 * float(max(peak.max(), np.abs(b).max()))
    if not np.all(np.abs(a - fit).max(axis=1) <= rtol * peak + floor + 1e-30):
        return None
    return ratio


def _unit_probe(n: int) -> np.ndarray:
    # Fixed pseudo-random direction: the same for every kernel of one channel size.
    return np.random.default_rng(n).standard_normal(n)


def channel_signature(w: np.ndarray) -> np.ndarray:
    """Per output channel ``|<w[c], u>| / |w[c]|`` for a fixed direction ``u``: unchanged by any
    nonzero per-channel factor. All-zero channels get ``nan`` (a zero factor fits anything)."""
    m = np.asarray(w, np.float64).reshape(w.shape[0], -1)
    norm = np.sqrt(np.einsum("ij,ij->i", m, m))
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.abs(m @ _unit_probe(m.shape[1])) / norm
    sig[norm == 0] = np.nan
    return sig


def _same_signature(a: np.ndarray, b: np.ndarray) -> bool:
    both = ~(np.isnan(a) | np.isnan(b))
    # Most channels must carry evidence: a kernel of zeros identifies nothing.
    if both.sum() * 2 < a.size:
        return False
    return bool(np.allclose(a[both], b[both], rtol=1e-3, atol=1e-4))


def _scaled_copy(blob: np.ndarray, got: np.ndarray) -> bool:
    """Whether one kernel is the other with each output channel scaled (either way round)."""
    return channel_ratios(got, blob) is not None or channel_ratios(blob, got) is not None


def tie_by_parameters(ref: list[Record], cand: list[Record]) -> list[Tie]:
    """Every (reference record, candidate record) pair whose identifying weights agree."""
    by_size: dict[int, list[tuple[Record, str, np.ndarray]]] = defaultdict(list)
    for c in cand:
        for name, arr in c.params.items():
            leaf = name.rsplit(".", 1)[-1]
            a = np.asarray(arr)
            by_size[a.size].append((c, leaf, a))
    signatures: dict[int, np.ndarray] = {}  # id(candidate array) -> channel signature
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
            if not found and key == "0" and r.kind in FOLDABLE and blob.ndim >= 2:
                found = _folded_tie(r, blob, by_size.get(blob.size, []), signatures)
            if found:
                ties.append(found)
                break
    return ties


def _folded_tie(r: Record, blob: np.ndarray, bucket, signatures) -> Tie | None:
    mine = channel_signature(blob)
    for c, leaf, arr in bucket:
        if leaf != "weight" or arr.shape != blob.shape:
            continue
        sig = signatures.get(id(arr))
        if sig is None:
            sig = signatures[id(arr)] = channel_signature(arr)
        if _same_signature(mine, sig) and _scaled_copy(blob, arr):
            return Tie(r.index, c.index, FOLDED)
    return None

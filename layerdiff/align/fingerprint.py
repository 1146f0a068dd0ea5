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
from functools import lru_cache

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


def _within(a: np.ndarray, b: np.ndarray, scale: float) -> bool:
    """``allclose(a, b, rtol=1e-3, atol=1e-6 * scale)`` in three passes (NaN is never close)."""
    dtype = np.result_type(a, b, np.float32)  # float32 when both are: rounding << rtol
    diff = np.subtract(a, b, dtype=dtype)
    np.abs(diff, out=diff)
    bound = np.abs(b, dtype=dtype)
    bound *= 1e-3
    bound += 1e-6 * scale + 1e-12
    return bool(np.less_equal(diff, bound).all())


@lru_cache(maxsize=256)
def _sample(shape: tuple[int, ...], n: int = 64) -> tuple[np.ndarray, ...]:
    """``n`` positions spread over an array of ``shape``, as an index tuple."""
    size = int(np.prod(shape))
    flat = np.unique(np.linspace(0, size - 1, min(size, n)).astype(np.int64))
    return np.unravel_index(flat, shape)


def _equal_form(form: np.ndarray, scale: float, got: np.ndarray) -> bool:
    """``form`` (largest magnitude ``scale``) equals ``got``; a sample of positions is
    checked first, so most wrong candidates cost 64 comparisons, not the whole tensor."""
    if form.size != got.size:
        return False
    if form.ndim != got.ndim:
        form = form.reshape(got.shape)
    if form.shape != got.shape:
        return False
    at = _sample(got.shape)
    return _within(form[at], got[at], scale) and _within(form, got, scale)


def _variants(ref: Record, key: str, blob: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The forms a correct or a typical wrong port may have stored ``blob`` in."""
    flat = np.asarray(blob)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
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
    dtype = np.result_type(scaled, plain, np.float32)  # float32 stays float32: 2x faster
    a = np.asarray(scaled, dtype).reshape(scaled.shape[0], -1)
    b = np.asarray(plain, dtype).reshape(plain.shape[0], -1)
    den = np.square(b).sum(axis=1).astype(np.float64)  # float32 sums are pairwise: exact enough
    live = den > 0
    ratio = np.full(a.shape[0], np.nan)
    ratio[live] = (a[live] * b[live]).sum(axis=1) / den[live]
    resid = a - np.where(live, ratio, 0.0).astype(dtype)[:, None] * b
    np.abs(resid, out=resid)
    peak = np.abs(a).max(axis=1)
    floor = 1e-6 * float(max(peak.max(), np.sqrt(den.max())))
    if not np.all(resid.max(axis=1) <= rtol * peak + floor + 1e-30):
        return None
    return ratio


@lru_cache(maxsize=64)
def _unit_probe(n: int) -> np.ndarray:
    # Fixed pseudo-random direction: the same for every kernel of one channel size (read-only:
    # callers take a converted copy).
    return np.random.default_rng(n).standard_normal(n)


def channel_signature(w: np.ndarray) -> np.ndarray:
    """Per output channel ``|<w[c], u>| / |w[c]|`` for a fixed direction ``u``: unchanged by any
    nonzero per-channel factor. All-zero channels get ``nan`` (a zero factor fits anything)."""
    m = np.asarray(w).reshape(w.shape[0], -1)
    dtype = np.result_type(m, np.float32)
    m = m.astype(dtype, copy=False)
    norm = np.sqrt(np.square(m).sum(axis=1).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.abs(m @ _unit_probe(m.shape[1]).astype(dtype)) / norm
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
            forms = None
            for c, leaf, arr in by_size.get(blob.size, []):
                # torch names (weight, running_mean, ...), or the same blob of a Caffe layer
                if leaf not in names and not (leaf == key and c.kind == r.kind):
                    continue
                if forms is None:
                    forms = [(t, f, float(np.abs(f).max())) for t, f in _variants(r, key, blob)]
                transform = next((t for t, form, scale in forms
                                  if _equal_form(form, scale, arr)), None)
                if transform is not None:
                    found = Tie(r.index, c.index, transform)
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

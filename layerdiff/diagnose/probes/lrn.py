"""LRN: alpha scaled by the window size twice or not at all, k, beta, size, the border divisor.

Caffe's ACROSS_CHANNELS LRN is ``x * (k + alpha/n * sum(x^2 over n channels))^-beta``, which is
exactly torch's ``nn.LocalResponseNorm(n, alpha, beta, k)`` (torch divides by n too, so a port
that passes ``alpha / n`` divides twice). WITHIN_CHANNEL has no torch module: Caffe computes
``x * (1 + alpha * avgpool_n(x^2))^-beta`` with an n x n average that counts the zero padding
(divisor always n^2) and ignores ``k``; hand-written ports drop the 1/n^2 or count only the
real pixels at the border.

The probe first re-runs Caffe's exact formula in torch in place of the port's layer: if that
does not remove the error, the cause is elsewhere and nothing is reported. Then it re-runs
copies of the port's layer with one setting changed (alpha times or over n or n^2, k, beta,
size, a boolean flag) to name the mistake, and fits the port's effective ``k`` and window
coefficient from its own output as evidence.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import attach_module_patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import (
    caffe_layer,
    cand_op,
    check_fix,
    edited_call,
    finding,
    module_call,
)

_LRN_ARGS = ("input", "size", "alpha", "beta", "k")
_ALPHA = ("alpha",)
_K = ("k", "bias")
_BETA = ("beta",)
_SIZE = ("size", "local_size", "n")


class CaffeLRN:
    """Caffe's LRN as a torch callable (the reference formula, in the port's dtype)."""

    def __init__(self, size: int, alpha: float, beta: float, k: float, within: bool) -> None:
        self.size, self.alpha, self.beta, self.k, self.within = size, alpha, beta, k, within

    def module(self):
        import torch
        import torch.nn.functional as F  # noqa: N812 - torch's own spelling
        from torch import nn

        if not self.within:
            return nn.LocalResponseNorm(self.size, self.alpha, self.beta, self.k)
        n, alpha, beta = self.size, self.alpha, self.beta

        class WithinChannelLRN(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                avg = F.avg_pool2d(x * x, n, 1, n // 2, count_include_pad=True)
                return x / (1 + alpha * avg).pow(beta)

        return WithinChannelLRN()

    def code(self, name: str) -> str:
        if not self.within:
            return (f"{name} = nn.LocalResponseNorm({self.size}, alpha={self.alpha:g}, "
                    f"beta={self.beta:g}, k={self.k:g})")
        return (f"{name}: y = x / (1 + {self.alpha:g} * F.avg_pool2d(x * x, {self.size}, 1, "
                f"{self.size // 2}, count_include_pad=True)) ** {self.beta:g}")

    @property
    def coefficient(self) -> float:
        """Caffe's factor on the window's sum of squares: alpha/n (across) or alpha/n^2."""
        return self.alpha / (self.size ** 2 if self.within else self.size)


def _caffe_lrn(case: LayerCase) -> CaffeLRN | None:
    found = caffe_layer(case, "LRN")
    if found is None:
        return None
    layer, impl = found
    if impl is not None and hasattr(impl, "within"):
        return CaffeLRN(impl.size, impl.alpha, impl.beta, impl.k, impl.within)
    p = layer.param.lrn_param
    return CaffeLRN(int(p.local_size), float(p.alpha), float(p.beta), float(p.k),
                    p.norm_region == p.WITHIN_CHANNEL)


def window_sum_sq(x: np.ndarray, n: int, within: bool) -> np.ndarray:
    """Sum of x^2 over Caffe's LRN window (zero padded), in float64."""
    sq = np.square(np.asarray(x, np.float64))
    p = n // 2
    out = np.zeros_like(sq)
    if within:
        padded = np.pad(sq, ((0, 0), (0, 0), (p, p), (p, p)))
        h, w = sq.shape[2:]
        for i in range(n):
            for j in range(n):
                out += padded[:, :, i:i + h, j:j + w]
    else:
        padded = np.pad(sq, ((0, 0), (p, p), (0, 0), (0, 0)))
        c = sq.shape[1]
        for i in range(n):
            out += padded[:, i:i + c]
    return out


def fit_lrn(x: np.ndarray, y: np.ndarray, n: int, beta: float,
            within: bool) -> tuple[float, float] | None:
    """The port's effective (k, coefficient) if ``y = x (k + c * window_sum(x^2))^-beta``
    fits its output; None when it does not (another formula or beta)."""
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x64.shape != y64.shape or x64.ndim != 4 or beta == 0:
        return None
    s = window_sum_sq(x64, n, within)
    big = np.abs(x64) > 1e-3 * max(np.abs(x64).max(), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = x64 / y64
    ok = big & np.isfinite(ratio) & (ratio > 0)
    if ok.sum() < 8:
        return None
    t = ratio[ok] ** (1.0 / beta)
    a = np.stack([np.ones(ok.sum()), s[ok]], axis=1)
    (k, c), *_ = np.linalg.lstsq(a, t, rcond=None)
    # The window term must be fitted to 1%: t itself is ~k, so a loose fit would look good.
    resid = np.abs(a @ np.array([k, c]) - t).max()
    span = np.abs(c * a[:, 1]).max()
    return (float(k), float(c)) if span > 0 and resid <= 0.01 * span else None


def _trials(mod: Any, lrn: CaffeLRN) -> list[tuple[str, Any, str]]:
    """(attribute, new value, what it means) for copies of the port's layer to re-run."""
    vals = {k: v for k, v in vars(mod).items() if not k.startswith("_") and k != "training"}
    n, out = lrn.size, []
    factors = [(n * n, f"x {n}^2"), (1 / (n * n), f"/ {n}^2"), (n, f"x {n}"), (1 / n, f"/ {n}")]
    if not lrn.within:
        factors = factors[2:] + factors[:2]
    for name in _ALPHA:
        v = vals.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v:
            out += [(name, v * f, how) for f, how in factors]
            if not np.isclose(v, lrn.alpha):
                out.append((name, lrn.alpha, "= Caffe's alpha"))
    for names, target in ((_K, 1.0 if lrn.within else lrn.k), (_BETA, lrn.beta),
                          (_SIZE, lrn.size)):
        for name in names:
            v = vals.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v != target:
                out.append((name, type(v)(target), f"= Caffe's {target:g}"))
    out += [(name, not v, f"= {not v}") for name, v in vals.items() if isinstance(v, bool)]
    return out


def _cause(attr: str, how: str, lrn: CaffeLRN, mod_kind: str) -> tuple[str, str]:
    n = lrn.size
    win = f"{n}^2" if lrn.within else f"{n}"
    if attr in _ALPHA and how.startswith("x"):
        return "lrn_alpha_scaling", (
            f"the port divides alpha by the window size once more than Caffe (alpha/"
            f"{win} scaled again{' by nn.LocalResponseNorm' if mod_kind == 'nn' else ''})")
    if attr in _ALPHA and how.startswith("/"):
        return "lrn_alpha_scaling", (
            f"the port does not divide alpha by the window size {win}: Caffe scales the sum of "
            f"squares by alpha/{win}")
    if attr in _ALPHA:
        return "lrn_alpha", "the port's LRN alpha differs from Caffe's"
    if attr in _K:
        return "lrn_k", ("the port's LRN k (the constant added to the scaled sum) differs "
                         f"from Caffe's {1.0 if lrn.within else lrn.k:g}"
                         + (" (WITHIN_CHANNEL always adds 1)" if lrn.within else ""))
    if attr in _BETA:
        return "lrn_beta", "the port's LRN beta differs from Caffe's"
    if attr in _SIZE:
        return "lrn_size", "the port's LRN window size differs from Caffe's local_size"
    return "lrn_border_divisor", (
        f"the port's LRN averages the border windows over another count (flag {attr}): Caffe "
        f"divides every window by {n}^2, zero padding included")


@probe("lrn_parameters")
def lrn_parameters(case: LayerCase) -> Finding | None:
    """Caffe's LRN formula removes the error; the changed port setting names the cause."""
    lrn = _caffe_lrn(case)
    if lrn is None or not case.ref_inputs or np.ndim(case.ref_inputs[0]) != 4:
        return None
    mods = case.cand_modules()
    pos = next((k for k, m in enumerate(mods) if m is not None), None)
    op = cand_op(case, ("local_response_norm",)) if pos is None else None
    if pos is None and op is None:
        return None
    pos = op[0] if op is not None else pos
    rec = case.cand_records[pos]
    like, device = rec.outputs[0], getattr(rec.handle, "device", None)
    exact = case.rerun(replace={pos: module_call(lrn.module(), like, device)})
    if check_fix(case, exact) is None:
        return None  # Caffe's formula itself does not match: not an LRN setting
    mod = mods[pos] if op is None else None
    fit = _fit_text(case, lrn)
    if mod is not None:
        kind_of_mod = "nn" if type(mod).__name__ == "LocalResponseNorm" else "custom"
        for attr, value, how in _trials(mod, lrn):
            trial = copy.deepcopy(mod)
            try:
                setattr(trial, attr, value)
            except (AttributeError, TypeError):
                continue
            fixed = check_fix(case, case.rerun(replace={pos: module_call(trial, like, device)}))
            if fixed is not None:
                kind, cause = _cause(attr, how, lrn, kind_of_mod)
                old = getattr(mod, attr)
                shown = "" if how.startswith("=") else f" ({_fmt(value)})"
                ev = (f"{_caffe_text(case, lrn)}; torch {rec.name}.{attr} = {_fmt(old)} "
                      f"({type(mod).__name__}){fit}; a copy with {attr} {how}{shown} re-run on "
                      "Caffe's input matches")
                f = finding(case, kind, cause, ev, f"{rec.name}.{attr} = {_fmt(value)}",
                            fixed, "lrn_parameters", attribute=attr, value=value)
                return attach_module_patch(f, rec, mod, trial)
    elif op is not None:
        a = {n: v for n, v in zip(_LRN_ARGS, rec.handle.args, strict=False)}
        a.update(rec.handle.kwargs)
        for attr, target in (("alpha", lrn.alpha), ("k", lrn.k), ("beta", lrn.beta),
                             ("size", lrn.size)):
            if a.get(attr) is None or np.isclose(a[attr], target):
                continue
            fixed = check_fix(case, case.rerun(
                replace={pos: edited_call(rec.handle, _LRN_ARGS, **{attr: target})}))
            if fixed is not None:
                kind, cause = _cause(attr, _direction(a[attr], target, lrn.size), lrn, "nn")
                ev = (f"{_caffe_text(case, lrn)}; torch F.local_response_norm({attr}="
                      f"{_fmt(a[attr])}){fit}; re-run with {attr}={_fmt(target)} matches")
                return finding(case, kind, cause, ev,
                               f"F.local_response_norm(x, {lrn.size}, alpha={lrn.alpha:g}, "
                               f"beta={lrn.beta:g}, k={lrn.k:g})", fixed, "lrn_parameters",
                               attribute=attr, value=target)
    fixed = check_fix(case, exact)
    ev = (f"{_caffe_text(case, lrn)}{fit}; Caffe's formula re-run in place of torch "
          f"{rec.name} ({rec.kind}) matches")
    return finding(case, "lrn_formula", "the port's LRN computes another formula than Caffe's",
                   ev, lrn.code(rec.name), fixed, "lrn_parameters")


def _direction(old: float, new: float, n: int) -> str:
    """"x" when the fix multiplies by n or n^2, "/" when it divides by them, else "="."""
    r = new / old if old else float("nan")
    if np.isclose(r, n) or np.isclose(r, n * n):
        return "x"
    if np.isclose(r, 1 / n) or np.isclose(r, 1 / (n * n)):
        return "/"
    return "="


def _fmt(v: Any) -> str:
    return str(v) if isinstance(v, (bool, int)) else f"{v:.6g}"


def _caffe_text(case: LayerCase, lrn: CaffeLRN) -> str:
    region = "WITHIN_CHANNEL" if lrn.within else "ACROSS_CHANNELS"
    k = "1" if lrn.within else f"{lrn.k:g}"
    div = f"{lrn.size}^2" if lrn.within else f"{lrn.size}"
    unused = " (k unused)" if lrn.within else ""
    return (f"Caffe {case.pair.ref_name} ({region}, local_size {lrn.size}, alpha {lrn.alpha:g}, "
            f"beta {lrn.beta:g}) computes x*({k} + alpha/{div} * sum x^2)^-beta{unused}, "
            f"coefficient {lrn.coefficient:.4g}")


def _fit_text(case: LayerCase, lrn: CaffeLRN) -> str:
    if case.local_output is None:
        return ""
    fit = fit_lrn(case.ref_inputs[0], case.local_output, lrn.size, lrn.beta, lrn.within)
    if fit is None:
        return ""
    k, c = fit
    ratio = c / lrn.coefficient if lrn.coefficient else float("nan")
    return f"; the port's output fits k = {k:.4g}, coefficient {c:.4g} ({ratio:.4g} x Caffe's)"

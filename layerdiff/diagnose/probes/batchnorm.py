"""BatchNorm probes: a Caffe BatchNorm (+ Scale) against a torch BatchNorm port.

Caffe's BatchNorm stores ``mean * s``, ``var * s`` and the moving-average factor ``s`` (blob 2)
and computes ``(x - mean/s) / sqrt(var/s + eps)`` (statistics 0 when ``s == 0``, so the output is
``x / sqrt(eps)``); a following Scale layer applies gamma/beta. With ``use_global_stats: false``
it normalises with the batch's own statistics instead.

Every probe reads the candidate module's numbers as captured, checks that a plain
``F.batch_norm`` with them reproduces the module (so a fix to its attributes is a fix to the
port), puts in Caffe's value for one component (statistics, eps, gamma/beta) and re-runs the
layer on the reference's inputs. A finding needs that re-run to remove (almost) all the error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import Patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import Fixed, check_fix
from layerdiff.metrics import measure

#: a fix must remove at least this fraction of the layer's error
#: parameters this close count as equal (float32 storage, float64 vs float32 division)
PARAM_RTOL = 1e-4


# -- numbers on both sides ----------------------------------------------------------------------


@dataclass
class BNParams:
    """What a BatchNorm (+ affine) computes: ``gamma (x - mean) / sqrt(var + eps) + beta``."""

    mean: np.ndarray
    var: np.ndarray
    eps: float
    gamma: np.ndarray
    beta: np.ndarray
    #: normalise with the batch's own statistics (Caffe use_global_stats: false)
    batch_stats: bool = False


@dataclass
class CaffeBN:
    """A Caffe BatchNorm layer's numbers (and the Scale grouped with it)."""

    layer: Any
    use_global: bool
    s: float  # the moving-average factor, blob 2
    raw_mean: np.ndarray  # blob 0 (mean * s)
    raw_var: np.ndarray  # blob 1 (var * s)
    eps: float
    scale: Any | None

    @property
    def mean(self) -> np.ndarray:
        return self.raw_mean * (0.0 if self.s == 0 else 1.0 / self.s)

    @property
    def var(self) -> np.ndarray:
        return self.raw_var * (0.0 if self.s == 0 else 1.0 / self.s)


@dataclass
class BNSite:
    """A failing pair with a Caffe BatchNorm and a torch BatchNorm module."""

    case: LayerCase
    pos: int  # position of the torch module in the candidate group
    module: Any
    path: str
    bn: CaffeBN
    cand: BNParams
    before: float  # error of the module as captured, re-run on the reference's inputs

    @property
    def caffe(self) -> BNParams:
        """Caffe's numbers, in the candidate's layout (its own affine when Caffe has no Scale)."""
        c = len(self.bn.raw_mean)
        gamma, beta = _scale_params(self.bn.scale, c) if self.bn.scale is not None else (
            np.ones(c), np.zeros(c))
        return BNParams(self.bn.mean, self.bn.var, self.bn.eps, gamma, beta,
                        not self.bn.use_global)

    @property
    def mref(self) -> str:
        """The module in a fix line."""
        return module_ref(self.path)


def module_ref(path: str) -> str:
    """Python that names a submodule of ``model`` in a fix line."""
    if path in ("", "(root)"):
        return "model"
    if all(p.isidentifier() for p in path.split(".")):
        return f"model.{path}"
    return f'model.get_submodule("{path}")'


def _vec(x: Any) -> np.ndarray:
    return np.asarray(getattr(x, "data", x), dtype=np.float64).reshape(-1)


def _scale_params(scale: Any, c: int) -> tuple[np.ndarray, np.ndarray]:
    gamma = _vec(scale.blobs[0])
    beta = _vec(scale.blobs[1]) if len(scale.blobs) > 1 else np.zeros(c)
    return gamma, beta


def _tensor_np(t: Any) -> np.ndarray | None:
    if t is None:
        return None
    return t.detach().cpu().double().numpy().reshape(-1)


def is_torch_bn(m: Any) -> bool:
    """A module with BatchNorm's running statistics (nn.BatchNorm*d, FrozenBatchNorm2d, ...)."""
    return m is not None and getattr(m, "running_mean", None) is not None and \
        getattr(m, "running_var", None) is not None


def captured_training(case: LayerCase, pos: int) -> bool:
    """Whether the candidate module at ``pos`` was in train mode when it was captured."""
    rec = case.cand_records[pos]
    path = rec.attrs.get("module", rec.name)
    training = case.cand_trace.meta.get("training_modules")
    if training is None:  # an older trace: the capture put the model in eval()
        return False
    return path in training


def captured_copy(case: LayerCase, pos: int, module: Any) -> Any:
    """A copy of the module with the parameters and mode it had when it was captured.

    The live module may have changed since: re-running a module left in train mode updates its
    running statistics.
    """
    import torch

    m = copy.deepcopy(module)
    params = case.cand_records[pos].params or {}
    with torch.no_grad():
        for name, arr in params.items():
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(np.shape(arr)):
                t.copy_(torch.as_tensor(np.array(arr)).to(t))
    return m.train(captured_training(case, pos))


def first_tensor(m: Any) -> Any:
    """A floating parameter or buffer of ``m`` (its dtype and device), or None."""
    for t in (*m.parameters(), *m.buffers()):
        if t.is_floating_point():
            return t
    return None


def captured_fn(case: LayerCase, pos: int, module: Any) -> Any:
    """:func:`captured_copy` as a replacement for ``case.rerun``."""
    m = captured_copy(case, pos, module)
    like = first_tensor(m)
    return m if like is None else torch_fn(m, like)


def output_error(ref: np.ndarray, out: np.ndarray | None) -> float | None:
    """max|ref - out|; inf when NaN/Inf appear in different places; None when not comparable."""
    if out is None:
        return None
    m = measure(ref, out)
    if not m.shape_match:
        return None
    if m.nan_mismatch or m.inf_mismatch:
        return math.inf
    return m.max_abs


def _module_params(case: LayerCase, pos: int, m: Any) -> BNParams:
    params = case.cand_records[pos].params or {}

    def get(name: str) -> np.ndarray | None:
        if name in params:
            return _vec(params[name])
        return _tensor_np(getattr(m, name, None))

    mean, var = get("running_mean"), get("running_var")
    gamma, beta = get("weight"), get("bias")
    c = len(mean)
    return BNParams(mean, var, float(getattr(m, "eps", 1e-5)),
                    np.ones(c) if gamma is None else gamma,
                    np.zeros(c) if beta is None else beta)


# -- functional stand-ins for the counterfactual re-runs ------------------------------------------


def torch_fn(fn: Any, like: Any) -> Any:
    """``fn`` (torch in, torch out) as a numpy function computing in ``like``'s dtype/device.

    Replacements are handed to ``case.rerun`` as plain callables so the dtype and device are
    the candidate's own, whatever parameters the replacement has.
    """
    import torch

    def run(*xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = fn(*[torch.as_tensor(np.array(x)).to(like) for x in xs])
        return out.detach().cpu().numpy()

    return run


def bn_module(p: BNParams, like: Any) -> Any:
    """A function computing ``p`` with ``F.batch_norm`` (the call nn.BatchNorm*d makes)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    def t(a: np.ndarray) -> Any:
        return torch.as_tensor(np.array(a, dtype=np.float64)).to(like)

    mean, var, gamma, beta = t(p.mean), t(p.var), t(p.gamma), t(p.beta)

    def bn(x: Any) -> Any:
        if p.batch_stats:
            return F.batch_norm(x, None, None, gamma, beta, True, 0.0, p.eps)
        return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, p.eps)

    return torch_fn(bn, like)


def affine_module(gamma: np.ndarray, beta: np.ndarray | None, like: Any) -> Any:
    """Caffe's Scale on axis 1 as a function: ``x * gamma[c] (+ beta[c])``."""
    import torch

    g = torch.as_tensor(gamma).to(like)
    b = None if beta is None else torch.as_tensor(beta).to(like)

    def affine(x: Any) -> Any:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * g.view(shape)
        return y + b.view(shape) if b is not None else y

    return torch_fn(affine, like)


# -- finding the site ---------------------------------------------------------------------------


def bn_site(case: LayerCase) -> BNSite | None:
    """The BatchNorm pair under diagnosis, or None when this pair is not one (or is fine).

    Built once per case (several probes ask for it).
    """
    cached = getattr(case, "_bn_site", False)
    if cached is not False:
        return cached
    site = _build_site(case) if bn_site_possible(case) else None
    case._bn_site = site  # a plain attribute on the case: the probes of this module share it
    return site


def caffe_bn(case: LayerCase) -> CaffeBN | None:
    """The Caffe BatchNorm of the reference group (with the Scale after it, if grouped)."""
    layers = case.caffe_layers()
    bn_rec = next((r for r in case.ref_records if getattr(r.handle, "layer", None) is not None
                   and r.handle.layer.type == "BatchNorm"), None)
    if bn_rec is None or len(bn_rec.handle.layer.blobs) < 3:
        return None
    layer = bn_rec.handle.layer
    raw_mean, raw_var = _vec(layer.blobs[0]), _vec(layer.blobs[1])
    bp = layer.param.batch_norm_param
    use_global = getattr(getattr(bn_rec.handle, "impl", None), "use_global", None)
    if use_global is None:
        use_global = bp.use_global_stats if bp.HasField("use_global_stats") else True
    after_bn = layers[layers.index(layer) + 1:] if layer in layers else []
    scale = next((lay for lay in after_bn if lay.type == "Scale" and lay.blobs
                  and _vec(lay.blobs[0]).size == raw_mean.size), None)
    return CaffeBN(layer, bool(use_global), float(_vec(layer.blobs[2])[0]), raw_mean, raw_var,
                   float(bp.eps), scale)


def _build_site(case: LayerCase) -> BNSite | None:
    ref = caffe_bn(case)
    mods = case.cand_modules()
    pos = next((k for k, m in enumerate(mods) if is_torch_bn(m)), None)
    if ref is None or pos is None:
        return None
    module = mods[pos]
    if getattr(module, "training", False) or captured_training(case, pos):
        # A module in train mode: a re-run updates its running statistics, and the trace's
        # parameters may be views of them, so its numbers are no longer the captured ones.
        # train_mode.py speaks for such layers.
        return None
    cand = _module_params(case, pos, module)
    if cand.mean.size != ref.raw_mean.size:
        return None
    rec = case.cand_records[pos]
    path = rec.attrs.get("module") or getattr(rec.handle, "module", None) or rec.name
    base = case.rerun(replace={pos: captured_fn(case, pos, module)})
    before = output_error(case.ref_output, base)
    if before is None or before <= case.tolerance:
        return None  # the module as captured is right here (nothing of ours to explain)
    site = BNSite(case, pos, module, path, ref, cand, before)
    # The fixes below are made to a plain F.batch_norm with the module's numbers: that must be
    # what the module computes, or a fix to its attributes would not be a fix to the port.
    plain = case.rerun(replace={pos: bn_module(cand, module.running_mean)})
    same = output_error(base, plain)
    if same is None or same > case.tolerance:
        return None
    return site


def _close(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    return bool(np.allclose(a, b, rtol=PARAM_RTOL, atol=1e-6 * scale))


def _ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """The constant ``a / b`` over the channels, or None when there is none."""
    big = np.abs(b) > 1e-6 * max(float(np.abs(b).max(initial=0.0)), 1e-30)
    if not big.any():
        return None
    r = a[big] / b[big]
    med = float(np.median(r))
    if med == 0 or not np.all(np.abs(r - med) <= 1e-3 * abs(med)):
        return None
    return med


def _run(site: BNSite, p: BNParams) -> np.ndarray | None:
    return site.case.rerun(replace={site.pos: bn_module(p, site.module.running_mean)})


def _finding(site: BNSite, kind: str, cause: str, evidence: str, fix: str,
             res: Fixed, probe_name: str, fixed: BNParams | None = None,
             **data: Any) -> Finding:
    before, after, frac = res.before, res.after, res.explained
    evidence += f"; re-run with the fix: max error {before:.4g} -> {after:.3g}"
    f = Finding(kind, site.case.name, cause, evidence, fix, frac, before, after, probe_name,
                data)
    return f if fixed is None else _bn_patch(site, fixed).attach(f)


def _bn_patch(site: BNSite, fixed: BNParams) -> Patch:
    """The module's tensors/eps set to the numbers the re-run used (only those that differ)."""
    p, have, m = Patch(), site.cand, site.module
    if not (np.array_equal(have.mean, fixed.mean) and np.array_equal(have.var, fixed.var)):
        p.set_tensor(site.path, "running_mean", fixed.mean)
        p.set_tensor(site.path, "running_var", fixed.var)
    if have.eps != fixed.eps:
        p.set_attr(site.path, "eps", float(fixed.eps))
    if not (np.array_equal(have.gamma, fixed.gamma) and np.array_equal(have.beta, fixed.beta)):
        new = getattr(m, "weight", None) is None
        p.set_tensor(site.path, "weight", fixed.gamma, new=new)
        p.set_tensor(site.path, "bias", fixed.beta, new=new)
        if new and hasattr(m, "affine"):
            p.set_attr(site.path, "affine", True)
    return p


# -- the component stories ------------------------------------------------------------------------


def _stats_story(site: BNSite) -> tuple[str, str, str, str]:
    """(kind, cause, evidence, fix) for running statistics that differ from Caffe's."""
    cm, cv = site.cand.mean, site.cand.var
    want = site.caffe
    m, v, s = want.mean, want.var, site.bn.s
    bn, ref, path = site.bn.layer.name, site.mref, site.path
    k = int(np.argmax(np.abs(cm - m) / np.sqrt(v + site.bn.eps)))
    quote = (f"torch {path}.running_mean[{k}] = {cm[k]:.6g}, running_var[{k}] = {cv[k]:.6g}; "
             f"Caffe {bn} blob0[{k}] = {site.bn.raw_mean[k]:.6g}, blob1[{k}] = "
             f"{site.bn.raw_var[k]:.6g}, blob2 (scale factor s) = {s:.6g}")
    if s == 0:
        return ("bn_scale_factor",
                f"Caffe {bn}'s scale factor s (blob2) is 0, so Caffe ignores the stored "
                f"statistics (mean 0, variance 0: y = x / sqrt(eps)) while torch {path} "
                "normalises with them",
                quote, f"{ref}.running_mean.zero_(); {ref}.running_var.zero_()")
    if _close(cm, site.bn.raw_mean) and _close(cv, site.bn.raw_var) and s != 1:
        return ("bn_scale_factor",
                f"torch {path}'s running statistics are Caffe {bn}'s blobs copied without "
                f"dividing by the scale factor s = {s:.6g} (blob2)",
                quote + f"; Caffe uses blob0/s = {m[k]:.6g}, blob1/s = {v[k]:.6g}",
                f"{ref}.running_mean /= {s:.6g}; {ref}.running_var /= {s:.6g}")
    for mm, vv, how in ((m, v, ""), (site.bn.raw_mean, site.bn.raw_var, " and not divided by s")):
        if _close(cm, vv) and _close(cv, mm):
            div = f" / {s:.6g}" if how else ""
            return ("bn_stats_swapped",
                    f"torch {path}'s running_mean and running_var are swapped{how}",
                    quote + f"; Caffe uses mean {m[k]:.6g}, variance {v[k]:.6g}",
                    f"{ref}.running_mean, {ref}.running_var = ({ref}.running_var{div}).clone(), "
                    f"({ref}.running_mean{div}).clone()")
    rm, rv = _ratio(cm, m), _ratio(cv, v)
    if rm is not None and rv is not None and max(abs(rm - 1), abs(rv - 1)) > 1e-3:
        wrong = {name: r for name, r in (("running_mean", rm), ("running_var", rv))
                 if abs(r - 1) > 1e-3}
        parts = []
        for name, r in wrong.items():
            d = s / r
            what = f"divided by {d:.6g}"
            if abs(d - 1) <= 1e-3:
                what = "not divided at all"
            elif abs(d - s * s) <= 1e-3 * s * s:
                what = f"divided by s twice (s^2 = {d:.6g})"
            parts.append(f"{name} is Caffe's blob {what}")
        return ("bn_scale_factor",
                f"torch {path}: " + "; ".join(parts) + f"; Caffe {bn} divides both by its "
                f"scale factor s = {s:.6g} (blob2)", quote,
                "; ".join(f"{ref}.{name} *= {1 / r:.7g}" for name, r in wrong.items()))
    return ("bn_running_stats",
            f"torch {path}'s running statistics differ from Caffe {bn}'s (blob0/s, blob1/s)",
            quote + f"; Caffe uses mean {m[k]:.6g}, variance {v[k]:.6g}",
            f"{ref}.running_mean.copy_(torch.from_numpy(blob0 / s)); "
            f"{ref}.running_var.copy_(torch.from_numpy(blob1 / s))  # Caffe {bn}'s blobs")


def solve_eps(site: BNSite) -> tuple[float, int] | None:
    """The eps the candidate module behaves as, from its output on the reference's input.

    Per channel, ``y = gamma (x - m)/k + beta`` gives ``k = sqrt(var + eps)`` by least squares,
    so ``eps = k^2 - var``. Rounding makes that exact only where ``var`` is small, so the
    median is taken over the quarter of channels with the smallest variance. Returns
    (eps, channels used).
    """
    import torch

    if site.pos != 0 or not site.case.ref_inputs:
        return None
    x = np.asarray(site.case.ref_inputs[0])
    if x.ndim < 2:
        return None
    m = captured_copy(site.case, site.pos, site.module)
    like = site.module.running_mean
    with torch.no_grad():
        y = m(torch.as_tensor(np.array(x)).to(like)).double().cpu().numpy()
    c = site.cand
    xc = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    yc = np.moveaxis(y, 1, 0).reshape(x.shape[1], -1)
    t = xc - c.mean[:, None]
    ok = np.abs(c.gamma) > 1e-6
    u = (yc - c.beta[:, None]) / np.where(ok, c.gamma, 1.0)[:, None]
    tu, tt = (t * u).sum(1), (t * t).sum(1)
    ok &= (tu > 0) & (tt > 0)
    if not ok.any():
        return None
    eps = (tt[ok] / tu[ok]) ** 2 - c.var[ok]
    low = np.argsort(c.var[ok])[: max(1, ok.sum() // 4)]
    return float(np.median(eps[low])), int(low.size)


def _eps_story(site: BNSite) -> tuple[str, str, str, str]:
    have, want = site.cand.eps, site.bn.eps
    solved = solve_eps(site)
    how = "" if solved is None else (
        f" (its output on Caffe's input solves to eps = {solved[0]:.3g}, median over the "
        f"{solved[1]} lowest-variance channels)")
    return ("bn_eps",
            f"torch {site.path} uses eps = {have:.3g}, Caffe {site.bn.layer.name} eps = {want:.3g}",
            f"torch {site.path}.eps = {have:.6g}{how}; Caffe {site.bn.layer.name} "
            f"batch_norm_param.eps = {want:.6g}; Caffe's variances (blob1/s) have median "
            f"{float(np.median(site.caffe.var)):.4g}",
            f"{site.mref}.eps = {want:.6g}")


def _affine_story(path: str, ref: str, scale: Any, gamma: np.ndarray, beta: np.ndarray,
                  have_g: np.ndarray | None, have_b: np.ndarray | None
                  ) -> tuple[str, str, str, str]:
    """(kind, cause, evidence, fix) for a per-channel gamma/beta that differ from a Scale's."""
    name = scale.name
    hg = np.ones_like(gamma) if have_g is None else have_g
    hb = np.zeros_like(beta) if have_b is None else have_b
    k = int(np.argmax(np.abs(hg - gamma) + np.abs(hb - beta)))
    quote = (f"torch {path}.weight[{k}] = {hg[k]:.6g}, bias[{k}] = {hb[k]:.6g}; Caffe {name} "
             f"gamma[{k}] = {gamma[k]:.6g}, beta[{k}] = {beta[k]:.6g}")
    copy_fix = (f"{ref}.weight.data.copy_(torch.from_numpy(gamma)); "
                f"{ref}.bias.data.copy_(torch.from_numpy(beta))  # Caffe {name}'s blob0, blob1")
    if have_g is None:
        return ("bn_affine_missing",
                f"Caffe {name}'s gamma/beta are not applied: torch {path} has no affine "
                "parameters (affine=False) and nothing after it scales",
                quote, f"build {path} with affine=True, then " + copy_fix)
    if np.all(hg == 1) and np.all(hb == 0):
        return ("bn_affine_missing",
                f"Caffe {name}'s gamma/beta were not merged into torch {path} "
                "(weight 1, bias 0 as initialised)", quote, copy_fix)
    if _close(hg, beta) and _close(hb, gamma):
        return ("bn_affine_swapped", f"torch {path}'s weight and bias are swapped "
                f"(weight holds Caffe {name}'s beta, bias its gamma)", quote,
                f"{ref}.weight.data, {ref}.bias.data = {ref}.bias.data.clone(), "
                f"{ref}.weight.data.clone()")
    return ("bn_affine_mismatch",
            f"torch {path}'s weight/bias differ from Caffe {name}'s gamma/beta", quote, copy_fix)


def _with(have: BNParams, want: BNParams, components: list[str]) -> BNParams:
    """``have`` with ``want``'s value for each of ``components``."""
    for c in components:
        if c == "stats":
            have = replace(have, mean=want.mean, var=want.var)
        elif c == "eps":
            have = replace(have, eps=want.eps)
        elif c == "affine":
            have = replace(have, gamma=want.gamma, beta=want.beta)
    return have


def _differences(site: BNSite) -> dict[str, BNParams]:
    """Per differing component, the candidate's numbers with Caffe's value for it."""
    have, want = site.cand, site.caffe
    differ = []
    if site.bn.use_global and not (_close(have.mean, want.mean) and _close(have.var, want.var)):
        differ.append("stats")
    if abs(have.eps - want.eps) > 1e-3 * max(abs(want.eps), 1e-30):
        differ.append("eps")
    if site.bn.scale is not None and not (_close(have.gamma, want.gamma)
                                       and _close(have.beta, want.beta)):
        differ.append("affine")
    return {c: _with(have, want, [c]) for c in differ}


def _story(site: BNSite, component: str) -> tuple[str, str, str, str]:
    if component == "stats":
        return _stats_story(site)
    if component == "eps":
        return _eps_story(site)
    m = site.module
    return _affine_story(site.path, site.mref, site.bn.scale, site.caffe.gamma, site.caffe.beta,
                         None if getattr(m, "weight", None) is None else site.cand.gamma,
                         None if getattr(m, "bias", None) is None else site.cand.beta)


def _single(case: LayerCase, component: str, name: str) -> Finding | None:
    site = bn_site(case)
    if site is None:
        return None
    fixed = _differences(site).get(component)
    if fixed is None:
        return None
    res = check_fix(case, before=site.before, out=_run(site, fixed))
    if res is None:
        return None
    kind, cause, evidence, fix = _story(site, component)
    return _finding(site, kind, cause, evidence, fix, res, name, fixed, component=component)


# -- the probes ---------------------------------------------------------------------------------


@probe("bn_running_stats")
def bn_running_stats(case: LayerCase) -> Finding | None:
    """Running statistics not divided by Caffe's scale factor (or divided wrongly, or s == 0
    ignored), mean and variance swapped, or simply other statistics."""
    return _single(case, "stats", "bn_running_stats")


@probe("bn_eps")
def bn_eps(case: LayerCase) -> Finding | None:
    """torch eps differs from Caffe's batch_norm_param.eps."""
    return _single(case, "eps", "bn_eps")


@probe("bn_affine")
def bn_affine(case: LayerCase) -> Finding | None:
    """Caffe's Scale (gamma/beta) missing from, swapped in, or different in the candidate: in a
    torch BatchNorm that merges BatchNorm + Scale, or in a separate per-channel affine module."""
    if bn_site_possible(case):
        return _single(case, "affine", "bn_affine")
    return _scale_only(case)


@probe("bn_params")
def bn_params(case: LayerCase) -> Finding | None:
    """Several BatchNorm components wrong at once (no single fix explains the error)."""
    site = bn_site(case)
    if site is None:
        return None
    diffs = _differences(site)
    if len(diffs) < 2:
        return None
    for fixed in diffs.values():
        if check_fix(case, before=site.before, out=_run(site, fixed)) is not None:
            return None  # one component explains it: that probe reports it
    allfix = _with(site.cand, site.caffe, list(diffs))
    res = check_fix(case, before=site.before, out=_run(site, allfix))
    if res is None:
        return None
    stories = [_story(site, c) for c in diffs]
    return _finding(site, "bn_params", f"{len(stories)} things are wrong in torch {site.path}: "
                    + "; ".join(st[1] for st in stories),
                    " | ".join(st[2] for st in stories), "; ".join(st[3] for st in stories),
                    res, "bn_params", allfix, components=list(diffs),
                    kinds=[st[0] for st in stories])


@probe("bn_global_stats")
def bn_global_stats(case: LayerCase) -> Finding | None:
    """Caffe BatchNorm with ``use_global_stats: false`` (batch statistics at TEST) vs a torch
    BatchNorm in eval() using its running statistics."""
    site = bn_site(case)
    if site is None or site.bn.use_global:
        return None
    fixed = replace(site.cand, batch_stats=True)
    res = check_fix(case, before=site.before, out=_run(site, fixed))
    if res is None:
        return None
    x = np.asarray(case.ref_inputs[0], np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    bm, bv = x.mean(axis=axes), x.var(axis=axes)
    k = int(np.argmax(np.abs(bm - site.cand.mean) / np.sqrt(bv + site.cand.eps)))
    n = x.size // x.shape[1]
    bn = site.bn.layer.name
    f = _finding(
        site, "bn_use_global_stats_false",
        f"Caffe {bn} has use_global_stats: false, so it normalises with the batch's own "
        f"mean and variance even at TEST; torch {site.path} (eval) uses its running statistics",
        f"channel {k}: batch mean {bm[k]:.6g}, variance {bv[k]:.6g} (over {n} values); torch "
        f"{site.path}.running_mean[{k}] = {site.cand.mean[k]:.6g}, running_var[{k}] = "
        f"{site.cand.var[k]:.6g}",
        f"{site.mref}.track_running_stats = False; {site.mref}.running_mean = None; "
        f"{site.mref}.running_var = None  # batch statistics like Caffe (or, if the prototxt is "
        f"wrong, set use_global_stats: true in {bn})",
        res, "bn_global_stats")
    p = Patch()  # batch statistics: what F.batch_norm does without running statistics
    p.set_attr(site.path, "track_running_stats", False)
    p.set_attr(site.path, "running_mean", None)
    p.set_attr(site.path, "running_var", None)
    return p.attach(f)


def bn_site_possible(case: LayerCase) -> bool:
    """Cheap: a Caffe BatchNorm in the reference group and a torch BatchNorm in the candidate's."""
    return any(lay.type == "BatchNorm" for lay in case.caffe_layers()) and \
        any(is_torch_bn(m) for m in case.cand_modules())


def _scale_only(case: LayerCase) -> Finding | None:
    """A Caffe Scale paired with a separate per-channel affine module (weight[C], bias[C])."""
    import torch

    layers = case.caffe_layers()
    scale = next((lay for lay in layers if lay.type == "Scale" and lay.blobs), None)
    if scale is None or any(lay.type == "BatchNorm" for lay in layers) or not case.ref_inputs:
        return None
    c = _vec(scale.blobs[0]).size
    x = case.ref_inputs[0]
    if np.ndim(x) < 2 or np.shape(x)[1] != c:
        return None
    mods = case.cand_modules()
    pos = next((k for k, m in enumerate(mods) if m is not None and not is_torch_bn(m)
                and isinstance(getattr(m, "weight", None), torch.Tensor)
                and m.weight.numel() == c), None)
    if pos is None:
        return None
    module = mods[pos]
    base = case.rerun(replace={pos: captured_fn(case, pos, module)})
    before = output_error(case.ref_output, base)
    if before is None or before <= case.tolerance:
        return None
    params = case.cand_records[pos].params or {}
    hg = _vec(params["weight"]) if "weight" in params else _tensor_np(module.weight)
    hb = _vec(params["bias"]) if "bias" in params else _tensor_np(getattr(module, "bias", None))
    like = module.weight
    same = output_error(base, case.rerun(replace={pos: affine_module(hg, hb, like)}))
    if same is None or same > case.tolerance:
        return None  # not a plain x * weight + bias
    gamma, beta = _scale_params(scale, c)
    has_bias = len(scale.blobs) > 1
    res = check_fix(case, before=before, out=case.rerun(
        replace={pos: affine_module(gamma, beta if has_bias or hb is not None else None, like)}))
    if res is None:
        return None
    rec = case.cand_records[pos]
    path = rec.attrs.get("module") or rec.name
    kind, cause, evidence, fix = _affine_story(path, module_ref(path), scale, gamma, beta, hg,
                                               hb)
    before, after, frac = res.before, res.after, res.explained
    f = Finding(kind, case.name, cause,
                evidence + f"; re-run with the fix: max error {before:.4g} -> {after:.3g}",
                fix, frac, before, after, "bn_affine", {"component": "affine"})
    p = Patch()
    p.set_tensor(path, "weight", gamma)
    if has_bias or hb is not None:
        p.set_tensor(path, "bias", beta, new=getattr(module, "bias", None) is None)
    return p.attach(f)

"""Train-mode probes: BatchNorm/Dropout layers of the candidate running in train mode.

- ``train_mode`` (model-wide): the model arrived in train mode and the capture called ``eval()``
  first (trace meta ``arrived_in_train_mode``; ``training_modules`` lists what still trained).
  The comparison cannot show the problem then, so this finding says it, with what one such
  layer does differently in train mode.
- ``train_mode_layer``: the candidate was captured in train mode (``keep_train_mode``) and a
  failing BatchNorm/Dropout re-run in ``eval()`` matches the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.batchnorm import (
    caffe_bn,
    captured_copy,
    captured_fn,
    captured_training,
    first_tensor,
    module_ref,
    output_error,
    torch_fn,
)
from layerdiff.diagnose.probes.counterfactual import check_fix

#: how many mode-dependent layers the model-wide probe re-runs in train mode for its evidence
MAX_EXAMPLES = 3


def mode_kind(m: Any) -> str | None:
    """``"batchnorm"`` / ``"dropout"`` for modules whose output depends on train/eval mode."""
    if m is None:
        return None
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None:
        return "batchnorm"
    if isinstance(m, (_DropoutNd, nn.AlphaDropout)) and m.p > 0:
        return "dropout"
    return None


def _kind_by_name(kind: str) -> str | None:
    if "BatchNorm" in kind:
        return "batchnorm"
    if "Dropout" in kind:
        return "dropout"
    return None


def _channel_stats(x: np.ndarray, unbiased: bool) -> tuple[np.ndarray, np.ndarray, int]:
    x = np.asarray(x, np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    n = x.size // x.shape[1]
    return x.mean(axis=axes), x.var(axis=axes, ddof=1 if unbiased and n > 1 else 0), n


def _caffe_stats(case: LayerCase, fixed: Any) -> str | None:
    """Load the reference's BatchNorm statistics into ``fixed``; returns the Caffe layer name.

    The candidate's own running statistics cannot serve: every forward in train mode (the
    capture's, the diagnosis' re-runs) moved them, and the trace's copies may be views of them.
    """
    import torch

    ref = caffe_bn(case)
    if ref is None or not ref.use_global or ref.raw_mean.size != fixed.running_mean.numel():
        return None
    with torch.no_grad():
        fixed.running_mean.copy_(torch.as_tensor(ref.mean).to(fixed.running_mean))
        fixed.running_var.copy_(torch.as_tensor(ref.var).to(fixed.running_var))
    return ref.layer.name


@probe("train_mode_layer")
def train_mode_layer(case: LayerCase) -> Finding | None:
    """A BatchNorm/Dropout captured in train mode whose eval() re-run matches the reference."""
    mods = case.cand_modules()
    pos = next((k for k, m in enumerate(mods) if mode_kind(m) and captured_training(case, k)),
               None)
    if pos is None:
        return None
    m = mods[pos]
    kind = mode_kind(m)
    rec = case.cand_records[pos]
    path = rec.attrs.get("module") or rec.name
    before = output_error(case.ref_output, case.rerun(replace={pos: captured_fn(case, pos, m)}))
    if before is None or before <= case.tolerance:
        return None
    fixed = captured_copy(case, pos, m).eval()
    stats_from = _caffe_stats(case, fixed) if kind == "batchnorm" else None
    like = first_tensor(fixed)
    out = case.rerun(replace={pos: fixed if like is None else torch_fn(fixed, like)})
    res = check_fix(case, out, before=before)
    if res is None:
        return None
    before, after, frac = res.before, res.after, res.explained
    ref = module_ref(path)
    if kind == "batchnorm":
        bm, bv, n = _channel_stats(case.ref_inputs[0], unbiased=False)
        rm = fixed.running_mean.detach().double().cpu().numpy()
        rv = fixed.running_var.detach().double().cpu().numpy()
        c = int(np.argmax(np.abs(bm - rm) / np.sqrt(rv + fixed.eps)))
        cause = (f"torch {path} ran in train mode: BatchNorm normalised with the batch's own "
                 "statistics instead of its running statistics")
        evidence = (f"channel {c}: batch mean {bm[c]:.6g}, variance {bv[c]:.6g} (over {n} values)"
                    f"; running_mean[{c}] = {rm[c]:.6g}, running_var[{c}] = {rv[c]:.6g}")
        if stats_from:
            evidence += (f" (Caffe {stats_from}'s blob0/s, blob1/s: running a BatchNorm in train "
                         "mode moves its running statistics towards the batch's, so torch's "
                         "no longer hold the loaded values)")
    else:
        x = np.asarray(rec.handle.inputs[0].detach().cpu().numpy()) if rec.handle else None
        y = np.asarray(rec.outputs[0])
        zeroed = float(np.mean((y == 0) & (x != 0))) if x is not None and \
            x.shape == y.shape else float("nan")
        cause = (f"torch {path} ran in train mode: Dropout zeroed values at random and scaled "
                 "the rest; Caffe's Dropout passes its input through at TEST")
        evidence = (f"{type(m).__name__}(p={m.p:g}) zeroed {zeroed:.0%} of its output in the "
                    f"capture and scaled the rest by {1 / (1 - m.p):.4g}")
    evidence += f"; re-run in eval(): max error {before:.4g} -> {after:.3g}"
    return Finding("layer_train_mode", case.name, cause, evidence,
                   f"model.eval()  # before inference (at least {ref}.eval())", frac, before,
                   after, "train_mode_layer", {"module": path, "layer_kind": kind},
                   patch="model.eval()")


@probe("train_mode", model_wide=True)
def train_mode(report: Any) -> Finding | None:
    """The model arrived in train mode (layerdiff compared it in eval())."""
    meta = report.candidate.meta
    arrived = set(meta.get("arrived_in_train_mode") or [])
    if not arrived or meta.get("mode_fixed_at_export"):
        return None
    still = set(meta.get("training_modules") or [])
    sites: list[tuple[Any, Any, str]] = []
    seen: set[str] = set()
    for rec in report.candidate:
        path = rec.attrs.get("module")
        fn = getattr(rec.handle, "fn", None)
        if path is None or path not in arrived or path in still or path in seen:
            continue  # a layer still training is the per-layer probe's business
        # A saved trace has no modules: go by the recorded class name.
        kind = mode_kind(fn) if fn is not None else _kind_by_name(rec.kind)
        if kind is not None:
            seen.add(path)
            sites.append((rec, fn, kind))
    if not sites:
        return None  # nothing whose output depends on the mode
    nbn = sum(k == "batchnorm" for _, _, k in sites)
    ndrop = len(sites) - nbn
    what = " and ".join(x for x in (f"{nbn} BatchNorm" if nbn else "",
                                     f"{ndrop} Dropout" if ndrop else "") if x)
    effects = _train_effects(sites)
    names = ", ".join(rec.attrs["module"] for rec, _, _ in sites[:4])
    evidence = (f"trace meta arrived_in_train_mode lists {len(arrived)} modules, among them "
                f"{what} layers ({names}{', ...' if len(sites) > 4 else ''})")
    if effects:
        evidence += "; re-run in train mode on the inputs they saw: " + "; ".join(effects)
    return Finding(
        "model_train_mode", "",
        f"the candidate model arrived in train mode ({what} layers affected); layerdiff called "
        "eval() before comparing, so inference code that does not call model.eval() will not "
        "reproduce these results",
        evidence, "model.eval()  # before inference", None, None, None, "train_mode",
        {"modules": [rec.attrs["module"] for rec, _, _ in sites]}, patch="model.eval()")


def _train_effects(sites: list[tuple[Any, Any, str]]) -> list[str]:
    """How much the first few mode-dependent layers change in train mode (one line each)."""
    import copy

    import torch

    out = []
    examples = [s for s in sites if s[2] == "batchnorm"][:MAX_EXAMPLES] + \
        [s for s in sites if s[2] == "dropout"][:1]
    for rec, fn, _kind in examples:
        if fn is None or rec.handle is None:
            continue
        try:
            m = copy.deepcopy(fn).train()
            x = rec.handle.inputs
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the user's RNG
                y = m(*x[:1]).detach().cpu().double().numpy()
        except Exception:  # noqa: BLE001 - e.g. a 1-value batch cannot be normalised in train
            continue
        ref = np.asarray(rec.outputs[0], np.float64)
        if y.shape != ref.shape:
            continue
        d = float(np.abs(y - ref).max())
        out.append(f"{rec.attrs['module']} ({type(fn).__name__}) changes by up to {d:.4g} "
                   f"(its output's max |value| {float(np.abs(ref).max()):.4g})")
    return out

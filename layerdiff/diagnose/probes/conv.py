"""Probes for convolution / InnerProduct porting mistakes, each proved by a re-run.

- ``conv_weight_layout``: the torch kernel is Caffe's flipped spatially (convolution instead of
  correlation), transposed kh <-> kw, transposed out <-> in, or with its input channels reversed
  (BGR/RGB); tried as counterfactuals on the module's own weight, so it also catches a module
  that stores the right weights but computes with them that way.
- ``conv_groups``: torch ``groups`` differs from Caffe's ``group`` (a depthwise conv written as
  a dense one, often with the kernel broadcast by ``copy_``).
- ``missing_bias``: Caffe has a non-zero bias blob; the torch conv/linear has none (or zeros).

A finding the weight audit already made at the same pair (same kind) is not repeated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerdiff.diagnose.audit import (
    CONV_TYPES,
    TRANSFORMS,
    RefLayer,
    captured_training,
    close,
    evidence,
    forms,
    module_fn,
    reported,
)
from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import module_patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import Fixed, check_fix

#: a fix must remove at least this fraction of the error


@dataclass
class Site:
    """The Caffe layer with weights in the pair and the torch module doing its work."""

    case: LayerCase
    rec: Any  # reference record (params "0", "1", ...)
    pos: int  # position of the module in the candidate group
    module: Any
    path: str  # module path in the torch model

    @property
    def blobs(self) -> list[np.ndarray]:
        keys = sorted((k for k in self.rec.params if k.isdigit()), key=int)
        return [np.asarray(self.rec.params[k]) for k in keys]

    def layer(self) -> RefLayer:
        first = self.rec.bottoms[0] if self.rec.bottoms else None
        shape = None
        if first is not None:
            v = self.case.ref_trace.value_before(first, self.rec.index)
            shape = None if v is None else tuple(np.shape(v))
        return RefLayer(self.rec.name, self.rec.kind, self.blobs, shape, None)

    def copy(self) -> Any:
        return copy.deepcopy(self.module)

    def run(self, fixed: Any) -> Fixed | None:
        """The pair re-run with ``fixed`` in place of the module, if it removes the error."""
        fn = module_fn(fixed, captured_training(self.case.cand_trace, self.path), 1)
        return check_fix(self.case, self.case.rerun(replace={self.pos: fn}))

    def ref_inputs_ok(self) -> bool:
        return bool(self.case.ref_inputs) and np.ndim(self.case.ref_inputs[0]) == 4

    @property
    def handle(self) -> str:
        return f'model.get_submodule("{self.path}")' if self.path else "model"


def _site(case: LayerCase, ref_types: set[str], torch_types: tuple[str, ...]) -> Site | None:
    from torch import nn

    classes = tuple(getattr(nn, t) for t in torch_types)
    recs = [r for r in case.ref_records if r.kind in ref_types and "0" in r.params]
    if not recs:
        return None
    for pos, mod in enumerate(case.cand_modules()):
        if isinstance(mod, classes):
            return Site(case, recs[0], pos, mod, case.cand_records[pos].name.split("#", 1)[0])
    return None


def _finding(site: Site, kind: str, cause: str, ev: str, fix: str,
             imp: Fixed, probe_name: str, fixed: Any = None) -> Finding | None:
    if reported(site.case.report, kind, site.case.name):
        return None  # the weight audit said it already, with the same re-run
    before, after, frac = imp.before, imp.after, imp.explained
    ev += f"; re-run with the fix: {imp.numbers()} (tolerance {site.case.tolerance:.3g})"
    f = Finding(kind, site.case.name, cause, ev, fix, frac, before, after, probe_name,
                {"module": site.path, "caffe_layer": site.rec.name})
    patch = module_patch(site.path, site.module, fixed) if fixed is not None else None
    return patch.attach(f) if patch is not None else f


# -- weight layout ---------------------------------------------------------------------------

_LAYOUTS: list[tuple[str, str]] = [
    ("conv_kernel_flipped", "m.weight.data = m.weight.data.flip(2, 3)"),
    ("conv_kernel_hw_transposed", "m.weight.data = m.weight.data.transpose(2, 3).contiguous()"),
    ("conv_weight_transposed", "m.weight.data = m.weight.data.transpose(0, 1).contiguous()"),
    ("bgr_rgb_first_conv", "m.weight.data = m.weight.data.flip(1)"),
]


def _relayout(kind: str, w: Any) -> Any:
    """The layout fix (its own inverse) applied to a torch weight, or None when it does not
    apply to this shape."""
    o, i, kh, kw = w.shape
    if kind == "conv_kernel_flipped" and kh * kw > 1:
        return w.flip(2, 3)
    if kind == "conv_kernel_hw_transposed" and kh == kw > 1:
        return w.transpose(2, 3).contiguous()
    if kind == "conv_weight_transposed" and o == i > 1:
        return w.transpose(0, 1).contiguous()
    if kind == "bgr_rgb_first_conv" and i == 3:
        return w.flip(1)
    return None


@probe("conv_weight_layout")
def conv_weight_layout(case: LayerCase) -> Finding | None:
    site = _site(case, CONV_TYPES - {"Deconvolution"}, ("Conv2d",))
    if site is None or site.module.weight.dim() != 4:
        return None
    import torch

    w = site.module.weight.detach()
    for kind, fix in _LAYOUTS:
        if reported(case.report, kind, case.name):
            return None
        new = _relayout(kind, w)
        if new is None:
            continue
        fixed = site.copy()
        with torch.no_grad():
            fixed.weight.copy_(new)
        imp = site.run(fixed)
        if imp is None:
            continue
        return _finding(site, kind, f"{TRANSFORMS[kind]}: torch {site.path or '(root)'} vs "
                        f"Caffe {site.rec.name}", _layout_evidence(site, kind, w), f"m = "
                        f"{site.handle}; {fix}", imp, "conv_weight_layout", fixed)
    return None


def _layout_evidence(site: Site, kind: str, w: Any) -> str:
    """Whether the stored weights are Caffe's rearranged, with values, or the op is."""
    lay = site.layer()
    blob = lay.blobs[0]
    got = w.float().cpu().numpy()
    form = next((f for f in forms(lay, 0) if f.status == kind), None)
    if form is None and kind == "bgr_rgb_first_conv":
        form = next((f for f in forms(RefLayer(lay.name, lay.type, lay.blobs, None, True), 0)
                     if f.status == kind), None)
    if form is not None and close(form.fn(blob), got, 1e-3):
        return evidence(lay.name, 0, blob, f"{site.path}.weight", got, form, blob)
    if close(blob, got, 1e-3):
        return (f"torch {site.path}.weight equals Caffe {lay.name} blob0, yet the module's "
                "output matches Caffe only with the kernel rearranged: the module computes "
                "with it that way")
    return f"torch {site.path}.weight rearranged this way brings the output to Caffe's"


# -- groups -----------------------------------------------------------------------------------


@probe("conv_groups")
def conv_groups(case: LayerCase) -> Finding | None:
    site = _site(case, CONV_TYPES - {"Deconvolution"}, ("Conv2d",))
    if site is None:
        return None
    lays = [lay for lay in case.caffe_layers() if lay.name == site.rec.name]
    if not lays or not site.ref_inputs_ok():
        return None
    g = int(lays[0].param.convolution_param.group or 1)
    mod = site.module
    if mod.groups == g:
        return None
    import torch
    from torch import nn

    blobs = site.blobs
    w = blobs[0]
    in_ch = int(np.shape(site.case.ref_inputs[0])[1])
    if w.ndim != 4 or w.shape[1] * g != in_ch:
        return None
    bias = mod.bias is not None or len(blobs) > 1
    like = mod.weight
    new = nn.Conv2d(in_ch, w.shape[0], tuple(w.shape[2:]), mod.stride, mod.padding,
                    mod.dilation, g, bias, mod.padding_mode).to(like.device, like.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.from_numpy(np.array(w)))
        if bias:
            b = mod.bias.detach() if mod.bias is not None and mod.bias.numel() == w.shape[0] \
                else torch.from_numpy(np.array(blobs[1]))
            new.bias.copy_(b)
    imp = site.run(new)
    if imp is None:
        return None
    tw = mod.weight.detach().float().cpu().numpy()
    ev = (f"Caffe {site.rec.name} has group = {g} (weight {list(w.shape)}); torch "
          f"{site.path} has groups = {mod.groups} (weight {list(tw.shape)})")
    if tw.shape[1] != w.shape[1] and tw.shape[0] == w.shape[0] and w.shape[1] == 1 and \
            close(np.broadcast_to(w, tw.shape), tw, 1e-3):
        ev += (f"; every torch weight[:, j] equals Caffe blob0[:, 0] (e.g. weight[0, 1, 0, 0] "
               f"= {tw[0, 1, 0, 0]:.6g} = blob0[0, 0, 0, 0]): the depthwise kernel was "
               "broadcast over all input channels (copy_ broadcasts silently)")
    parent, _, leaf = site.path.rpartition(".")
    owner = f'model.get_submodule("{parent}")' if parent else "model"
    k = tuple(w.shape[2:])
    fix = (f'setattr({owner}, "{leaf}", torch.nn.Conv2d({in_ch}, {w.shape[0]}, {k}, '
           f"stride={tuple(mod.stride)}, padding={mod.padding}, dilation={tuple(mod.dilation)},"
           f" groups={g}, bias={bias}))  # then copy Caffe {site.rec.name} blob0 "
           f"{list(w.shape)} into its weight")
    return _finding(site, "conv_groups", f"torch {site.path} uses groups={mod.groups} where "
                    f"Caffe {site.rec.name} has group={g}", ev, fix, imp, "conv_groups", new)


# -- missing bias -----------------------------------------------------------------------------


@probe("missing_bias")
def missing_bias(case: LayerCase) -> Finding | None:
    site = _site(case, CONV_TYPES | {"InnerProduct"},
                 ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear"))
    if site is None or "1" not in site.rec.params:
        return None
    b = np.asarray(site.rec.params["1"]).reshape(-1)
    if not np.any(b):
        return None  # a zero Caffe bias loses nothing
    mod = site.module
    have = None if mod.bias is None else mod.bias.detach().float().cpu().numpy()
    if have is not None and np.any(have):
        return None  # a bias that is there but wrong is a different story
    if getattr(mod, "out_channels", getattr(mod, "out_features", None)) != b.size:
        return None
    import torch

    fixed = site.copy()
    like = mod.weight
    with torch.no_grad():
        fixed.bias = torch.nn.Parameter(torch.from_numpy(np.array(b)).to(like.device, like.dtype))
    imp = site.run(fixed)
    if imp is None:
        return None
    k = int(np.argmax(np.abs(b)))
    what = "has no bias (bias=None)" if have is None else "has an all-zero bias"
    ev = (f"torch {site.path} {what}; Caffe {site.rec.name} blob1 has {b.size} values, "
          f"b[{k}] = {b[k]:.6g} (max |b|)")
    fix = (f'm = {site.handle}; m.bias = torch.nn.Parameter(torch.from_numpy(caffe_blobs'
           f'["{site.rec.name}"][1]))  # or build it with bias=True and copy blob1')
    return _finding(site, "missing_bias", f"{TRANSFORMS['missing_bias']}: torch {site.path} "
                    f"drops Caffe {site.rec.name}'s bias", ev, fix, imp, "missing_bias", fixed)

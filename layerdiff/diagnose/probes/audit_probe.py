"""Model-wide probe: the weight audit, run on the compared traces' recorded parameters.

Every Caffe blob that reaches the torch port through a named mistake (transposed, flipped,
BGR, HWC flatten order, scale factor not divided, swapped, Scale not merged, bias missing)
becomes a Finding at the aligned pair that holds it. The fix is applied to a copy of the torch
module and the pair re-run on the reference's inputs, so the finding says how much of the
layer's error it removes. A transform at a pair that passes is not reported: the port
compensates elsewhere (e.g. permutes before an HWC-ordered Linear), except a BGR flip hidden by
a constant input.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from layerdiff.diagnose.audit import (
    ROLES,
    RTOL,
    TRANSFORMS,
    BlobCheck,
    RefLayer,
    audit_layers,
    bn_factor,
    cand_from_trace,
    captured_training,
    forms,
    module_fn,
    note_reported,
    ref_layers_from_trace,
)
from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import Patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import Fixed, check_fix

NAME = "weight_audit"
#: more layers than this with one transform: one finding for all of them (a systematic loader
#: bug), measured at the first
GROUP_AT = 3


@probe(NAME, model_wide=True)
def weight_audit(report: Any) -> list[Finding] | None:
    ref, cand = report.reference, report.candidate
    if cand.meta.get("framework") == "onnx":
        return None  # its fixes are torch loading code; onnx_nodes.py speaks in ONNX terms
    layers = ref_layers_from_trace(ref)
    if report:
        # A passing port is audited only for what its input cannot show: the layers reading
        # the model input (a BGR/RGB swap under a constant input).
        first = {r.name for r in ref.records if r.bottoms and set(r.bottoms) <= set(ref.inputs)}
        layers = [lay for lay in layers if lay.name in first]
    params, kinds = cand_from_trace(cand)
    if not layers or not params:
        return None  # not a Caffe reference with blobs, or a candidate without parameters
    result = audit_layers(layers, params, cand_kinds=kinds,
                          rtol=RTOL.get(str(cand.meta.get("dtype", "float32")), 1e-5))
    by_name = {lay.name: lay for lay in layers}
    groups: dict[str, list[BlobCheck]] = {}
    for c in result.transforms:
        groups.setdefault(c.status, []).append(c)
    out: list[Finding] = []
    for status, checks in groups.items():
        names = list(dict.fromkeys(c.layer for c in checks))
        units = [names] if len(names) > GROUP_AT else [[n] for n in names]
        for unit in units:
            f = _finding(report, status, [c for c in checks if c.layer in unit], by_name,
                         result.transforms)
            if f is not None:
                out.append(f)
                note_reported(report, f.kind, f.layer)
    order = {lay.name: i for i, lay in enumerate(layers)}
    out.sort(key=lambda f: order.get(f.data.get("layers", [""])[0], 0))
    return out


def _pair_of(report: Any, layer: str) -> Any:
    for res in report.results:
        if any(r.name == layer for r in res.pair.ref):
            return res
    return None


def case_for(report: Any, res: Any) -> LayerCase:
    """A LayerCase for one result, reusing the local error diagnose already measured."""
    first = res.pair.ref[0]
    inputs = [report.reference.value_before(b, first.index) for b in first.bottoms]
    case = LayerCase(res, report, [np.asarray(x) for x in inputs if x is not None])
    case.local_metrics = res.local
    return case


def _finding(report: Any, status: str, checks: list[BlobCheck],
             by_name: dict[str, RefLayer], every: list[BlobCheck]) -> Finding | None:
    first = checks[0]
    layers = list(dict.fromkeys(c.layer for c in checks))
    res = _pair_of(report, first.layer)
    before = after = explained = None
    label = False
    others: list[str] = []
    where = first.layer
    if res is not None:
        case = case_for(report, res)
        where = case.name
        if res.passed or res.local_passed is True:
            # the port compensates (flips its input, permutes before the flatten), unless
            # the input cannot show the mistake at all
            constant = any(n.startswith("constant input") for n in report.notes)
            if not (status == "bgr_rgb_first_conv" and constant):
                return None
            label = True  # proven from the weights; the input cannot test a fix
        else:
            # Every rearranged weight the audit found at this layer is set right in the re-run:
            # two bugs in one layer are each only half the story.
            group = {r.name for r in res.pair.ref}
            here = [c for c in every if c.layer in group]
            others = sorted({c.status for c in here} - {status})
            imp = _measure(case, here, by_name)
            if imp is not None:
                before, after, explained = imp.before, imp.after, imp.explained
    lay = by_name[first.layer]
    evidence = first.detail
    if len(layers) > 1:
        evidence += f"; the same at {len(layers) - 1} more layer(s): {_few(layers[1:])}"
    if before is not None:
        also = f" (and the {', '.join(others)} fix here)" if others else ""
        evidence += (f"; with the fix{also} the pair's error goes {before:.4g} -> {after:.4g} "
                     f"(tolerance {res.tolerance:.3g})")
    elif res is not None and res.passed:
        evidence += "; no error shows on this input (a constant input hides a channel swap)"
    cause = f"{TRANSFORMS[status]}: Caffe {first.layer}"
    if first.module is not None:
        cause += f" -> torch {first.module or '(root)'}"
    if len(layers) > 1:
        cause += f" and {len(layers) - 1} more layer(s)"
    f = Finding(status, where, cause, evidence, _fix(status, first, lay, len(layers) > 1),
                explained, before, after, NAME,
                {"layers": layers, "tensors": [c.torch_name for c in checks],
                 **({"label": True} if label else {})})
    return _patch(checks, by_name).attach(f) if explained is not None and not label else f


def _patch(checks: list[BlobCheck], by_name: dict[str, RefLayer]) -> Patch:
    """Every named tensor set to the correct form of its Caffe blob (the values ``_measure``
    proves on the first layer), in every layer the finding covers."""
    p = Patch()
    for c in checks:
        lay = by_name[c.layer]
        roles = ROLES.get(lay.type) or ()
        if c.module is None:
            continue
        for k in _blobs_to_fix(c, lay):
            leaf = roles[k] if k < len(roles) and roles[k] else \
                (c.torch_name or "").rsplit(".", 1)[-1]
            if not leaf or k >= len(lay.blobs):
                continue
            value = np.asarray(forms(lay, k)[0].fn(np.asarray(lay.blobs[k])))
            if c.status == "missing_bias":
                p.set_tensor(c.module, leaf, value.reshape(-1), new=True)
            else:
                p.set_tensor(c.module, leaf, value)
    return p


def _measure(case: LayerCase, checks: list[BlobCheck],
             by_name: dict[str, RefLayer]) -> Fixed | None:
    """Re-run the pair with the torch tensors set to what Caffe's blobs say they should be."""
    import torch

    mods = case.cand_modules()
    replace: dict[int, Any] = {}
    for module_path in dict.fromkeys(c.module for c in checks):
        pos = next((k for k, c in enumerate(case.cand_records)
                    if c.name.split("#", 1)[0] == module_path), None)
        if pos is None or mods[pos] is None:
            return None
        fixed = copy.deepcopy(mods[pos])
        with torch.no_grad():
            for c in (c for c in checks if c.module == module_path):
                if not _set_blobs(fixed, c, by_name[c.layer]):
                    return None
        replace[pos] = module_fn(fixed, captured_training(case.cand_trace, module_path or ""))
    return check_fix(case, case.rerun(replace=replace))


def _set_blobs(fixed: Any, c: BlobCheck, lay: RefLayer) -> bool:
    """Set ``fixed``'s tensors of check ``c`` to Caffe's values; False when they do not fit."""
    import torch

    roles = ROLES.get(lay.type) or ()
    for k in _blobs_to_fix(c, lay):
        leaf = roles[k] if k < len(roles) else None
        if leaf is None or not hasattr(fixed, leaf):  # not named weight/bias/...
            leaf = (c.torch_name or "").rsplit(".", 1)[-1]
        value = np.asarray(forms(lay, k)[0].fn(np.asarray(lay.blobs[k])))
        cur = getattr(fixed, leaf, None)
        if isinstance(cur, torch.Tensor):
            if cur.numel() != value.size:
                return False
            cur.copy_(torch.from_numpy(np.array(value)).reshape(cur.shape))
        elif leaf == "bias" and hasattr(fixed, "bias"):
            ref = next(iter(fixed.parameters()))
            fixed.bias = torch.nn.Parameter(
                torch.from_numpy(np.array(value)).to(ref.device, ref.dtype))
        else:
            return False
    return True


def _blobs_to_fix(c: BlobCheck, lay: RefLayer) -> list[int]:
    # a swap puts the partner in the wrong slot too: set both
    if c.status in ("bn_stats_swapped", "bn_affine_swapped"):
        return [0, 1][:len(lay.blobs)]
    return [c.index]


def _fix(status: str, c: BlobCheck, lay: RefLayer, many: bool) -> str:
    m = f'm = model.get_submodule("{c.module}"); ' if c.module else "m = model; "
    blob = np.asarray(lay.blobs[c.index])
    if status == "bn_scale_factor":
        f = bn_factor(lay) or 1.0
        s = 1.0 / f if f else 0.0
        if many:
            return ("when loading every BatchNorm: running_mean = blobs[0] / blobs[2][0]; "
                    f"running_var = blobs[1] / blobs[2][0] (here blobs[2][0] = {s:g})")
        return f"{m}m.running_mean /= {s:g}; m.running_var /= {s:g}"
    if status == "bn_stats_swapped":
        return f"{m}m.running_mean, m.running_var = m.running_var.clone(), m.running_mean.clone()"
    if status == "bn_affine_swapped":
        return f"{m}m.weight.data, m.bias.data = m.bias.data.clone(), m.weight.data.clone()"
    if status == "bn_affine_missing":
        return (f'{m}m.weight.data.copy_(torch.from_numpy(caffe["{lay.name}"][0])); '
                f'm.bias.data.copy_(torch.from_numpy(caffe["{lay.name}"][1]))  '
                "# caffe: the Caffe blobs by layer name")
    if status == "conv_weight_transposed":
        return f"{m}m.weight.data = m.weight.data.transpose(0, 1).contiguous()"
    if status == "conv_kernel_hw_transposed":
        return f"{m}m.weight.data = m.weight.data.transpose(2, 3).contiguous()"
    if status == "conv_kernel_flipped":
        return f"{m}m.weight.data = m.weight.data.flip(2, 3)"
    if status == "bgr_rgb_first_conv":
        return (f"{m}m.weight.data = m.weight.data.flip(1)  # or feed the port the same BGR "
                "input Caffe gets")
    if status == "flatten_order":
        o = blob.shape[0]
        s = lay.input_shape or (0, 0, 0, 0)
        return (f"{m}m.weight.data = m.weight.data.view({o}, {s[2]}, {s[3]}, {s[1]})"
                f".permute(0, 3, 1, 2).reshape({o}, -1)")
    if status == "linear_weight_transposed":
        return f"{m}m.weight.data = m.weight.data.t().contiguous()"
    if status == "missing_bias":
        return (f'{m}m.bias = torch.nn.Parameter(torch.from_numpy(caffe["{lay.name}"][1]))  '
                "# or build it with bias=True")
    return ""


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")

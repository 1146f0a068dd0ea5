"""Layout mistakes: softmax/concat axis, concat input order, flatten order before InnerProduct.

Caffe flattens (C, H, W) before an InnerProduct; a port whose Linear weight columns are in
(H, W, C) order (converted for a channels-last flatten), or that permutes to channels-last before
flattening, multiplies the right numbers with the wrong weights. The probes re-run the layer with
the other axis / order / permuted weight columns and report the one that removes the error.

Two of these mistakes are invisible to the local re-run (the candidate group run on the
reference's inputs): a ``permute`` before ``flatten`` is an unaligned op outside the group, and a
``torch.cat`` re-run gets Caffe's inputs in Caffe's order. The model-wide probes here look at
the pairs that fail although the pairs producing their inputs agree and the group itself is right
(:func:`fed_otherwise`): the candidate fed the group other values than its producers output.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import attach_module_patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import (
    already_reported,
    caffe_layer,
    cand_op,
    check_fix,
    edited_call,
    finding,
    module_call,
)

if TYPE_CHECKING:
    from layerdiff.comparator import Report

_SOFTMAX_ARGS = ("input", "dim")
_CAT_ARGS = ("tensors", "dim")
_AXES = "CHW"


def _norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _implicit_softmax_dim(ndim: int) -> int:
    # torch's legacy choice for nn.Softmax() / F.softmax(x) without dim
    return 0 if ndim in (0, 1, 3) else 1


# -- softmax axis ------------------------------------------------------------------------------
@probe("softmax_axis")
def softmax_axis(case: LayerCase) -> Finding | None:
    """The torch softmax normalises over another axis than Caffe's softmax_param.axis."""
    found = caffe_layer(case, "Softmax")
    if found is None or not case.ref_inputs:
        return None
    ndim = np.ndim(case.ref_inputs[0])
    axis = _norm_axis(int(found[0].param.softmax_param.axis), ndim)
    from torch import nn

    mods = case.cand_modules()
    pos = next((k for k, m in enumerate(mods)
                if isinstance(m, (nn.Softmax, nn.LogSoftmax))), None)
    if pos is not None:
        dim = mods[pos].dim
        trial = copy.deepcopy(mods[pos])
        trial.dim = axis
        rec = case.cand_records[pos]
        call = module_call(trial, rec.outputs[0], getattr(rec.handle, "device", None))
        spelled = f"{rec.name} = nn.{type(trial).__name__}(dim={axis})"
    else:
        op = cand_op(case, ("softmax", "log_softmax"))
        if op is None:
            return None
        pos, rec = op
        params = dict(zip(_SOFTMAX_ARGS, rec.handle.args, strict=False)) | rec.handle.kwargs
        dim = params.get("dim")
        call = edited_call(rec.handle, _SOFTMAX_ARGS, dim=axis)
        spelled = f"{rec.name}: F.{rec.kind}(x, dim={axis})"
    shown = "None" if dim is None else str(dim)
    dim = _implicit_softmax_dim(ndim) if dim is None else _norm_axis(int(dim), ndim)
    if dim == axis:
        return None
    fixed = check_fix(case, case.rerun(replace={pos: call}))
    if fixed is None:
        return None
    shape = np.shape(case.ref_inputs[0])
    what = " (the batch axis)" if dim == 0 else ""
    ev = (f"Caffe {case.pair.ref_name} normalises over axis {axis} (size {shape[axis]}) of a "
          f"{list(shape)} input; torch {rec.name} uses dim={shown}, i.e. axis {dim} (size "
          f"{shape[dim] if dim < len(shape) else '?'}){what}; re-run with dim={axis} matches")
    f = finding(case, "softmax_axis", f"the torch softmax normalises over axis {dim} instead "
                f"of Caffe's axis {axis}", ev, spelled, fixed, "softmax_axis",
                caffe_axis=axis, torch_axis=dim)
    return attach_module_patch(f, rec, mods[pos], trial) if mods[pos] is not None else f


# -- concat axis -------------------------------------------------------------------------------
def _caffe_concat_axis(layer: Any, ndim: int) -> int:
    p = layer.param.concat_param
    if p.HasField("axis") or not p.HasField("concat_dim"):
        return _norm_axis(int(p.axis), ndim)
    return int(p.concat_dim)


@probe("concat_axis")
def concat_axis(case: LayerCase) -> Finding | None:
    """The torch concatenation joins along another axis than Caffe's concat_param.axis."""
    found = caffe_layer(case, "Concat")
    if found is None or len(case.ref_inputs) < 2:
        return None
    ndim = np.ndim(case.ref_inputs[0])
    axis = _caffe_concat_axis(found[0], ndim)
    mods = case.cand_modules()
    pos = next((k for k, m in enumerate(mods) if m is not None and isinstance(
        getattr(m, "dim", None), int) and not isinstance(m.dim, bool)), None)
    if pos is not None:
        rec = case.cand_records[pos]
        dim = mods[pos].dim
        trial = copy.deepcopy(mods[pos])
        trial.dim = axis
        call = module_call(trial, rec.outputs[0], getattr(rec.handle, "device", None))
        spelled = f"{rec.name}.dim = {axis}"
    else:
        op = cand_op(case, ("cat", "concat", "concatenate"))
        if op is None:
            return None
        pos, rec = op
        params = dict(zip(_CAT_ARGS, rec.handle.args, strict=False)) | rec.handle.kwargs
        dim = params.get("dim", 0)
        call = edited_call(rec.handle, _CAT_ARGS, dim=axis)
        spelled = f"{rec.name}: torch.cat([...], dim={axis})"
    if not isinstance(dim, int) or _norm_axis(dim, ndim) == axis:
        return None
    fixed = check_fix(case, case.rerun(replace={pos: call}))
    if fixed is None:
        return None
    shapes = ", ".join(str(list(np.shape(x))) for x in case.ref_inputs)
    ev = (f"Caffe {case.pair.ref_name} joins {shapes} along axis {axis} into "
          f"{list(case.ref_output.shape)}; torch {rec.name} joins along dim={dim} "
          f"({list(np.shape(case.local_output)) if case.local_output is not None else '?'}); "
          f"re-run with dim={axis} matches")
    f = finding(case, "concat_axis", f"the torch concatenation joins along axis "
                f"{_norm_axis(dim, ndim)} instead of Caffe's axis {axis}", ev, spelled, fixed,
                "concat_axis", caffe_axis=axis, torch_axis=dim)
    return attach_module_patch(f, rec, mods[pos], trial) if mods[pos] is not None else f


# -- flatten order: weight columns -------------------------------------------------------------
def _linear(case: LayerCase) -> tuple[int, Any] | None:
    from torch import nn

    return next(((k, m) for k, m in enumerate(case.cand_modules()) if isinstance(m, nn.Linear)),
                None)


def _orders() -> list[tuple[int, int, int]]:
    return [p for p in itertools.permutations(range(3)) if p != (0, 1, 2)]


def permuted_columns(weight: Any, chw: tuple[int, int, int], order: tuple[int, int, int],
                     to_chw: bool) -> Any:
    """Weight columns re-ordered between Caffe's (C, H, W) flatten and the ``order`` one.

    ``to_chw``: the columns are in ``order`` and must become (C, H, W); else the reverse."""
    o = weight.shape[0]
    if to_chw:
        dims = [chw[i] for i in order]
        back = [1 + order.index(i) for i in range(3)]
        return weight.reshape(o, *dims).permute(0, *back).reshape(o, -1)
    return weight.reshape(o, *chw).permute(0, *[1 + i for i in order]).reshape(o, -1)


def _order_name(order: tuple[int, int, int]) -> str:
    return "".join(_AXES[i] for i in order)


def _weight_code(name: str, chw: tuple[int, int, int], order: tuple[int, int, int], o: int,
                 to_chw: bool) -> str:
    if to_chw:
        dims = ", ".join(str(chw[i]) for i in order)
        back = ", ".join(str(1 + order.index(i)) for i in range(3))
    else:
        dims = ", ".join(map(str, chw))
        back = ", ".join(str(1 + i) for i in order)
    return (f"{name}.weight.data = {name}.weight.data.view({o}, {dims}).permute(0, {back})"
            f".reshape({o}, -1)")


@probe("flatten_order")
def flatten_order(case: LayerCase) -> Finding | None:
    """The Linear's weight columns are in another flatten order than Caffe's (C, H, W)."""
    if caffe_layer(case, "InnerProduct") is None or len(case.ref_inputs) != 1 or \
            already_reported(case, "flatten_order"):
        return None
    x = case.ref_inputs[0]
    if np.ndim(x) != 4 or np.prod(np.shape(x)[2:]) == 1:
        return None
    found = _linear(case)
    if found is None:
        return None
    pos, lin = found
    chw = tuple(int(d) for d in np.shape(x)[1:])
    if lin.weight.shape[1] != np.prod(chw):
        return None
    rec = case.cand_records[pos]
    for order in _orders():
        if _same_layout(chw, order):
            continue
        trial = copy.deepcopy(lin)
        import torch

        with torch.no_grad():
            trial.weight.copy_(permuted_columns(lin.weight.detach(), chw, order, True))
        call = module_call(trial, rec.outputs[0], getattr(rec.handle, "device", None))
        fixed = check_fix(case, case.rerun(replace={pos: call}))
        if fixed is None:
            continue
        name = _order_name(order)
        ev = (f"Caffe {case.pair.ref_name} flattens its {list(np.shape(x))} input in (C, H, W) "
              f"order; torch {rec.name}.weight ({lin.weight.shape[0]}x{lin.weight.shape[1]}) "
              f"columns are in ({', '.join(name)}) order: re-run with the columns permuted "
              f"back to (C, H, W) matches")
        f = finding(case, "flatten_order", f"the torch Linear's weight columns follow a "
                    f"({', '.join(name)}) flatten; Caffe flattens (C, H, W)", ev,
                    _weight_code(rec.name, chw, order, lin.weight.shape[0], True), fixed,
                    "flatten_order", order=name)
        return attach_module_patch(f, rec, lin, trial)
    return None


def _same_layout(chw: tuple[int, int, int], order: tuple[int, int, int]) -> bool:
    """Moving only size-1 axes leaves the element order as it is."""
    moved = [i for i in order if chw[i] > 1]
    return moved == sorted(moved)


# -- inputs the candidate fed otherwise ----------------------------------------------------------
def fed_otherwise(report: Report) -> Iterator[tuple[LayerCase, list[np.ndarray]]]:
    """Pairs that fail although the pairs producing their inputs agree and the group itself is
    right on the reference's inputs: the candidate fed it other values (an unaligned op in
    between, or inputs in another order). Yields a case measuring the propagated error, and
    the values the candidate's group actually received."""
    ref, cand = report.reference, report.candidate
    for res in report.results:
        if res.passed or not res.inputs_pass or res.local_passed is not True:
            continue
        first_r, first_c = res.pair.ref[0], res.pair.cand[0]
        ref_in = [ref.value_before(b, first_r.index) for b in first_r.bottoms]
        cand_in = [cand.value_before(b, first_c.index) for b in first_c.bottoms]
        if any(v is None for v in ref_in + cand_in) or not ref_in:
            continue
        case = LayerCase(res, report, [np.asarray(v) for v in ref_in])
        yield case, [np.asarray(v) for v in cand_in]


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> bool:
    """Same size and equal to float32 rounding (relative to the larger magnitude)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size != b.size or a.size == 0:
        return False
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    return bool(np.abs(a.reshape(-1) - b.reshape(-1)).max() <= rtol * scale)


def unaligned_between(report: Report, case: LayerCase) -> list[str]:
    """Names of unaligned candidate records feeding the case's group (nearest last)."""
    loose = {r.index for r in report.alignment.unaligned_cand}
    cand, names, todo, seen = report.candidate, [], list(case.cand_records[0].bottoms), set()
    start = case.cand_records[0].index
    while todo:
        blob = todo.pop()
        prod = next((r for r in reversed(cand.records[:start]) if blob in r.tops), None)
        if prod is None or prod.index in seen or prod.index not in loose:
            continue
        seen.add(prod.index)
        names.append(prod.name)
        todo.extend(prod.bottoms)
        start = prod.index
    return names[::-1]


@probe("concat_order", model_wide=True)
def concat_order(report: Report) -> list[Finding]:
    """A torch cat takes its inputs in another order than Caffe's Concat bottoms."""
    out = []
    for case, cand_in in fed_otherwise(report):
        layer = caffe_layer(case, "Concat")
        if layer is None:
            continue
        ref_in = case.ref_inputs
        if len(ref_in) < 2 or len(cand_in) != len(ref_in):
            continue
        order = _matching_order(ref_in, cand_in)
        if order is None or order == list(range(len(ref_in))):
            continue
        # The candidate's own output is reproduced by Caffe's inputs in the port's order, and
        # Caffe's order (the local re-run) matches: the order is the whole error.
        again = case.rerun(inputs=[ref_in[i] for i in order])
        if again is None or not close(again, case.cand_output, 1e-4):
            continue
        fixed = check_fix(case, case.rerun())
        if fixed is None:
            continue
        bottoms = case.ref_records[0].bottoms
        cand_b = case.cand_records[0].bottoms
        ev = (f"Caffe {case.pair.ref_name} concatenates {bottoms}; torch "
              f"{case.pair.cand_name} gets {cand_b}, whose values are Caffe's "
              f"{[bottoms[i] for i in order]}: re-run in the port's order reproduces its output, "
              "in Caffe's order it matches")
        in_caffe_order = ", ".join(cand_b[order.index(i)] for i in range(len(order)))
        axis = _caffe_concat_axis(layer[0], np.ndim(ref_in[0]))
        out.append(finding(case, "concat_order", "the torch concatenation takes its inputs in "
                           "another order than Caffe's Concat", ev,
                           f"torch.cat([{in_caffe_order}], dim={axis})", fixed, "concat_order",
                           order=order))
    return out


def _matching_order(ref_in: list[np.ndarray], cand_in: list[np.ndarray]) -> list[int] | None:
    """order[i] = the reference input equal to the candidate's input i (None if any has none)."""
    order: list[int] = []
    for c in cand_in:
        hits = [j for j, r in enumerate(ref_in) if j not in order and np.shape(r) == np.shape(c)
                and close(r, c, 1e-4)]
        if not hits:
            return None
        order.append(hits[0])
    return order


@probe("flatten_order_input", model_wide=True)
def flatten_order_input(report: Report) -> list[Finding]:
    """The port permutes to another layout (e.g. channels-last) before flatten + Linear."""
    out = []
    for case, cand_in in fed_otherwise(report):
        if caffe_layer(case, "InnerProduct") is None or len(cand_in) != 1:
            continue
        x = case.ref_inputs[0]
        if np.ndim(x) != 4 or np.size(cand_in[0]) != np.size(x):
            continue
        found = _linear(case)
        if found is None:
            continue
        pos, lin = found
        chw = tuple(int(d) for d in np.shape(x)[1:])
        if lin.weight.shape[1] != np.prod(chw):
            continue
        n = np.shape(x)[0]
        order = next((o for o in _orders() if not _same_layout(chw, o) and close(
            np.transpose(x, (0, *[1 + i for i in o])).reshape(n, -1),
            np.asarray(cand_in[0]).reshape(n, -1), 1e-4)), None)
        if order is None:
            continue
        import torch

        trial = copy.deepcopy(lin)
        with torch.no_grad():
            trial.weight.copy_(permuted_columns(lin.weight.detach(), chw, order, False))
        rec = case.cand_records[pos]
        call = module_call(trial, rec.outputs[0], getattr(rec.handle, "device", None))
        fixed = check_fix(case, case.rerun(inputs=cand_in, replace={pos: call}))
        if fixed is None:
            continue
        name = ", ".join(_order_name(order))
        ops = unaligned_between(report, case)
        via = f" (via {', '.join(ops)})" if ops else ""
        ev = (f"Caffe {case.pair.ref_name} flattens its {list(np.shape(x))} input in (C, H, W) "
              f"order; torch {case.pair.cand_name} receives it in ({name}) order{via}, the same "
              f"values permuted; its Linear re-run with the weight columns permuted to ({name}) "
              "matches")
        out.append(finding(case, "flatten_order", f"the port flattens in ({name}) order before "
                           "the Linear; Caffe flattens (C, H, W) and its weights expect that",
                           ev, "flatten x without permuting it (torch.flatten(x, 1) on NCHW), or "
                           + _weight_code(rec.name, chw, order, lin.weight.shape[0], False),
                           fixed, "flatten_order_input", order=_order_name(order), ops=ops))
    return out


# -- a permute or transpose with no twin ---------------------------------------------------------
_PERMUTES = {"permute", "transpose", "movedim", "swapaxes", "swapdims", "t"}


@probe("permute_inserted", between=True)
def permute_inserted(case: LayerCase) -> Finding | None:
    """The port permutes/transposes the values on the path into a pair, where Caffe does not.

    Before an InnerProduct the ``flatten_order_input`` probe names it (with the weight-column
    alternative); this one covers the rest (a transpose before a conv or pooling, ...)."""
    from layerdiff.diagnose.probes.graph_path import identity, made_by, path_case

    if caffe_layer(case, "InnerProduct") is not None:
        return None
    pc = path_case(case)
    if pc is None or any(r.kind in _PERMUTES or r.kind == "Permute" for r in pc.ref_ops):
        return None
    for rec in pc.cand_ops:
        if rec.kind not in _PERMUTES:
            continue
        fixed = check_fix(pc.case, pc.rerun(swap={rec.index: identity}))
        if fixed is None:
            continue
        args = [a for a in getattr(rec.handle, "args", ())[1:] if isinstance(a, (int, tuple, list))]
        spelled = f"{rec.kind}({', '.join(map(str, args))})" if args else rec.kind
        label = spelled if rec.name == rec.kind else f"{spelled} ({rec.name})"
        ev = (f"torch {label} rearranges {made_by(case, rec)}'s output on the way "
              f"to {case.pair.cand_name} and has no twin in Caffe; the port's path re-run "
              f"without it matches Caffe {case.pair.ref_name}")
        return finding(pc.case, "permute_inserted", f"the port applies {label} before "
                       f"{case.pair.cand_name}; Caffe keeps the axes as they are", ev,
                       f"remove {rec.name} from the port's forward", fixed, "permute_inserted",
                       op=rec.name, op_kind=rec.kind)
    return None

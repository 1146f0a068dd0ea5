"""Input preprocessing at the data layer: channel order (BGR/RGB), x255 scale, mean subtraction.

Two ways a port can expect another input than the Caffe net it was converted from:

- its first layer was converted for another input convention (conv1 weights flipped for RGB,
  divided by 255 for 0..1 pixels, the mean folded into the bias): the first layer fails on its
  own. ``input_convention`` re-runs it on transformed reference inputs (channels reversed,
  x255, /255, plus a per-channel shift estimated from the layer's linearity) and names the
  transform that removes the error;
- its forward preprocesses the input itself (``x[:, [2, 1, 0]]``, ``x * 255``, ``x - mean``)
  before the first aligned layer: that layer is right on Caffe's input but gets another one.
  ``inline_preprocessing`` fits the values it got to a per-channel affine map of the model
  input, with or without the channels reversed.

A constant input is the same in every channel: a channel swap cannot show, and the probe says so
instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import attach_module_patch
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import already_reported, check_fix, finding
from layerdiff.diagnose.probes.graph_path import PathCase, identity, op_text, path_case
from layerdiff.diagnose.probes.layout import fed_otherwise, unaligned_between
from layerdiff.trace import Record

if TYPE_CHECKING:
    from layerdiff.comparator import Report

_SCALES = ((255.0, "x 255"), (1 / 255.0, "/ 255"))


def is_first_layer(case: LayerCase) -> bool:
    """The group reads the model's input directly (nothing but an Input layer before it)."""
    trace = case.ref_trace
    first = case.ref_records[0]
    if not first.bottoms:
        return False
    for b in first.bottoms:
        prod = next((r for r in reversed(trace.records[:first.index]) if b in r.tops), None)
        if prod is not None and prod.kind != "Input" or (prod is None and b not in trace.inputs):
            return False
    return True


def channel_symmetric(x: np.ndarray) -> bool:
    """Every channel of an N,C,... input holds the same values (a swap changes nothing)."""
    x = np.asarray(x)
    return x.ndim >= 2 and x.shape[1] > 1 and bool(np.all(x == x[:, :1]))


@dataclass
class Transform:
    """What the port's layer must be fed, as a function of Caffe's input."""

    reverse: bool = False
    scale: float = 1.0
    scale_text: str = ""
    shift: np.ndarray | None = None  # per channel, added after reversal and scaling

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, np.float64)
        if self.reverse:
            y = y[:, ::-1]
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift is not None:
            y = y + self.shift.reshape((1, -1) + (1,) * (y.ndim - 2))
        return np.ascontiguousarray(y, dtype=np.asarray(x).dtype)

    def describe(self) -> str:
        parts = []
        if self.reverse:
            parts.append("channels reversed (BGR <-> RGB)")
        if self.scale != 1.0:
            parts.append(f"scaled {self.scale_text}")
        if self.shift is not None:
            parts.append(shift_text(self.shift))
        return ", ".join(parts)

    @property
    def kind(self) -> str:
        kinds = [k for k, on in (("channel_order", self.reverse), ("scale", self.scale != 1.0),
                                 ("mean", self.shift is not None)) if on]
        return "input_" + "_".join(kinds)


def shift_text(shift: np.ndarray) -> str:
    if np.all(shift < 0):
        return f"minus the per-channel mean {_vec(-shift)}"
    if np.all(shift > 0):
        return f"plus {_vec(shift)} per channel (the port subtracts that mean itself)"
    return f"shifted by {_vec(shift)} per channel"


def _vec(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in np.asarray(v).ravel()) + ")"


def _simple_transforms(channels: int) -> list[Transform]:
    out = [Transform(reverse=True)] if channels > 1 else []
    for s, text in _SCALES:
        out.append(Transform(scale=s, scale_text=text))
        if channels > 1:
            out.append(Transform(reverse=True, scale=s, scale_text=text))
    return out


def _with_shift(case: LayerCase, base: Transform, x: np.ndarray) -> Transform | None:
    """``base`` plus the per-channel shift that best explains the error, assuming the group is
    affine in its input (conv, BatchNorm, Scale): error = sum_c shift_c * response_c."""
    y0 = case.rerun(inputs=[base(x)])
    if y0 is None or np.shape(y0) != case.ref_output.shape:  # e.g. a conv with another pad
        return None
    cols = []
    for c in range(x.shape[1]):
        unit = np.zeros(x.shape[1])
        unit[c] = 1.0
        y = case.rerun(inputs=[Transform(base.reverse, base.scale, base.scale_text, unit)(x)])
        if y is None or np.shape(y) != np.shape(y0):
            return None
        cols.append((np.asarray(y, np.float64) - y0).ravel())
    g = np.stack(cols, axis=1)
    target = (np.asarray(case.ref_output, np.float64) - y0).ravel()
    if target.size != g.shape[0]:
        return None
    shift, *_ = np.linalg.lstsq(g, target, rcond=None)
    if not np.all(np.isfinite(shift)):
        return None
    return Transform(base.reverse, base.scale, base.scale_text, shift)


def _fix_text(t: Transform, case: LayerCase) -> str:
    first = case.cand_records[0].name
    steps = []
    if t.reverse:
        steps.append("x = x[:, ::-1]")
    if t.scale != 1.0:
        steps.append(f"x = x * {t.scale:.6g}")
    if t.shift is not None:
        steps.append(f"x = x - torch.tensor({[round(float(v), 4) for v in -t.shift]})"
                     ".view(1, -1, 1, 1)")
    alt = ""
    if t.reverse and t.scale == 1.0 and t.shift is None:
        alt = f"; or take Caffe's order: {first}.weight.data = {first}.weight.data.flip(1)"
    elif t.scale != 1.0 and not t.reverse and t.shift is None:
        alt = f"; or take Caffe's range: {first}.weight.data *= {t.scale:.6g}"
    return f"feed the port the input Caffe's {first} expects: {'; '.join(steps)}{alt}"


@probe("input_convention")
def input_convention(case: LayerCase) -> list[Finding] | None:
    """The first layer matches when fed Caffe's input reversed/scaled/shifted."""
    if not is_first_layer(case) or len(case.ref_inputs) != 1:
        return None
    x = np.asarray(case.ref_inputs[0])
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        return None
    symmetric = channel_symmetric(x)
    out: list[Finding] = []
    trials: list[Callable[[], Transform | None]] = [
        (lambda t=t: t) for t in _simple_transforms(x.shape[1]) if not (symmetric and t.reverse)]
    bases = [Transform()] + [t for t in _simple_transforms(x.shape[1])
                             if not (symmetric and t.reverse)]
    trials += [(lambda b=b: _with_shift(case, b, x)) for b in bases]
    flipped_weights = already_reported(case, "bgr_rgb_first_conv")
    for make in trials:
        t = make()
        if t is None:
            continue
        fixed = check_fix(case, case.rerun(inputs=[t(x)]))
        if fixed is None:
            continue
        if flipped_weights and t.kind == "input_channel_order":
            break  # the weight audit named it already (a flipped conv1 weight)
        ev = (f"torch {case.pair.cand_name} re-run on Caffe's input {list(x.shape)} with "
              f"{t.describe()} matches Caffe {case.pair.ref_name}")
        cause = (f"the port's first layer was converted for another input convention: it "
                 f"expects Caffe's input {t.describe()}")
        f = finding(case, t.kind, cause, ev, _fix_text(t, case), fixed, "input_convention",
                    reverse=t.reverse, scale=t.scale,
                    shift=None if t.shift is None else t.shift.tolist())
        out.append(_weights_for_caffe_input(case, t, f))
        break
    else:
        folded = _mean_in_bias(case)
        if folded is not None:
            out.append(folded)
    if symmetric and not flipped_weights:  # the weights can tell, the run cannot
        out.append(_undecidable(case, x))
    return out or None


def _weights_for_caffe_input(case: LayerCase, t: Transform, f: Finding) -> Finding:
    """Attach the patch converting the first conv to Caffe's input convention: feeding it
    ``x[:, ::-1] * s`` equals ``weight.flip(1) * s`` on ``x`` (zero padding included). A
    shift is not (the border windows see the padding), so it gets no patch. Kept only when a
    re-run of the converted conv on Caffe's own input passes."""
    import copy

    import torch
    from torch import nn

    from layerdiff.diagnose.probes.counterfactual import module_call

    mods = case.cand_modules()
    conv = mods[0] if mods else None
    if t.shift is not None or not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        return f
    trial = copy.deepcopy(conv)
    with torch.no_grad():
        w = trial.weight.flip(1) if t.reverse else trial.weight
        trial.weight.copy_(w * t.scale)
    rec = case.cand_records[0]
    call = module_call(trial, rec.outputs[0], getattr(rec.handle, "device", None))
    if check_fix(case, case.rerun(replace={0: call})) is None:
        return f
    return attach_module_patch(f, rec, conv, trial)


def _mean_in_bias(case: LayerCase) -> Finding | None:
    """The port's first conv subtracts a per-channel input mean through its bias: the error is
    constant per output channel and equals the kernel sums times that mean (exact also where
    the padding makes an input shift inexact)."""
    import copy

    import torch
    from torch import nn

    from layerdiff.diagnose.probes.counterfactual import module_call

    mods = case.cand_modules()
    conv = mods[0] if mods else None
    if not isinstance(conv, nn.Conv2d) or conv.bias is None or conv.groups != 1:
        return None
    if case.local_output is None or np.shape(case.local_output) != case.ref_output.shape:
        return None
    err = np.asarray(case.ref_output, np.float64) - np.asarray(case.local_output, np.float64)
    if err.ndim != 4:
        return None
    wsum = conv.weight.detach().double().sum((2, 3)).cpu().numpy()  # (out, in)
    mean, *_ = np.linalg.lstsq(wsum, err.mean(axis=(0, 2, 3)), rcond=None)
    trial = copy.deepcopy(conv)
    with torch.no_grad():
        trial.bias += torch.from_numpy(wsum @ mean).to(trial.bias)
    rec = case.cand_records[0]
    fixed = check_fix(case, case.rerun(replace={0: module_call(
        trial, rec.outputs[0], getattr(rec.handle, "device", None))}))
    if fixed is None:
        return None
    name = rec.name
    ev = (f"the error of torch {name} is constant per output channel and equals "
          f"{name}.weight summed over its kernel times {_vec(mean)}; a copy with that added back "
          f"to {name}.bias matches Caffe {case.pair.ref_name}")
    f = finding(case, "input_mean", f"the port subtracts the per-channel mean {_vec(mean)} "
                f"inside {name}'s bias: it expects raw input where Caffe expects the mean "
                "already subtracted", ev, f"{name}.bias.data += {name}.weight.data.sum((2, 3))"
                f" @ torch.tensor({[round(float(v), 4) for v in mean]})", fixed,
                "input_convention", mean=mean.tolist())
    return attach_module_patch(f, rec, conv, trial)


def _undecidable(case: LayerCase, x: np.ndarray) -> Finding:
    return Finding(
        "input_channel_order_undecidable", case.name,
        "the input is the same in every channel, so whether the port expects BGR or RGB "
        "cannot be told from this run",
        f"all {x.shape[1]} channels of {case.ref_records[0].bottoms[0]} are equal (a constant "
        "input): reversing them changes nothing",
        "compare again with a random input (e.g. --input uniform:0,255) to check the channel "
        "order", None, None, None, "input_convention")


@probe("inline_preprocessing", model_wide=True)
def inline_preprocessing(report: Report) -> list[Finding]:
    """The port's forward transforms the input before its first aligned layer."""
    out = []
    for case, cand_in in fed_otherwise(report):
        if not is_first_layer(case) or len(cand_in) != 1 or len(case.ref_inputs) != 1:
            continue
        x, got = np.asarray(case.ref_inputs[0], np.float64), np.asarray(cand_in[0], np.float64)
        if x.shape != got.shape or x.ndim < 2:
            continue
        t = fit_affine(x, got)
        if t is None:  # e.g. a constant input: removing the ops themselves can still tell
            out.extend(_removed_ops(case))
            continue
        fixed = check_fix(case, case.rerun())
        if fixed is None:
            continue
        ops = unaligned_between(report, case)
        via = f" ({', '.join(ops)})" if ops else ""
        ev = (f"the values torch {case.pair.cand_name} received equal the model input "
              f"{t.describe()} (to 1e-5); re-run on the untransformed input, torch "
              f"{case.pair.cand_name} matches Caffe {case.pair.ref_name}")
        out.append(finding(case, t.kind, f"the port preprocesses its input{via} before "
                           f"{case.pair.cand_name}: {t.describe()}; the Caffe net takes the "
                           "input as it is", ev, f"remove that preprocessing{via} from the "
                           "port's forward, or apply it to the Caffe input as well", fixed,
                           "inline_preprocessing", ops=ops, reverse=t.reverse, scale=t.scale))
    return out


_OP_KINDS = (("channel_order", {"getitem", "__getitem__", "flip", "index_select"}),
             ("scale", {"mul", "mul_", "div", "div_", "truediv", "true_divide"}),
             ("mean", {"sub", "sub_", "add", "add_", "rsub"}))


def _removed_ops(case: LayerCase) -> list[Finding]:
    """The port's own ops between the model input and the first pair, removed one at a time
    (then all together): when that makes the pair match, they are the preprocessing."""
    pc = path_case(case)
    if pc is None:
        return []
    ops = [r for r in pc.cand_ops if r.outputs and any(r.kind in k for _, k in _OP_KINDS)
           and _keeps_shape(pc, r)]
    trials = [[r] for r in ops] + ([ops] if len(ops) > 1 else [])
    for removed in trials:
        fixed = check_fix(pc.case, pc.rerun(swap={r.index: identity for r in removed}))
        if fixed is None:
            continue
        kind = "input_" + "_".join(name for name, kinds in _OP_KINDS
                                   if any(r.kind in kinds for r in removed))
        names = [op_text(r) + _constants(r) for r in removed]
        ev = (f"without {', '.join(names)} (the port's own ops between the model input and "
              f"{case.pair.cand_name}), torch {case.pair.cand_name} matches Caffe "
              f"{case.pair.ref_name}")
        which = ", ".join(names)
        return [finding(pc.case, kind, f"the port preprocesses its input inside forward "
                        f"({', '.join(names)}) before {case.pair.cand_name}; the Caffe net "
                        "takes the input as it is", ev, f"remove {which} from the port's "
                        "forward, or apply it to the Caffe input as well", fixed,
                        "inline_preprocessing", ops=[r.name for r in removed])]
    return []


def _keeps_shape(pc: PathCase, rec: Record) -> bool:
    ins = [pc.case.cand_trace.value_before(t, rec.index) for t in rec.bottoms[:1]]
    return bool(ins) and ins[0] is not None and np.shape(ins[0]) == np.shape(rec.outputs[0])


def _constants(rec: Record) -> str:
    """The scalar arguments of a functional op, as ``by 255``."""
    args = [*getattr(rec.handle, "args", ()), *getattr(rec.handle, "kwargs", {}).values()]
    nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return f" by {', '.join(f'{v:g}' for v in nums)}" if nums else ""


def fit_affine(x: np.ndarray, got: np.ndarray) -> Transform | None:
    """``got = scale * R(x) + shift_c`` (R: identity or channel reversal) to 1e-5, with one
    scale for all channels; None when no such map fits or it is the identity."""
    c = x.shape[1]
    for reverse in ((False, True) if c > 1 else (False,)):
        src = x[:, ::-1] if reverse else x
        scales, shifts = [], []
        for ch in range(c):
            a = src[:, ch].ravel()
            b = got[:, ch].ravel()
            if np.ptp(a) == 0:
                return None  # cannot separate scale and shift on a constant channel
            s, m = np.polyfit(a, b, 1)
            scales.append(s)
            shifts.append(m)
        scale = float(np.median(scales))
        shift = np.array(shifts)
        pred = scale * src + shift.reshape((1, -1) + (1,) * (x.ndim - 2))
        tol = 1e-5 * max(np.abs(got).max(), 1.0)
        if np.abs(pred - got).max() > tol:
            continue
        shift_on = bool(np.abs(shift).max() > tol)
        scale_on = not np.isclose(scale, 1.0, rtol=1e-5)
        if not (reverse or scale_on or shift_on):
            return None
        text = _scale_text(scale)
        return Transform(reverse, scale if scale_on else 1.0, text, shift if shift_on else None)
    return None


def _scale_text(s: float) -> str:
    for v, name in ((255.0, "x 255"), (1 / 255.0, "/ 255"), (1 / 127.5, "/ 127.5"),
                    (0.0078125, "x 0.0078125 (1/128)")):
        if np.isclose(s, v, rtol=1e-5):
            return name
    return f"x {s:.6g}"

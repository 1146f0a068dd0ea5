"""Probes for an ONNX candidate: a Caffe layer against the ONNX node a converter made of it.

The ONNX records' handles re-run one node with onnxruntime, with other initializers
(``with_params``) or attributes (``with_attributes``). Each probe puts Caffe's value in, re-runs
the node on the reference's inputs, and reports only when that removes (almost) all the error.
Evidence names the initializer and attribute; the fix is the ``onnx`` API patch of the file.
Each finding also carries the same patch as data (``onnx_patch``): ``--fix-out`` applies it to
a copy of the file with the ``onnx`` API, no printed code is run.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.batchnorm import CaffeBN, caffe_bn
from layerdiff.diagnose.probes.counterfactual import Fixed, caffe_layer, check_fix, finding
from layerdiff.diagnose.probes.pooling import _caffe_setting

#: parameters this close count as equal (float32 storage)
_RTOL = 1e-4


def onnx_node(case: LayerCase, op_types: tuple[str, ...]) -> tuple[int, Any] | None:
    """(position, record) of the candidate group's first ONNX node of one of ``op_types``."""
    for k, rec in enumerate(case.cand_records):
        if rec.kind in op_types and hasattr(rec.handle, "with_attributes"):
            return k, rec
    return None


def patch_file(case: LayerCase, body: str) -> str:
    """``body`` (statements on the loaded model ``m``) as a script patching the candidate file."""
    src = str(case.cand_trace.meta.get("model") or "model.onnx")
    dst = src[:-5] + "_fixed.onnx" if src.endswith(".onnx") else src + "_fixed.onnx"
    return (f"import numpy as np, onnx; from onnx import numpy_helper; m = onnx.load({src!r}); "
            f"{body}; onnx.save(m, {dst!r})")


def scale_initializers_fix(names: list[str], divisor: float) -> str:
    """The ``onnx`` lines dividing initializers ``names`` by ``divisor`` in the file."""
    return (f"[t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / {divisor:.6g}, "
            f"t.name)) for t in m.graph.initializer if t.name in {names!r}]")


def attribute_fix(node: str, attrs: dict[str, Any]) -> str:
    """The ``onnx`` lines setting attributes of node ``node`` in the file."""
    sets = ", ".join(f"onnx.helper.make_attribute({k!r}, {_literal(v)})"
                     for k, v in attrs.items())
    return (f"n = next(n for n in m.graph.node if n.name == {node!r}); "
            f"keep = [a for a in n.attribute if a.name not in {sorted(attrs)!r}]; "
            f"del n.attribute[:]; n.attribute.extend(keep + [{sets}])")


def onnx_patch(f: Finding, arrays: dict[str, np.ndarray] | None = None,
               attributes: dict[str, dict[str, Any]] | None = None) -> Finding:
    """``f`` with its fix as data: ``data["onnx_patch"]`` names the initializers (new values in
    ``patch_arrays``) and the attributes per node; ``patch`` lists the same, one line per change
    (what ``layerdiff.fix`` de-duplicates and counts; it is not run)."""
    arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
    attributes = {n: {k: _plain(v) for k, v in a.items()} for n, a in (attributes or {}).items()}
    f.data["onnx_patch"] = {"initializers": list(arrays), "attributes": attributes}
    f.patch_arrays = arrays
    f.patch = "\n".join([f"initializer {k!r} = arrays[{k!r}]" for k in arrays] +
                        [f"node {n!r} attribute {k} = {_literal(v)}"
                         for n, a in attributes.items() for k, v in a.items()])
    return f


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.integer, bool)):
        return int(v)
    # attributes are float32: 1e-05 in the data, not 9.999999747378752e-06
    return float(f"{float(v):.7g}") if isinstance(v, (float, np.floating)) else v


def _literal(v: Any) -> str:
    # attributes are float32: 1e-05, not 9.999999747378752e-06
    return f"{v:.7g}" if isinstance(v, float) else repr(v)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=_RTOL,
                                                   atol=1e-7 * float(np.abs(b).max() or 1)))


def _vec(x: Any) -> np.ndarray:
    """A parameter or Caffe blob (its ``data``) as a flat float64 vector."""
    return np.asarray(getattr(x, "data", x), dtype=np.float64).reshape(-1)


# -- BatchNormalization ---------------------------------------------------------------------


@probe("onnx_batchnorm")
def onnx_batchnorm(case: LayerCase) -> Finding | None:
    """Caffe BatchNorm (+ Scale) vs an ONNX BatchNormalization: the statistics not divided by
    Caffe's scale factor, other statistics, or another ``epsilon``."""
    bn = caffe_bn(case)
    site = onnx_node(case, ("BatchNormalization",))
    if bn is None or site is None or not bn.use_global:
        return None
    pos, rec = site
    h = rec.handle
    if not {"running_mean", "running_var"} <= set(rec.params):
        return None
    mean, var = _vec(rec.params["running_mean"]), _vec(rec.params["running_var"])
    eps = float(h.attribute("epsilon", 1e-5))
    trials: list[tuple[str, Any]] = []
    # Only the named mistake is tried: the file's own statistics divided by s (other wrong
    # statistics have no one-line fix to show).
    undivided = bn.s not in (0.0, 1.0) and _close(mean, bn.raw_mean) and _close(var, bn.raw_var)
    if undivided:
        trials.append(("stats", h.with_params(running_mean=mean / bn.s, running_var=var / bn.s)))
    if not np.isclose(eps, bn.eps, rtol=1e-6, atol=0):
        trials.append(("eps", h.with_attributes(epsilon=float(bn.eps))))
        if undivided:
            both = h.with_params(running_mean=mean / bn.s, running_var=var / bn.s)
            trials.append(("stats+eps", both.with_attributes(epsilon=float(bn.eps))))
    for what, call in trials:
        fixed = check_fix(case, case.rerun(replace={pos: call}))
        if fixed is not None:
            return _bn_finding(case, rec, bn, what, mean, var, eps, fixed)
    return None


def _bn_finding(case: LayerCase, rec: Any, bn: CaffeBN, what: str, mean: np.ndarray,
                var: np.ndarray, eps: float, fixed: Fixed) -> Finding:
    names = rec.attrs.get("initializers", {})
    m_name, v_name = names.get("running_mean", "mean"), names.get("running_var", "var")
    k = int(np.argmax(np.abs(bn.raw_mean)))
    caffe = bn.layer.name
    parts: list[str] = []
    fixes: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    attributes: dict[str, dict[str, Any]] = {}
    kind = "bn_params"
    cause = (f"the BatchNormalization's statistics are Caffe's undivided by s = {bn.s:.6g} and "
             f"its epsilon is {eps:g} (Caffe: {bn.eps:g})")
    if "stats" in what:
        if what == "stats":
            kind = "bn_scale_factor"
            cause = (f"the converter copied Caffe's BatchNorm statistics without dividing by "
                     f"its scale factor s = blob2 = {bn.s:.6g}")
        parts.append(f"ONNX initializer {m_name}[{k}] = {mean[k]:.6g} equals Caffe {caffe} "
                     f"blob0[{k}] = {bn.raw_mean[k]:.6g}; Caffe computes with blob0 / s = "
                     f"{bn.mean[k]:.6g}, and {v_name} is blob1 likewise undivided")
        every = _undivided_everywhere(case, bn.s)
        if every and what == "stats":
            parts.append(f"every BatchNormalization of the file ({len(every) // 2}) holds its "
                         f"Caffe statistics undivided by s = {bn.s:.6g}")
            fixes.append(scale_initializers_fix(list(every), bn.s))
            arrays.update({k: v / bn.s for k, v in every.items()})
        else:
            fixes.append(scale_initializers_fix([m_name, v_name], bn.s))
            arrays.update({m_name: mean / bn.s, v_name: var / bn.s})
    if "eps" in what:
        if what == "eps":
            kind = "bn_eps"
            cause = (f"the BatchNormalization's epsilon is {eps:g}; Caffe {caffe} uses "
                     f"batch_norm_param.eps = {bn.eps:g}")
        parts.append(f"node {rec.name} attribute epsilon = {eps:g}, Caffe eps = {bn.eps:g}")
        fixes.append(attribute_fix(rec.name, {"epsilon": float(bn.eps)}))
        attributes[rec.name] = {"epsilon": float(bn.eps)}
    fix = patch_file(case, "; ".join(fixes))
    return onnx_patch(finding(case, kind, cause, "; ".join(parts), fix, fixed, "onnx_batchnorm",
                              initializers=[m_name, v_name], scale_factor=bn.s, onnx=True),
                      arrays, attributes)


def _undivided_everywhere(case: LayerCase, s: float) -> dict[str, np.ndarray] | None:
    """The mean/var initializers (name -> the file's values) of every BatchNormalization of the
    candidate when each one is aligned with a Caffe BatchNorm of factor ``s`` and holds its
    blobs undivided (one converter loop made them all), else None."""
    names: dict[str, np.ndarray] = {}
    pairs = case.report.alignment.pairs
    n_bn = sum(1 for r in case.cand_trace if r.kind == "BatchNormalization")
    count = 0
    for p in pairs:
        rec = next((c for c in p.cand if c.kind == "BatchNormalization"), None)
        if rec is None:
            continue
        lay = next((r.handle.layer for r in p.ref if getattr(r.handle, "layer", None) is not None
                    and r.handle.layer.type == "BatchNorm"), None)
        if lay is None or len(lay.blobs) < 3 or _vec(lay.blobs[2])[0] != s or \
                not {"running_mean", "running_var"} <= set(rec.params):
            return None
        if not (_close(_vec(rec.params["running_mean"]), _vec(lay.blobs[0])) and
                _close(_vec(rec.params["running_var"]), _vec(lay.blobs[1]))):
            return None
        inits = rec.attrs.get("initializers", {})
        for key in ("running_mean", "running_var"):
            names.setdefault(inits[key], np.asarray(rec.params[key], dtype=np.float64))
        count += 1
    if count != n_bn or n_bn < 2:
        return None
    return names


# -- pooling --------------------------------------------------------------------------------

_POOL_KINDS = {
    ("ceil_mode",): "pool_ceil_mode",
    ("ceil_mode", "pads"): "pool_padding_vs_ceil",
    ("pads",): "pool_padding",
    ("count_include_pad",): "pool_ave_divisor",
}


@probe("onnx_pooling")
def onnx_pooling(case: LayerCase) -> Finding | None:
    """Caffe Pooling vs an ONNX MaxPool/AveragePool: ``ceil_mode``, ``pads`` and
    ``count_include_pad`` set to Caffe's, the fewest changes that remove the error."""
    found = caffe_layer(case, "Pooling")
    site = onnx_node(case, ("MaxPool", "AveragePool"))
    if found is None or site is None or not case.ref_inputs or np.ndim(case.ref_inputs[0]) != 4:
        return None
    caffe = _caffe_setting(*found)
    pos, rec = site
    if caffe is None or (caffe.method == "max") != (rec.kind == "MaxPool"):
        return None
    h = rec.handle
    want: dict[str, Any] = {"ceil_mode": int(caffe.ceil_mode),
                            "pads": [*caffe.padding, *caffe.padding]}
    have: dict[str, Any] = {"ceil_mode": int(h.attribute("ceil_mode", 0)),
                            "pads": list(h.attribute("pads", [0, 0, 0, 0]))}
    if rec.kind == "AveragePool":
        want["count_include_pad"] = 1
        have["count_include_pad"] = int(h.attribute("count_include_pad", 0))
    diff = [f for f in want if want[f] != have[f]]
    for n in range(1, len(diff) + 1):
        for changed in itertools.combinations(diff, n):
            trial = {f: want[f] for f in changed}
            fixed = check_fix(case, case.rerun(replace={pos: h.with_attributes(**trial)}))
            if fixed is None:
                continue
            settings = ", ".join(f"{f} = {have[f]} (Caffe: {want[f]})" for f in changed)
            ev = (f"node {rec.name} has {settings}; Caffe {found[0].name} pools "
                  f"k{caffe.kernel_size[0]} s{caffe.stride[0]} pad {caffe.padding[0]} rounding "
                  f"{'up' if caffe.ceil_mode else 'down'}")
            kind = _POOL_KINDS.get(tuple(sorted(changed)), "pool_geometry")
            cause = (f"the ONNX {rec.kind} differs from Caffe's pooling in "
                     f"{', '.join(changed)}")
            fix = patch_file(case, attribute_fix(rec.name, trial))
            return onnx_patch(finding(case, kind, cause, ev, fix, fixed, "onnx_pooling",
                                      changed=list(changed), onnx=True),
                              attributes={rec.name: trial})
    return None


# -- weight layout: conv kernels, Gemm after a flatten -----------------------------------------

#: (kind, cause, rearrangement, the same as code on ``numpy_helper.to_array(t)``)
_CONV_FORMS: list[tuple[str, str, Any, str]] = [
    ("conv_kernel_flipped", "the conv kernel is flipped in height and width (a true "
     "convolution's kernel; Caffe correlates)", lambda w: w[:, :, ::-1, ::-1],
     "numpy_helper.to_array(t)[:, :, ::-1, ::-1]"),
    ("conv_kernel_hw_transposed", "the conv kernel's height and width are swapped",
     lambda w: w.transpose(0, 1, 3, 2), "numpy_helper.to_array(t).transpose(0, 1, 3, 2)"),
    ("bgr_rgb_first_conv", "the conv's input channels are in reversed order (RGB vs BGR)",
     lambda w: w[:, ::-1], "numpy_helper.to_array(t)[:, ::-1]"),
]


def _hwc_to_chw(w: np.ndarray, c: int, h: int, wd: int) -> np.ndarray:
    return w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)


def _chw_to_hwc(w: np.ndarray, c: int, h: int, wd: int) -> np.ndarray:
    return w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def _weight_trials(case: LayerCase, rec: Any) -> list[tuple[str, str, np.ndarray, str]]:
    w = np.asarray(rec.params["weight"])
    if rec.kind == "Conv" and w.ndim == 4:
        return [(k, c, np.ascontiguousarray(f(w)), e) for k, c, f, e in _CONV_FORMS
                if k != "bgr_rgb_first_conv" or w.shape[1] == 3]
    x = case.ref_inputs[0] if case.ref_inputs else None
    if rec.kind != "Gemm" or w.ndim != 2 or x is None or np.ndim(x) != 4:
        return []
    c, h, wd = np.shape(x)[1:]
    trans = bool(rec.handle.attribute("transB", 0))
    out_in = w if trans else w.T  # rows = outputs
    if h * wd == 1 or out_in.shape[1] != c * h * wd:
        return []
    back = (lambda a: a) if trans else (lambda a: a.T)
    t_expr = "" if trans else ".T"
    trials = []
    for f, name, code in ((_hwc_to_chw, "H,W,C", f"reshape(-1, {h}, {wd}, {c}).transpose(0, 3, 1, "
                           "2)"), (_chw_to_hwc, "C,H,W", f"reshape(-1, {c}, {h}, {wd}).transpose("
                           "0, 2, 3, 1)")):
        fixed = np.ascontiguousarray(back(f(out_in, c, h, wd)))
        expr = f"numpy_helper.to_array(t){t_expr}.{code}.reshape({out_in.shape[0]}, -1){t_expr}"
        trials.append(("flatten_order", f"the Gemm's weight columns are in {name} order; the "
                       "values reaching it are Caffe's flatten of N,C,H,W", fixed, expr))
    return trials


@probe("onnx_weight_layout")
def onnx_weight_layout(case: LayerCase) -> Finding | None:
    """A Conv/Gemm initializer in another layout than Caffe's: kernel flipped or its height and
    width swapped, input channels reversed, Gemm columns in H,W,C flatten order."""
    site = onnx_node(case, ("Conv", "Gemm"))
    if site is None or "weight" not in site[1].params or not case.ref_inputs:
        return None
    pos, rec = site
    name = rec.attrs.get("initializers", {}).get("weight", "weight")
    w = np.asarray(rec.params["weight"])
    for kind, cause, arranged, expr in _weight_trials(case, rec):
        if arranged.shape != w.shape or np.array_equal(arranged, w):
            continue
        out = case.rerun(replace={pos: rec.handle.with_params(weight=arranged)})
        fixed = check_fix(case, out)
        if fixed is None:
            continue
        ev = f"ONNX initializer {name} {list(w.shape)} rearranged as {expr} fixes node {rec.name}"
        fix = patch_file(case, f"[t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray("
                         f"{expr}), t.name)) for t in m.graph.initializer if t.name == {name!r}]")
        return onnx_patch(finding(case, kind, cause, ev, fix, fixed, "onnx_weight_layout",
                                  initializer=name, onnx=True), {name: arranged})
    return None

"""Weight audit: does every Caffe blob reach the torch port unchanged? No forward pass needed.

Each Caffe blob is tied to exactly one torch parameter or buffer, then judged ``equal`` (what a
correct port holds: for BatchNorm the statistics divided by Caffe's scale factor), equal up to a
named porting mistake (transposed, kernel flipped, BGR/RGB, HWC flatten order, scale factor not
divided, swapped pairs, Scale not merged, bias missing), or ``differs``. Layers are tied to
torch modules by name, then by value (the same idea as :mod:`layerdiff.align.fingerprint`, with
every transform below), then a Scale to the BatchNorm2d before it, then by order and shape.

Entry points: :func:`audit` (plain arrays), :func:`audit_models` (a CaffeNet and a torch
module), :func:`audit_traces` (two traces' recorded ``params``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerdiff.align.aligner import normalize_name
from layerdiff.align.kinds import compatible, families

EQUAL = "equal"
DIFFERS = "differs"
FOLDED = "folded"  # BatchNorm blob 2 (scale factor): no torch counterpart, used on mean/var
MISSING = "missing"  # the torch module has no tensor for a non-zero blob
ABSENT_ZERO = "absent_zero"  # no torch tensor, but the blob is all zeros: nothing lost
NEUTRAL = {EQUAL, FOLDED, ABSENT_ZERO}

#: named porting mistakes -> what it means. The key doubles as the Finding kind, spelled like
#: the per-layer probes' kinds (batchnorm.py, layout.py) so one cause has one name.
TRANSFORMS: dict[str, str] = {
    "bn_scale_factor": "BatchNorm statistics copied without dividing by Caffe's scale factor "
                       "(blob 2)",
    "bn_stats_swapped": "BatchNorm running_mean and running_var swapped",
    "bn_affine_swapped": "Scale gamma and beta swapped (weight <-> bias)",
    "bn_affine_missing": "Caffe Scale not merged into the BatchNorm2d (torch keeps weight 1, "
                        "bias 0)",
    "conv_weight_transposed": "conv weight stored [in, out] instead of Caffe's [out, in]",
    "conv_kernel_hw_transposed": "conv kernel transposed (kh <-> kw)",
    "conv_kernel_flipped": "conv kernel flipped spatially (true convolution instead of Caffe's "
                           "correlation)",
    "bgr_rgb_first_conv": "first conv's input channels reversed (BGR <-> RGB)",
    "flatten_order": "InnerProduct columns in HWC order (an NHWC flatten) instead of "
                     "Caffe's CHW",
    "linear_weight_transposed": "InnerProduct weight stored transposed ([in, out])",
    "missing_bias": "Caffe bias blob has no torch counterpart (bias=False)",
}

CONV_TYPES = {"Convolution", "ConvolutionDepthwise", "DepthwiseConvolution", "Deconvolution"}
# Caffe blob index -> torch leaf name (None: no counterpart)
ROLES: dict[str, tuple[str | None, ...]] = {
    **{t: ("weight", "bias") for t in CONV_TYPES},
    "InnerProduct": ("weight", "bias"),
    "BatchNorm": ("running_mean", "running_var", None),
    "Scale": ("weight", "bias"),
    "Bias": ("bias",),
    "PReLU": ("weight",),
    "Embed": ("weight",),
    "Normalize": ("weight",),
    "BN": ("weight", "bias", "running_mean", "running_var"),
}
# blob pairs a port may swap: type -> ({index: partner index}, transform)
SWAPS: dict[str, tuple[dict[int, int], str]] = {
    "BatchNorm": ({0: 1, 1: 0}, "bn_stats_swapped"),
    "Scale": ({0: 1, 1: 0}, "bn_affine_swapped"),
}
# Blob-holding torch defaults that lose nothing when left unmapped.
_INERT = {"weight": 1.0, "running_var": 1.0, "bias": 0.0, "running_mean": 0.0}

# Relative tolerance for "the same value", by the candidate's storage precision.
RTOL = {"float64": 1e-6, "float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


@dataclass
class RefLayer:
    """One Caffe layer with blobs, as the audit sees it."""

    name: str
    type: str
    blobs: list[np.ndarray]
    #: shape of the layer's (first) input, for the HWC flatten check of an InnerProduct
    input_shape: tuple[int, ...] | None = None
    #: whether the layer reads a net input (BGR check); None = unknown (any 3-channel conv)
    reads_input: bool | None = None


@dataclass
class BlobCheck:
    """The verdict on one Caffe blob."""

    layer: str
    layer_type: str
    index: int
    shape: tuple[int, ...]
    #: full torch name (``layer1.0.bn1.running_mean``); the module path for folded/missing
    torch_name: str | None
    #: ``equal``, ``differs``, ``folded``, ``missing``, ``absent_zero`` or a TRANSFORMS key
    status: str
    detail: str = ""
    #: max |torch - correct| for transforms and differences (None for equal blobs, or when
    #: the shapes do not allow it)
    max_abs: float | None = None
    #: torch module path the blob belongs to
    module: str | None = None

    @property
    def is_transform(self) -> bool:
        return self.status in TRANSFORMS

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.layer_type, "blob": self.index,
                "shape": list(self.shape), "torch": self.torch_name, "module": self.module,
                "status": self.status, "detail": self.detail, "max_abs": self.max_abs}


@dataclass
class AuditResult:
    checks: list[BlobCheck]
    #: Caffe blobs with no torch counterpart (layer, blob index), zero blobs excepted
    unmapped_ref: list[tuple[str, int]] = field(default_factory=list)
    #: torch tensors no Caffe blob maps to, torch defaults (all 1 / all 0) excepted
    unmapped_cand: list[str] = field(default_factory=list)
    #: unmapped but harmless: all-zero Caffe blobs, torch tensors at their default value
    inert_ref: list[tuple[str, int]] = field(default_factory=list)
    inert_cand: list[str] = field(default_factory=list)
    #: Caffe layer -> torch module path it was tied to, and how
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def mapping(self) -> dict[tuple[str, int], tuple[str | None, str]]:
        """(Caffe layer, blob index) -> (torch name, status)."""
        return {(c.layer, c.index): (c.torch_name, c.status) for c in self.checks}

    @property
    def problems(self) -> list[BlobCheck]:
        return [c for c in self.checks if c.status not in NEUTRAL]

    @property
    def transforms(self) -> list[BlobCheck]:
        return [c for c in self.checks if c.is_transform]

    @property
    def ok(self) -> bool:
        """Every blob maps equal and nothing is left over on either side."""
        return not self.problems and not self.unmapped_ref and not self.unmapped_cand

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for c in self.checks:
            counts[c.status] = counts.get(c.status, 0) + 1
        return {"ok": self.ok, "counts": counts, "blobs": [c.to_dict() for c in self.checks],
                "unmapped_ref": [list(x) for x in self.unmapped_ref],
                "unmapped_cand": list(self.unmapped_cand),
                "inert_ref": [list(x) for x in self.inert_ref],
                "inert_cand": list(self.inert_cand),
                "modules": {k: {"module": m, "how": h} for k, (m, h) in self.modules.items()}}


# ----------------------------------------------------------------------------------------------
# the forms a blob may take in the candidate


@dataclass(frozen=True)
class Form:
    status: str
    fn: Callable[[np.ndarray], np.ndarray]
    #: a re-ordering of the blob (so it can be applied to an index array for the evidence)
    permutes: bool = True


def bn_factor(layer: RefLayer) -> float | None:
    """Caffe's multiplier for the stored BatchNorm statistics (1/s, or 0 when s == 0)."""
    if layer.type != "BatchNorm" or len(layer.blobs) < 3:
        return None
    s = float(np.asarray(layer.blobs[2]).reshape(-1)[0])
    return 0.0 if s == 0 else 1.0 / s


def forms(layer: RefLayer, k: int) -> list[Form]:
    """The correct torch form of blob ``k`` first, then the typical wrong ones."""
    blob = np.asarray(layer.blobs[k])
    t = layer.type
    if t == "BatchNorm" and k in (0, 1):
        f = bn_factor(layer)
        if f is None:
            return [Form(EQUAL, _same)]
        out = [Form(EQUAL, lambda a, f=f: a * f, False)]
        if f != 0 and abs(f - 1.0) > 1e-6:
            out.append(Form("bn_scale_factor", _same, False))
        return out
    out = [Form(EQUAL, _same)]
    if t in CONV_TYPES and k == 0 and blob.ndim == 4:
        o, i, kh, kw = blob.shape
        if kh * kw > 1:
            out.append(Form("conv_kernel_flipped", lambda a: a[:, :, ::-1, ::-1]))
        if kh == kw > 1:
            out.append(Form("conv_kernel_hw_transposed", lambda a: a.transpose(0, 1, 3, 2)))
        if o * i > 1:
            out.append(Form("conv_weight_transposed", lambda a: a.transpose(1, 0, 2, 3)))
        if i == 3 and layer.reads_input is not False:
            out.append(Form("bgr_rgb_first_conv", lambda a: a[:, ::-1]))
    if t == "InnerProduct" and k == 0 and blob.ndim == 2:
        s = layer.input_shape
        if s is not None and len(s) == 4 and s[2] * s[3] > 1 and \
                s[1] * s[2] * s[3] == blob.shape[1]:
            c, h, w = s[1], s[2], s[3]
            out.append(Form("flatten_order", lambda a, c=c, h=h, w=w:
                            a.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(a.shape[0], -1)))
        if blob.shape[0] * blob.shape[1] > 1:
            out.append(Form("linear_weight_transposed", lambda a: a.T))
    return out


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def fits(form: np.ndarray, got: np.ndarray) -> bool:
    """Same shape, or the same once size-1 axes are dropped (an InnerProduct as a 1x1 conv)."""
    return form.shape == got.shape or (form.size == got.size
                                       and _squeezed(form.shape) == _squeezed(got.shape))


_CHUNK = 1 << 20  # compare big blobs piecewise: no float64 copy of a 100M-value fc layer


def close(form: np.ndarray, got: np.ndarray, rtol: float) -> bool:
    """``got`` holds ``form``'s values up to storage rounding (``form`` may be a view)."""
    if not fits(form, got):
        return False
    if form.size == 0:
        return True
    # A cheap look first (no copy of a transposed view): most candidates fail right away.
    hf = np.asarray(form.flat[:16], np.float64)
    hg = np.asarray(got.flat[:16], np.float64)
    if not np.all(np.abs(hf - hg) <= 2 * rtol * (np.abs(hf) + np.abs(hg)) + 1e-7):
        return False
    f = np.ascontiguousarray(form).reshape(-1)
    g = np.ascontiguousarray(got).reshape(-1)
    # Below its normal range float16 keeps a fixed spacing (6e-8 = 6e-5 x its rtol): tiny
    # values (a near-zero bias) round absolutely, not relatively. Scaled alike for the others.
    atol = rtol * (1e-2 * float(np.abs(f).max()) + 6e-5)
    for i in range(0, f.size, _CHUNK):
        a, b = f[i:i + _CHUNK].astype(np.float64), g[i:i + _CHUNK].astype(np.float64)
        if not np.all(np.abs(a - b) <= rtol * np.abs(a) + atol):
            return False
    return True


def max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(max |a - b|, flat index of it), piecewise in float64; a and b of equal size."""
    f = np.ascontiguousarray(a).reshape(-1)
    g = np.ascontiguousarray(b).reshape(-1)
    best, at = 0.0, 0
    for i in range(0, f.size, _CHUNK):
        d = np.abs(f[i:i + _CHUNK].astype(np.float64) - g[i:i + _CHUNK].astype(np.float64))
        if d.size and float(d.max()) > best:
            best, at = float(d.max()), i + int(np.argmax(d))
    return best, at


def _const(a: np.ndarray, value: float) -> bool:
    a = np.asarray(a)
    return a.size > 0 and bool(np.all(a == value))


# ----------------------------------------------------------------------------------------------
# candidate side


@dataclass
class _Tensor:
    name: str
    module: str
    leaf: str
    array: np.ndarray
    pos: int


def _split(name: str) -> tuple[str, str]:
    mod, _, leaf = name.rpartition(".")
    return mod, leaf


def as_array(x: Any) -> np.ndarray | None:
    """A float numpy array from a numpy array or torch tensor (None for integer buffers)."""
    if hasattr(x, "detach"):  # a torch tensor: numpy has no bfloat16, so widen those
        if not x.is_floating_point():
            return None
        t = x.detach().cpu()
        return (t if str(t.dtype) in ("torch.float64", "torch.float32") else t.float()).numpy()
    a = np.asarray(x)
    return a if np.issubdtype(a.dtype, np.floating) else None


# ----------------------------------------------------------------------------------------------
# the audit


def audit(ref_params: dict[str, list[np.ndarray]], cand_params: dict[str, Any], *,
          ref_types: dict[str, str] | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None,
          reads_input: dict[str, bool] | None = None,
          cand_kinds: dict[str, str] | None = None,
          cand_dtype: str = "float32", rtol: float | None = None) -> AuditResult:
    """Audit Caffe blobs (``layer -> [blob0, blob1, ...]``, in net order) against a torch
    state_dict-style mapping (``"conv1.weight" -> array``).

    ``ref_types``: Caffe layer types (needed to know blob roles); ``input_shapes``: each layer's
    input shape (the HWC check of an InnerProduct after a flatten); ``reads_input``: layers fed
    by a net input (the BGR check); ``cand_kinds``: torch module path -> class name (pairs
    layers by name only with compatible modules); ``cand_dtype``: the candidate's storage
    precision, which sets how close "equal" is.
    """
    types = ref_types or {}
    layers = [RefLayer(n, types.get(n, ""), [np.asarray(b) for b in blobs],
                       (input_shapes or {}).get(n), (reads_input or {}).get(n))
              for n, blobs in ref_params.items() if blobs]
    return audit_layers(layers, cand_params, cand_kinds=cand_kinds,
                        rtol=rtol if rtol is not None else RTOL.get(cand_dtype, 1e-5))


def audit_layers(layers: list[RefLayer], cand_params: dict[str, Any], *,
                 cand_kinds: dict[str, str] | None = None, rtol: float = 1e-5) -> AuditResult:
    """:func:`audit` on prepared :class:`RefLayer` objects."""
    tensors: list[_Tensor] = []
    mod_pos: dict[str, int] = {}
    for name, value in cand_params.items():
        arr = as_array(value)
        if arr is None:
            continue
        mod, leaf = _split(name)
        mod_pos.setdefault(mod, len(mod_pos))
        tensors.append(_Tensor(name, mod, leaf, arr, mod_pos[mod]))
    by_mod: dict[str, dict[str, _Tensor]] = {}
    for t in tensors:
        by_mod.setdefault(t.module, {})[t.leaf] = t
    layers = [lay for lay in layers if lay.blobs]
    tie = _pair_layers(layers, by_mod, mod_pos, cand_kinds or {}, rtol)

    res = AuditResult([])
    used: set[str] = set()
    for lay in layers:
        mod = tie.get(lay.name)
        if mod is None:
            for k, b in enumerate(lay.blobs):
                if _const(b, 0.0) or (lay.type == "BatchNorm" and k == 2):
                    res.inert_ref.append((lay.name, k))
                else:
                    res.unmapped_ref.append((lay.name, k))
            continue
        res.modules[lay.name] = (mod[0], mod[1])
        for k in range(len(lay.blobs)):
            chk = _check_blob(lay, k, mod[0], by_mod.get(mod[0], {}), used, rtol)
            res.checks.append(chk)
            if chk.status in (MISSING, "missing_bias"):
                res.unmapped_ref.append((lay.name, k))
    for t in tensors:
        if t.name in used:
            continue
        default = _INERT.get(t.leaf)
        if default is not None and _const(t.array, default):
            res.inert_cand.append(t.name)
        else:
            res.unmapped_cand.append(t.name)
    return res


def _roles(lay: RefLayer) -> tuple[str | None, ...] | None:
    return ROLES.get(lay.type)


def _pair_layers(layers: list[RefLayer], by_mod: dict[str, dict[str, _Tensor]],
                 mod_pos: dict[str, int], kinds: dict[str, str],
                 rtol: float) -> dict[str, tuple[str, str]]:
    """Caffe layer -> (torch module path, how it was found)."""
    tie: dict[str, tuple[str, str]] = {}
    claimed: dict[str, set[str]] = {}  # module -> leaves claimed by tied layers

    def wanted(lay: RefLayer, mod: str) -> list[str] | None:
        """The standard leaves the layer needs in ``mod``; None when the module does not use
        standard names (then the layer takes the whole module, by position)."""
        roles = _roles(lay)
        want = [r for r in (roles or ())[:len(lay.blobs)] if r]
        return want if set(want) & set(by_mod.get(mod, {})) else None

    def take(lay: RefLayer, mod: str, how: str) -> None:
        tie[lay.name] = (mod, how)
        want = wanted(lay, mod)
        claimed.setdefault(mod, set()).update(want if want is not None else by_mod.get(mod, {}))

    def free_for(lay: RefLayer, mod: str) -> bool:
        taken = claimed.get(mod, set())
        want = wanted(lay, mod)
        return not taken if want is None else not any(r in taken for r in want)

    # 1. names: the module named like the layer, or the one tensor-holding module under it
    norm_mods: dict[str, list[str]] = {}
    for mod in by_mod:
        norm_mods.setdefault(normalize_name(mod), []).append(mod)
    for lay in layers:
        key = normalize_name(lay.name)
        cands = list(norm_mods.get(key, []))
        if not cands:
            cands = [m for m in by_mod if normalize_name(m).startswith(key + "_")]
            cands = cands if len(cands) == 1 else []
        for mod in cands:
            kind = kinds.get(mod)
            if kind and families(kind) and families(lay.type) and \
                    not compatible(kind, lay.type) and not _holds_affine(lay, kind):
                continue
            if free_for(lay, mod):
                take(lay, mod, "name")
                break

    # 2. values: a blob (in any of its forms) equal to some torch tensor
    by_size: dict[int, list[_Tensor]] = {}
    for leaves in by_mod.values():
        for t in leaves.values():
            by_size.setdefault(t.array.size, []).append(t)
    for lay in layers:
        if lay.name in tie:
            continue
        order = sorted(range(len(lay.blobs)), key=lambda k: -np.asarray(lay.blobs[k]).size)
        found = None
        for k in order:
            blob = np.asarray(lay.blobs[k])
            if blob.size < 2 or float(np.ptp(blob)) == 0.0 or \
                    (lay.type == "BatchNorm" and k == 2):
                continue
            fs = [f.fn(blob) for f in forms(lay, k)]
            for t in by_size.get(blob.size, []):
                if any(close(f, t.array, rtol) for f in fs) and free_for(lay, t.module):
                    found = t.module
                    break
            if found:
                break
        if found:
            take(lay, found, "value")

    # 3. a Scale after a BatchNorm: the BatchNorm2d that holds the statistics holds gamma/beta
    prev: RefLayer | None = None
    for lay in layers:
        if lay.type == "Scale" and lay.name not in tie and prev is not None and \
                prev.type == "BatchNorm" and prev.name in tie:
            mod = tie[prev.name][0]
            if free_for(lay, mod):
                take(lay, mod, "after BatchNorm")
        prev = lay

    # 4. order: between tied neighbours, the first unclaimed module whose shapes fit
    names = [lay.name for lay in layers]
    for i, lay in enumerate(layers):
        if lay.name in tie:
            continue
        lo = max((mod_pos[tie[n][0]] for n in names[:i] if n in tie), default=-1)
        hi = min((mod_pos[tie[n][0]] for n in names[i + 1:] if n in tie), default=1 << 30)
        for mod, pos in mod_pos.items():
            if lo < pos < hi and mod not in claimed and _shapes_fit(lay, by_mod.get(mod, {})):
                take(lay, mod, "order")
                break
    return tie


def _holds_affine(lay: RefLayer, kind: str) -> bool:
    # Caffe Scale lives inside torch's BatchNorm2d
    return lay.type == "Scale" and "batchnorm" in families(kind)


def _shapes_fit(lay: RefLayer, leaves: dict[str, _Tensor]) -> bool:
    """The module's tensors could hold the layer's blobs (by role, else by position)."""
    if not leaves:
        return False
    first = (_roles(lay) or (None,))[0]
    if first is not None and first in leaves:
        return leaves[first].array.size == np.asarray(lay.blobs[0]).size
    arrs = list(leaves.values())
    return len(arrs) == len(lay.blobs) and all(
        a.array.size == np.asarray(b).size for a, b in zip(arrs, lay.blobs, strict=True))


def _check_blob(lay: RefLayer, k: int, mod: str, leaves: dict[str, _Tensor], used: set[str],
                rtol: float) -> BlobCheck:
    blob = np.asarray(lay.blobs[k])
    base = BlobCheck(lay.name, lay.type, k, tuple(blob.shape), None, DIFFERS, module=mod)
    roles = _roles(lay)
    role = roles[k] if roles is not None and k < len(roles) else None
    if roles is not None and role is None:  # BatchNorm's scale factor
        base.status, base.torch_name = FOLDED, mod
        base.detail = f"scale factor {float(blob.reshape(-1)[0]):g}, applied to mean/var"
        return base
    fs = forms(lay, k)
    slot = leaves.get(role) if role is not None else None
    if slot is None or slot.name in used:
        slot = _positional(lay, k, fs, leaves, used, rtol)
    partner = _partner(lay, k, leaves, used)
    if slot is None and partner is None:
        base.torch_name = mod
        if _const(blob, 0.0):
            base.status, base.detail = ABSENT_ZERO, "all zeros in Caffe; torch has none"
        else:
            base.status = "missing_bias" if role == "bias" else MISSING
            base.detail = (f"torch module {mod or '(root)'} has no {role or 'tensor'} for it; "
                           f"Caffe max |blob| = {float(np.abs(blob).max()):.6g}")
        return base
    correct = fs[0].fn(blob)
    if slot is not None:
        for f in fs:
            if close(f.fn(blob), slot.array, rtol):
                return _verdict(base, slot, f, blob, correct, used)
    if partner is not None:
        swapped = SWAPS[lay.type][1]
        for f in fs:
            if close(f.fn(blob), partner.array, rtol):
                chk = _verdict(base, partner, f, blob, correct, used)
                g = np.asarray(partner.array).reshape(-1)
                at = int(np.argmax(np.abs(g)))
                chk.detail = (f"Caffe {lay.name} blob{k} is in torch {partner.name} (the "
                              f"{partner.leaf} slot): {partner.leaf}[{at}] = {g[at]:.6g}, Caffe "
                              f"blob{k}[{at}] = {blob.reshape(-1)[at]:.6g}"
                              + (f"; also {TRANSFORMS[f.status]}" if f.status != EQUAL else ""))
                chk.status = swapped
                return chk
    if slot is None:
        base.status, base.torch_name = MISSING, mod
        return base
    used.add(slot.name)
    base.torch_name = slot.name
    default = {0: 1.0, 1: 0.0}.get(k)
    if lay.type == "Scale" and default is not None and _const(slot.array, default) and \
            not _const(blob, default):
        base.status = "bn_affine_missing"
        base.detail = (f"torch {slot.name} is all {default:g}; Caffe {lay.name} blob{k} ranges "
                       f"{float(blob.min()):.6g} .. {float(blob.max()):.6g}")
        return base
    if fits(correct, slot.array):
        base.max_abs = max_diff(correct, slot.array)[0]
        base.detail = f"max |torch - Caffe| = {base.max_abs:.6g}"
    else:
        base.detail = f"shape {tuple(slot.array.shape)} vs Caffe {tuple(correct.shape)}"
    return base


def _verdict(base: BlobCheck, t: _Tensor, f: Form, blob: np.ndarray, correct: np.ndarray,
             used: set[str]) -> BlobCheck:
    used.add(t.name)
    base.torch_name, base.status = t.name, f.status
    if f.status == EQUAL:
        return base  # equal within storage rounding (no second pass over a big blob)
    base.detail = evidence(base.layer, base.index, blob, t.name, t.array, f, correct)
    if fits(correct, t.array):
        base.max_abs = max_diff(correct, t.array)[0]
    return base


def evidence(layer: str, k: int, blob: np.ndarray, torch_name: str, got: np.ndarray, f: Form,
             correct: np.ndarray) -> str:
    """One line with real values showing where the torch tensor's values come from."""
    got = np.asarray(got)
    at = max_diff(correct, got)[1] if fits(correct, got) else int(np.argmax(np.abs(got)))
    t_idx = np.unravel_index(at, got.shape)
    value = float(got.flat[at])
    if f.permutes:
        index = np.arange(blob.size, dtype=np.int32 if blob.size < 2 ** 31 else np.int64)
        src = int(np.asarray(f.fn(index.reshape(blob.shape))).flat[at])
        s_idx = np.unravel_index(src, blob.shape)
        line = (f"torch {torch_name}{_ix(t_idx)} = {value:.6g} is Caffe {layer} "
                f"blob{k}{_ix(s_idx)} = {float(blob.flat[src]):.6g}")
        if fits(correct, got):
            line += f"; Caffe's value at {_ix(t_idx)} is {float(correct.flat[at]):.6g}"
        return line
    line = (f"torch {torch_name}{_ix(t_idx)} = {value:.6g} equals Caffe {layer} "
            f"blob{k}{_ix(t_idx)} = {float(blob.flat[at]):.6g}")
    if fits(correct, got):
        line += f"; a correct port holds {float(correct.flat[at]):.6g}"
    return line


def _ix(idx: tuple) -> str:
    return "[" + ",".join(str(int(i)) for i in idx) + "]"


def _positional(lay: RefLayer, k: int, fs: list[Form], leaves: dict[str, _Tensor],
                used: set[str], rtol: float) -> _Tensor | None:
    """A module whose tensors are not named weight/bias/...: the unused one that fits."""
    roles = _roles(lay)
    role_names = {r for r in roles or () if r}
    if roles is not None and role_names & set(leaves):
        return None  # the module uses the standard names: no guessing
    blob = np.asarray(lay.blobs[k])
    free = [t for t in leaves.values() if t.name not in used and t.array.size == blob.size]
    for t in free:
        if any(close(f.fn(blob), t.array, rtol) for f in fs):
            return t
    return free[0] if free else None


def _partner(lay: RefLayer, k: int, leaves: dict[str, _Tensor], used: set[str]) -> _Tensor | None:
    swap = SWAPS.get(lay.type)
    roles = _roles(lay)
    if swap is None or roles is None or k not in swap[0]:
        return None
    other = roles[swap[0][k]]
    t = leaves.get(other) if other else None
    return t if t is not None and t.name not in used else None


# ----------------------------------------------------------------------------------------------
# sources


def ref_layers_from_net(net: Any) -> list[RefLayer]:
    """RefLayers of a CaffeNet, blobs as the engine plans them (input shapes included)."""
    from layerdiff.engine import make_plan

    plan = make_plan(net, strict=False)
    inputs = set(net.inputs)
    out = []
    for p in plan.layers:
        if not p.blobs:
            continue
        shape = tuple(p.bottom_shapes[0]) if p.bottom_shapes else None
        out.append(RefLayer(p.layer.name, p.layer.type, [np.asarray(b) for b in p.blobs], shape,
                            any(b in inputs for b in p.layer.bottoms)))
    return out


def ref_layers_from_trace(trace: Any) -> list[RefLayer]:
    """RefLayers of a Caffe trace (records whose params are keyed "0", "1", ...)."""
    out = []
    for rec in trace:
        keys = [k for k in rec.params if k.isdigit()]
        if not keys:
            continue
        blobs = [np.asarray(rec.params[k]) for k in sorted(keys, key=int)]
        first = trace.value_before(rec.bottoms[0], rec.index) if rec.bottoms else None
        reads = any(b in trace.inputs and _written_by_input(trace, b, rec.index)
                    for b in rec.bottoms)
        out.append(RefLayer(rec.name, rec.kind, blobs,
                            None if first is None else tuple(np.shape(first)), reads))
    return out


def _written_by_input(trace: Any, blob: str, index: int) -> bool:
    for r in reversed(trace.records[:index]):
        if blob in r.tops:
            return r.kind == "Input"
    return True


def cand_from_trace(trace: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A state_dict-like mapping and module kinds from a torch trace's module records."""
    params: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for rec in trace:
        if not rec.params:
            continue
        mod = rec.name.split("#", 1)[0]  # a module called twice is recorded as name#2
        kinds.setdefault(mod, rec.kind)
        for leaf, arr in rec.params.items():
            params.setdefault(f"{mod}.{leaf}" if mod else leaf, np.asarray(arr))
    return params, kinds


def cand_from_module(module: Any) -> tuple[dict[str, Any], dict[str, str]]:
    kinds = {name: type(m).__name__ for name, m in module.named_modules()}
    return dict(module.state_dict()), kinds


def audit_models(caffe_net: Any, torch_module: Any, cand_dtype: str | None = None) -> AuditResult:
    """Audit a CaffeNet's blobs against ``torch_module.state_dict()``."""
    params, kinds = cand_from_module(torch_module)
    if cand_dtype is None:
        cand_dtype = storage_dtype(params)
    return audit_layers(ref_layers_from_net(caffe_net), params, cand_kinds=kinds,
                        rtol=RTOL.get(cand_dtype, 1e-5))


def audit_traces(ref_trace: Any, cand_trace: Any) -> AuditResult:
    """Audit the recorded params of a Caffe trace against those of a torch trace."""
    params, kinds = cand_from_trace(cand_trace)
    dtype = str(cand_trace.meta.get("dtype", "float32"))
    return audit_layers(ref_layers_from_trace(ref_trace), params, cand_kinds=kinds,
                        rtol=RTOL.get(dtype, 1e-5))


def storage_dtype(params: dict[str, Any]) -> str:
    """The floating dtype torch tensors are stored in (``float32`` when none says otherwise)."""
    for v in params.values():
        dt = str(getattr(v, "dtype", ""))
        for name in ("bfloat16", "float16", "float64"):
            if dt.endswith(name):
                return name
    return "float32"


# ----------------------------------------------------------------------------------------------
# re-running torch modules (shared by the probes built on the audit)


def module_fn(module: Any, training: bool = False,
              n_inputs: int | None = None) -> Callable[..., np.ndarray]:
    """A plain callable running ``module`` on numpy inputs, for ``LayerCase.rerun(replace=)``.

    Inputs (the first ``n_inputs`` when given) go to the module's device and floating dtype;
    the output comes back as numpy in float32 (float64 for a float64 module).
    """
    import torch

    module.train(training)
    like = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()),
                None)
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else torch.device("cpu")

    def run(*xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(*[torch.as_tensor(np.array(x)).to(device, dtype)
                           for x in xs[:n_inputs]])
        out = out.detach().cpu()
        return (out if out.dtype == torch.float64 else out.float()).numpy()

    return run


def captured_training(trace: Any, module_path: str) -> bool:
    """Whether the module ran in train mode during the capture (usually not: eval())."""
    return module_path in (trace.meta.get("training_modules") or []) or \
        (module_path == "" and "(root)" in (trace.meta.get("training_modules") or []))


# ----------------------------------------------------------------------------------------------
# findings already made from the audit, per report (so per-layer probes do not repeat them)

_REPORTED: dict[int, tuple[weakref.ref, set[tuple[str, str]]]] = {}


def note_reported(report: Any, kind: str, layer: str) -> None:
    key = id(report)
    hit = _REPORTED.get(key)
    if hit is None or hit[0]() is not report:
        for k in [k for k, (r, _) in _REPORTED.items() if r() is None]:
            del _REPORTED[k]
        hit = _REPORTED[key] = (weakref.ref(report), set())
    hit[1].add((kind, layer))


def reported(report: Any, kind: str, layer: str) -> bool:
    """Whether the weight audit already reported ``kind`` at ``layer`` for this report."""
    hit = _REPORTED.get(id(report))
    return hit is not None and hit[0]() is report and (kind, layer) in hit[1]


# ----------------------------------------------------------------------------------------------
# rendering


def render_audit(result: AuditResult, all_rows: bool = False, max_per_status: int = 5) -> Any:
    """A rich renderable: the blobs that are not equal (every blob with ``all_rows``; at most
    ``max_per_status`` rows per verdict otherwise) and a summary."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="weight audit", title_justify="left", header_style="bold")
    for col in ("Caffe layer", "blob", "shape", "torch", "verdict", "detail"):
        table.add_column(col, overflow="fold")
    rows = result.checks if all_rows else [c for c in result.checks if c.status not in NEUTRAL]
    shown: dict[str, int] = {}
    hidden: dict[str, int] = {}
    for c in rows:
        shown[c.status] = shown.get(c.status, 0) + 1
        if not all_rows and shown[c.status] > max_per_status:
            hidden[c.status] = hidden.get(c.status, 0) + 1
            continue
        style = "green" if c.status in NEUTRAL else ("yellow" if c.is_transform else "red")
        verdict = c.status if c.status not in TRANSFORMS else f"{c.status}: {TRANSFORMS[c.status]}"
        table.add_row(c.layer, str(c.index), "x".join(map(str, c.shape)) or "scalar",
                      c.torch_name or "-", Text(verdict, style=style), c.detail)
    counts: dict[str, int] = {}
    for c in result.checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    lines = [f"{len(result.checks)} Caffe blobs tied to torch tensors: "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: -x[1]))]
    for status, n in hidden.items():
        lines.append(f"(+{n} more {status} rows not shown)")
    if result.unmapped_ref:
        lines.append(f"Caffe blobs with no torch counterpart ({len(result.unmapped_ref)}): "
                     + _few([f"{n}[{k}]" for n, k in result.unmapped_ref]))
    if result.unmapped_cand:
        lines.append(f"torch tensors no Caffe blob maps to ({len(result.unmapped_cand)}): "
                     + _few(result.unmapped_cand))
    if result.inert_cand or result.inert_ref:
        lines.append(f"ignored: {len(result.inert_cand)} torch tensors at their default value, "
                     f"{len(result.inert_ref)} all-zero Caffe blobs without a counterpart")
    lines.append("[bold green]all blobs map equal[/]" if result.ok else
                 "[bold red]the weights differ from the Caffe model[/]")
    parts: list[Any] = [table] if rows else []
    parts += [Text.from_markup(x) if x.startswith("[") else Text(x) for x in lines]
    return Group(*parts)


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")

"""Fixes as executable patches: Python statements over ``model`` that a probe's counterfactual
proved (``Finding.patch``), applied by ``layerdiff.fix``.

A patch sets absolute values (the tensors the counterfactual ran with), never relative edits
(``/= s``), so applying the fix of two findings that name the same tensor is harmless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: plain module attributes a patch may set (what a module's forward reads)
_PLAIN = (bool, int, float, str, type(None))


@dataclass
class Patch:
    lines: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: a name that is not a Python identifier: no patch (the fix is left to the user)
    unsafe: bool = False

    @property
    def code(self) -> str:
        return "\n".join(self.lines)

    def set_tensor(self, path: str, leaf: str, value: Any, new: bool = False) -> None:
        """``path.leaf`` := ``value``; ``new``: the module has no such tensor yet."""
        key = f"{path}.{leaf}" if path else leaf
        self.unsafe |= not leaf.isidentifier()
        self.arrays[key] = np.array(_np(value))
        m = module_expr(path)
        ref = array_ref(key)
        if new:
            self.lines.append(f"m = {m}; m.{leaf} = torch.nn.Parameter(torch.from_numpy("
                              f"{ref}).float())")
        else:
            self.lines.append(f"m = {m}; m.{leaf}.data = torch.from_numpy("
                              f"{ref}).to(m.{leaf}).reshape(m.{leaf}.shape).clone()")

    def set_attr(self, path: str, attr: str, value: Any) -> None:
        self.unsafe |= not attr.isidentifier()
        self.lines.append(f"{module_expr(path)}.{attr} = {_literal(value)}")

    def attach(self, finding: Any) -> Any:
        """Put this patch on ``finding`` (returned) when it has anything to do."""
        if finding is not None and self.lines and not self.unsafe:
            finding.patch, finding.patch_arrays = self.code, self.arrays
        return finding


def _literal(value: Any) -> str:
    """``repr``, but a float read from a float32 field (Caffe's eps) as its short decimal."""
    if isinstance(value, float) and float(np.float32(value)) == value:
        short = float(f"{value:.7g}")
        if np.float32(short) == np.float32(value):
            return repr(short)
    return repr(value)


def module_expr(path: str) -> str:
    """Python naming a submodule of ``model`` (the path quoted as a string literal)."""
    return f"model.get_submodule({json.dumps(path)})" if path not in ("", "(root)") else "model"


def array_ref(key: str) -> str:
    """Python naming one of a patch's arrays."""
    return f"arrays[{json.dumps(key)}]"


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def module_patch(path: str, before: Any, after: Any) -> Patch | None:
    """The patch turning module ``before`` (the candidate's, at ``path``) into ``after`` (the
    fixed copy a counterfactual ran), submodules included, or None when it would need more
    than tensors and plain attributes (another class, other submodules)."""
    before_mods = dict(before.named_modules())
    after_mods = dict(after.named_modules())
    if set(before_mods) != set(after_mods):
        return None
    p = Patch()
    for name, new in after_mods.items():
        old = before_mods[name]
        if type(old) is not type(new):
            return None
        where = ".".join(x for x in (path if path != "(root)" else "", name) if x)
        if not _one_module(p, where, old, new):
            return None
    return p


def _one_module(p: Patch, path: str, before: Any, after: Any) -> bool:
    """Add to ``p`` what differs in one module's own attributes and tensors."""
    import torch

    for k, v in vars(after).items():
        if k.startswith("_") or k == "training":
            continue
        old = getattr(before, k, None)
        if _is_plain(v) and _is_plain(old) and v != old:
            p.set_attr(path, k, v)
    old_t = dict(before.named_parameters(recurse=False)) | dict(before.named_buffers(
        recurse=False))
    for k, t in list(after.named_parameters(recurse=False)) + list(after.named_buffers(
            recurse=False)):
        have = old_t.get(k)
        if have is None or tuple(have.shape) != tuple(t.shape):
            if not isinstance(t, torch.nn.Parameter):
                return False
            p.set_tensor(path, k, t, new=True)
        elif not torch.equal(have.detach().cpu(), t.detach().cpu().to(have.dtype)):
            p.set_tensor(path, k, t)
    return True


def _is_plain(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_plain(x) for x in v)
    return isinstance(v, _PLAIN)


def record_path(rec: Any) -> str | None:
    """The module path of a candidate record (None for a functional op)."""
    return rec.attrs.get("module") or getattr(rec.handle, "module", None)


def attach_module_patch(finding: Any, rec: Any, before: Any, after: Any) -> Any:
    """``finding`` with the patch from ``before`` to ``after`` at ``rec``'s module, if any."""
    path = record_path(rec)
    patch = module_patch(path, before, after) if path is not None else None
    return patch.attach(finding) if patch is not None else finding


def merge_patch(winner: Any, other: Any) -> None:
    """``winner`` absorbs the patch of a finding it supersedes (the same cause, reported once):
    e.g. the weight audit's patch for every BatchNorm. Its own statements run last, so its
    values win where both set the same tensor."""
    mine = winner.patch.splitlines()
    extra = [ln for ln in other.patch.splitlines() if ln not in mine]
    if not extra:
        return
    winner.patch = "\n".join(extra + mine)
    winner.patch_arrays = {**other.patch_arrays, **winner.patch_arrays}
    theirs = other.data.get("onnx_patch")
    if theirs:  # the same patch as data (layerdiff.fix.onnx_port applies that form)
        ours = winner.data.setdefault("onnx_patch", {"initializers": [], "attributes": {}})
        ours["initializers"] = list(dict.fromkeys(theirs.get("initializers", []) +
                                                  ours.get("initializers", [])))
        attrs = {n: dict(a) for n, a in theirs.get("attributes", {}).items()}
        for n, a in ours.get("attributes", {}).items():
            attrs.setdefault(n, {}).update(a)
        ours["attributes"] = attrs

"""The repaired port on disk: the user's files copied untouched under ``original/``, the fixed
state dict as ``weights.pt``, and a ``model.py`` that builds the original model and replays the
code-level fixes (one commented line per statement, naming its finding)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerdiff.diagnose.patch import array_ref
from layerdiff.errors import LayerdiffError
from layerdiff.fix.apply import AppliedFix

ORIGINAL = "original"
WEIGHTS = "weights.pt"
ARRAYS = "fix_arrays.npz"
#: everything --fix-out writes into DIR (all that --force replaces)
OURS = (ORIGINAL, WEIGHTS, ARRAYS, "model.py", "FIXES.md")


def check_out_dir(out: Path, candidate: Path, force: bool) -> None:
    """Refuse, before any work, an output folder that is not new or empty (unless forced: then
    only the files a fix writes are replaced), or one that overlaps the candidate's folder."""
    if out.exists() and not out.is_dir():
        raise LayerdiffError(f"--fix-out {out}: is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LayerdiffError(f"--fix-out {out}: directory is not empty; choose a new or empty "
                             "one, or pass --force")
    folder = candidate_folder(candidate).resolve()
    target = out.resolve()
    if target == folder or folder in target.parents or target in folder.parents:
        raise LayerdiffError(f"--fix-out {out}: overlaps the candidate folder {folder}; the "
                             "candidate is never written, choose a directory outside it")


def candidate_folder(candidate: Path) -> Path:
    return candidate if candidate.is_dir() else candidate.parent


def model_py(candidate: Path) -> Path:
    """The candidate's model.py, or a one-line refusal for the forms a fix cannot rebuild."""
    p = candidate / "model.py" if candidate.is_dir() else candidate
    if p.suffix == ".py" and p.is_file():
        return p
    raise LayerdiffError(f"{candidate}: --fix-out repairs a torch port written as model.py "
                         "(+ a state dict); this candidate is an archive whose code cannot be "
                         "patched, so write it as model.py with build()")


def write_port(out: Path, candidate: Path, model: nn.Module, applied: list[AppliedFix],
               force: bool) -> None:
    """Write DIR: copy of the candidate, weights.pt, model.py (FIXES.md is written later)."""
    if out.is_dir() and force:  # replace what a previous --fix-out wrote, nothing else
        for name in OURS:
            child = out / name
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            elif child.exists() or child.is_symlink():
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    src = model_py(candidate)
    shutil.copytree(candidate_folder(candidate), out / ORIGINAL,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               out / WEIGHTS)
    arrays: dict[str, np.ndarray] = {}
    for a in applied:
        for line in a.code_lines:
            for key, value in a.finding.patch_arrays.items():
                if array_ref(key) in line:
                    arrays[key] = np.asarray(value)
    if arrays:
        np.savez(out / ARRAYS, **arrays)
    (out / "model.py").write_text(model_source(src.name, applied, bool(arrays)))


def model_source(original_name: str, applied: list[AppliedFix], has_arrays: bool) -> str:
    lines = []
    for a in applied:
        f = a.finding
        where = f" at {f.layer}" if f.layer else ""
        for code in a.code_lines:
            lines.append(f"        # {f.kind}{where}")
            lines.append(f"        {code}")
    body = "\n".join(lines) or ("        pass  # no code-level fix: only the weights changed "
                                f"({WEIGHTS})")
    load = (f'    arrays = np.load(_HERE / "{ARRAYS}", allow_pickle=False)\n' if has_arrays
            else "")
    return f'''"""The repaired port written by `layerdiff compare --fix-out` (see FIXES.md).

build() builds the original port ({ORIGINAL}/{original_name}, unchanged) and applies the
code-level fixes in place; {WEIGHTS} beside this file holds every weight with the weight-level
fixes (layerdiff loads it; elsewhere: model.load_state_dict(torch.load("{WEIGHTS}",
weights_only=True))).
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
_ORIGINAL = _HERE / "{ORIGINAL}" / "{original_name}"


def _import_original():
    spec = importlib.util.spec_from_file_location("layerdiff_fixed_original_" +
                                                  str(abs(hash(str(_ORIGINAL)))), _ORIGINAL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(_ORIGINAL.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_ORIGINAL.parent))
    return module


_original = _import_original()
for _name in ("INPUT_SHAPES", "INPUT_SHAPE", "input_shapes", "input_shape"):
    if hasattr(_original, _name):
        globals()[_name] = getattr(_original, _name)


def _build_original():
    sys.path.insert(0, str(_ORIGINAL.parent))
    try:
        for entry in ("build", "get_model"):
            if callable(getattr(_original, entry, None)):
                return getattr(_original, entry)()
        return _original.model
    finally:
        sys.path.remove(str(_ORIGINAL.parent))


def build():
    model = _build_original()
{load}    with torch.no_grad():
{body}
    return model
'''

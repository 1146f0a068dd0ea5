"""Load a user's PyTorch port from disk, refusing anything that would run untrusted code.

Forms (see :func:`load_torch`): ``model.py`` (+ a state_dict beside it), a ``torch.export``
archive (``.pt2``), a TorchScript archive, or a whole pickled module (only with
``trust_pickle=True``: unpickling can execute arbitrary code).
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
import sys
import warnings
import weakref
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from layerdiff.errors import ModelFormatError

_WEIGHT_SUFFIXES = (".pt", ".pth")
_ARCHIVE_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".jit", ".torchscript", ".pkl", ".pickle")
_ENTRY_POINTS = ("build", "get_model")
# Input shapes declared by the file a module came from (model.py INPUT_SHAPE, a .pt2's inputs).
_DECLARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _archive_kind(path: Path) -> str:
    """'pt2', 'torchscript', 'pickle' (a torch.save file or plain pickle) or 'unknown'."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any("/code/__torch__" in n or n.startswith("code/") for n in names):
            return "torchscript"
        if path.suffix == ".pt2" or any(re.search(r"(^|/)models/[^/]+\.json$", n)
                                        for n in names):
            return "pt2"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        return "unknown"
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({_first_line(e)})") from None
    return "pickle" if head[:1] == b"\x80" else "unknown"


def _needs_code(path: Path, e: Exception) -> ModelFormatError:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f" (it references {found.group(1)})" if found else ""
    return ModelFormatError(
        f"{path}: a pickled object that needs Python code to load{what}; unpickling can run "
        "arbitrary code, so it was not loaded: pass --trust-pickle (trust_pickle=True) if you "
        "trust the file, or provide model.py plus a state_dict, or a torch.export .pt2")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load that never executes pickled code unless trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise _needs_code(path, e) from None
    except Exception as e:  # noqa: BLE001 - corrupt/truncated/foreign file
        raise ModelFormatError(f"{path}: not a readable torch file ({_first_line(e)})") from None
    # A whole pickled module names its class by module (MMdnn's ``MainModel``): the class's
    # file sits beside the model, so that folder leads sys.path while unpickling, and only then.
    # No __pycache__ is written into the user's folder.
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        with _on_path(path.parent):
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - the trusted pickle's own code failed
        raise ModelFormatError(f"{path}: unpickling failed ({_first_line(e)})") from None
    finally:
        sys.dont_write_bytecode = saved


# ----------------------------------------------------------------------------------------------
# model.py


def _import_model_py(path: Path) -> ModuleType:
    """Import the user's model.py (this runs their code) under a name unique to its path."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"layerdiff_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFormatError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and relative lookups need it registered
    # No __pycache__ written into the user's model folder (or beside its sibling imports).
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        with _on_path(path.parent):
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - any error in user code is a user error
                sys.modules.pop(name, None)
                raise ModelFormatError(f"{path}: importing it raised {_first_line(e)}") from None
    finally:
        sys.dont_write_bytecode = saved
    return module


class _on_path:
    """Let model.py import its sibling files while it is imported and built."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder.resolve())

    def __enter__(self) -> None:
        self.added = self.folder not in sys.path
        if self.added:
            sys.path.insert(0, self.folder)

    def __exit__(self, *exc: Any) -> None:
        if self.added and self.folder in sys.path:
            sys.path.remove(self.folder)


def _build_from(path: Path, module: ModuleType) -> nn.Module:
    with _on_path(path.parent):
        for entry in _ENTRY_POINTS:
            fn = getattr(module, entry, None)
            if callable(fn):
                try:
                    model = fn()
                except Exception as e:  # noqa: BLE001
                    raise ModelFormatError(f"{path}: {entry}() raised {_first_line(e)}") from None
                if not isinstance(model, nn.Module):
                    raise ModelFormatError(f"{path}: {entry}() returned "
                                           f"{type(model).__name__}, not a torch.nn.Module")
                return model
    model = getattr(module, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise ModelFormatError(f"{path}: defines none of build(), get_model() or a module-level "
                           "`model` (a torch.nn.Module)")


def _declared_shapes(module: ModuleType) -> Any:
    for attr in ("INPUT_SHAPES", "INPUT_SHAPE", "input_shapes", "input_shape"):
        if hasattr(module, attr):
            return getattr(module, attr)
    return None


# ----------------------------------------------------------------------------------------------
# state_dict


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        # Training checkpoints wrap the weights: {"state_dict": ..., "epoch": ...}
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            inner = obj.get(key)
            if isinstance(inner, (dict, nn.Module)):
                return _as_state_dict(inner, path)
    raise ModelFormatError(f"{path}: holds a {type(obj).__name__}, not a state_dict "
                           "(a dict of parameter name -> tensor)")


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_file(model: nn.Module, weights: str | Path, *, strict: bool = True,
                         trust_pickle: bool = False, source: str = "the model") -> nn.Module:
    """Load a ``*.pt``/``*.pth`` state_dict into ``model`` (``torch.load(weights_only=True)``).

    A state_dict written for another model raises one line listing the missing and unexpected
    keys (first few + count) and shape mismatches; ``strict=False`` tolerates missing and
    unexpected keys (with a warning) but never a shape mismatch.
    """
    wpath = Path(weights)
    if not wpath.is_file():
        raise ModelFormatError(f"{wpath}: weights file not found")
    kind = _archive_kind(wpath)
    if kind in ("torchscript", "pt2"):
        raise ModelFormatError(f"{wpath}: a {kind} archive, not a state_dict; load it on its own")
    sd = _as_state_dict(_torch_load(wpath, trust_pickle), wpath)
    own = model.state_dict()
    if not (set(sd) & set(own)):
        # DataParallel / DDP checkpoints prefix every key with "module."
        stripped = {k.removeprefix("module."): v for k, v in sd.items()}
        if set(stripped) & set(own):
            sd = stripped
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) ({_few(mismatched, 2)})")
    if mismatched or (problems and strict):
        hint = "" if mismatched else "; strict=False loads the keys that match"
        raise ModelFormatError(f"{wpath}: state_dict does not fit {source}: "
                               f"{'; '.join(problems)}{hint}")
    if problems:
        warnings.warn(f"{wpath}: loaded non-strictly: {'; '.join(problems)}", stacklevel=2)
    try:
        model.load_state_dict(sd, strict=strict)
    except Exception as e:  # noqa: BLE001
        raise ModelFormatError(f"{wpath}: load_state_dict failed ({_first_line(e)})") from None
    return model


# ----------------------------------------------------------------------------------------------
# archives


def _load_archive(path: Path, trust_pickle: bool) -> nn.Module:
    kind = _archive_kind(path)
    if kind == "pt2":
        try:
            ep = torch.export.load(path)
        except Exception as e:  # noqa: BLE001
            raise ModelFormatError(f"{path}: not a loadable torch.export archive "
                                   f"({_first_line(e)})") from None
        module = ep.module()
        _DECLARED[module] = _graph_input_shapes(module)
        return module
    if kind == "torchscript":
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ModelFormatError(f"{path}: not a loadable TorchScript archive "
                                   f"({_first_line(e)})") from None
    if kind == "pickle":
        obj = _torch_load(path, trust_pickle)
        if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
            obj = obj["model"]
        if isinstance(obj, nn.Module):
            return obj
        if isinstance(obj, dict):
            raise ModelFormatError(f"{path}: a state_dict, not a model: put it beside a model.py "
                                   "that builds the model (or pass it as weights=)")
        raise ModelFormatError(f"{path}: holds a {type(obj).__name__}, not a torch.nn.Module")
    raise ModelFormatError(f"{path}: not a torch model file (expected a .pt2 export, a "
                           "TorchScript archive or a torch.save file)")


def _pick_in_dir(folder: Path) -> Path:
    found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _ARCHIVE_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelFormatError(f"{folder}: no model.py and no model archive "
                               f"({', '.join(_ARCHIVE_SUFFIXES)})")
    raise ModelFormatError(f"{folder}: several model files ({_few([f.name for f in found])}); "
                           "name one")


def _sibling_weights(folder: Path) -> Path | None:
    found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if len(found) > 1:
        raise ModelFormatError(f"{folder}: several weights files beside model.py "
                               f"({_few([f.name for f in found])}); pass weights=")
    return found[0] if found else None


def load_torch(path: str | Path, trust_pickle: bool = False, weights: str | Path | None = None,
               *, strict: bool = True) -> nn.Module:
    """Load a PyTorch model from ``path`` (a directory or a file).

    - ``model.py`` (or a directory holding one) exposing ``build()``, ``get_model()`` or a
      module-level ``model``. **Importing model.py runs the user's own code.** A ``*.pt``/
      ``*.pth`` state_dict beside it (or ``weights=``) is loaded with
      ``torch.load(weights_only=True)``, strictly unless ``strict=False``. ``INPUT_SHAPE`` in
      model.py is reported by :func:`input_shapes`.
    - a ``torch.export`` archive (``*.pt2``): ``torch.export.load(...).module()``.
    - a TorchScript archive: ``torch.jit.load``.
    - a whole pickled module (``torch.save(model)``): only with ``trust_pickle=True``, since
      unpickling can execute arbitrary code; otherwise a one-line refusal.

    Every problem is a :class:`layerdiff.errors.ModelFormatError` naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "model.py").is_file():
            p = p / "model.py"
        else:
            p = _pick_in_dir(p)
    if p.suffix == ".py":
        module = _import_model_py(p)
        model = _build_from(p, module)
        wfile = Path(weights) if weights is not None else _sibling_weights(p.parent)
        if wfile is not None:
            load_state_dict_file(model, wfile, strict=strict, trust_pickle=trust_pickle,
                                 source=f"the model from {p.name}")
        shapes = _declared_shapes(module)
        if shapes is not None:
            _remember(model, shapes)
        return model
    model = _load_archive(p, trust_pickle)
    if weights is not None:
        load_state_dict_file(model, weights, strict=strict, trust_pickle=trust_pickle,
                             source=f"the model in {p.name}")
    return model


# ----------------------------------------------------------------------------------------------
# input shapes


def _remember(model: nn.Module, shapes: Any) -> None:
    try:
        _DECLARED[model] = shapes
    except TypeError:
        pass


def _graph_input_shapes(gm: nn.Module) -> dict[str, tuple] | None:
    graph = getattr(gm, "graph", None)
    if graph is None:
        return None
    out: dict[str, tuple] = {}
    for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims = tuple(d if isinstance(d, int) else -1 for d in val.shape)  # -1: dynamic
        out["input" if i == 0 else f"input{i}"] = dims
    return out or None


def _normalise(shapes: Any) -> dict[str, tuple] | None:
    if shapes is None:
        return None
    if isinstance(shapes, dict):
        return {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}
    seq = list(shapes)
    if seq and all(isinstance(d, int) for d in seq):
        return {"input": tuple(seq)}
    return {("input" if i == 0 else f"input{i}"): tuple(int(d) for d in s)
            for i, s in enumerate(seq)}


def input_shapes(module_or_path: nn.Module | str | Path) -> dict[str, tuple] | None:
    """Input shapes the model declares, by input name (``input``, ``input1``, ...), or None.

    From model.py ``INPUT_SHAPE``/``INPUT_SHAPES``, a module attribute ``input_shape``/
    ``input_shapes`` (or the upper-case names), or a ``.pt2``'s example inputs (-1 marks a
    dynamic dimension). A path to model.py is imported, which runs its code.
    """
    try:
        if isinstance(module_or_path, nn.Module):
            declared = _DECLARED.get(module_or_path)
            if declared is None:
                for attr in ("input_shapes", "input_shape", "INPUT_SHAPES", "INPUT_SHAPE"):
                    if getattr(module_or_path, attr, None) is not None:
                        declared = getattr(module_or_path, attr)
                        break
            if declared is None and isinstance(module_or_path, torch.fx.GraphModule):
                return _graph_input_shapes(module_or_path)
            return _normalise(declared)
        p = Path(module_or_path)
        if p.is_dir() and (p / "model.py").is_file():
            p = p / "model.py"
        elif p.is_dir():
            p = _pick_in_dir(p)
        if p.suffix == ".py":
            return _normalise(_declared_shapes(_import_model_py(p)))
        if _archive_kind(p) == "pt2":
            return _graph_input_shapes(torch.export.load(p).module())
        return None
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{module_or_path}: declared input shape is not a tuple of ints "
                               f"({_first_line(e)})") from None

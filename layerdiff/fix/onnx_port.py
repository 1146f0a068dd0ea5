"""``--fix-out`` for an ONNX candidate: a copy of the file with every proven patch applied.

The ONNX probes give each finding its patch as data (``data["onnx_patch"]``: the initializers
whose new values are in ``patch_arrays``, the attributes per node). The writer loads the user's
file without its external data, replaces those initializers (``numpy_helper``, in the
initializer's own dtype and shape) and attributes (``onnx.helper.make_attribute``), saves
``DIR/<name>.onnx`` next to copies of the external-data files it still refers to, and runs
``onnx.checker`` on it. The user's file is only read. Nothing printed is executed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from layerdiff.diagnose.finding import Finding
from layerdiff.errors import LayerdiffError
from layerdiff.fix.apply import AppliedFix

#: what an ONNX --fix-out writes into DIR besides the model and its external data
OURS = ("FIXES.md",)


def onnx_file(candidate: Path) -> Path:
    """The candidate's .onnx file (a folder holds exactly one, as the loader insists)."""
    if candidate.is_file():
        return candidate
    files = sorted(candidate.glob("*.onnx"))
    if len(files) != 1:
        raise LayerdiffError(f"{candidate}: --fix-out needs exactly one .onnx file here, found "
                             f"{len(files)}")
    return files[0]


class OnnxPorts:
    """ONNX candidates: copy, patch initializers and attributes, save, check."""

    @staticmethod
    def check(cand: Path, out: Path, force: bool) -> None:
        from layerdiff.fix.folder import check_out_dir

        try:
            import onnx  # noqa: F401
        except ImportError:
            raise LayerdiffError("--fix-out on an ONNX candidate needs the onnx package: "
                                 "pip install layerdiff[onnx]") from None
        src = onnx_file(cand)
        if cand.is_dir():
            check_out_dir(out, cand, force)
            return
        # A file's folder may hold DIR (the file is only read), but DIR may not be that folder:
        # DIR/<name>.onnx would be the candidate itself.
        if out.exists() and not out.is_dir():
            raise LayerdiffError(f"--fix-out {out}: is a file; give a new or empty directory")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise LayerdiffError(f"--fix-out {out}: directory is not empty; choose a new or "
                                 "empty one, or pass --force")
        folder, target = src.parent.resolve(), out.resolve()
        if target == folder or target in folder.parents:
            raise LayerdiffError(f"--fix-out {out}: overlaps the candidate folder {folder}; the "
                                 "candidate is never written, choose a directory outside it")

    @staticmethod
    def accepts(f: Finding) -> bool:
        """Only the ONNX probes' patches (a torch patch has no meaning for the file)."""
        return bool(f.data.get("onnx_patch"))

    @staticmethod
    def target(cand: Path, out: Path) -> Path:
        """The repaired file, what is compared again."""
        return out / onnx_file(cand).name

    @staticmethod
    def write(cand: Path, out: Path, findings: list[Finding], opts: Any,
              force: bool) -> list[AppliedFix]:
        import onnx

        src = onnx_file(cand)
        model = onnx.load(str(src), load_external_data=False)
        applied = [apply_onnx_patch(model, f) for f in findings]
        out.mkdir(parents=True, exist_ok=True)
        for rel in external_files(model):
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.parent / rel, dst)
        dst = out / src.name
        onnx.save(model, str(dst))
        try:
            onnx.checker.check_model(str(dst))
        except onnx.checker.ValidationError as e:
            raise LayerdiffError(f"--fix-out: the patched {dst} fails onnx.checker: "
                                 f"{str(e).splitlines()[0]}") from None
        return applied


def external_files(model: Any) -> list[str]:
    """The external-data files (relative paths) the model's tensors still refer to."""
    from onnx import TensorProto

    seen: dict[str, None] = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    seen[e.value] = None
    return list(seen)


def apply_onnx_patch(model: Any, f: Finding) -> AppliedFix:
    """Apply ``f``'s ONNX patch to ``model`` in place. Initializer changes count as weight-level,
    attribute changes as code-level (the graph's settings); equal values as no change."""
    from onnx import helper, numpy_helper

    spec = f.data["onnx_patch"]
    done = AppliedFix(f)
    inits = {t.name: t for t in model.graph.initializer}
    for name in spec.get("initializers", []):
        line = f"initializer {name!r} = arrays[{name!r}]"
        t = inits.get(name)
        if t is None or name not in f.patch_arrays:
            raise LayerdiffError(f"the fix for {f.kind} does not apply to the candidate file: "
                                 f"no initializer {name!r}")
        dims = tuple(t.dims)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        new = np.asarray(f.patch_arrays[name])
        if new.size != int(np.prod(dims, dtype=np.int64)):
            raise LayerdiffError(f"the fix for {f.kind}: new value for initializer {name!r} has "
                                 f"{new.size} elements, the file's has shape {list(dims)}")
        new = np.ascontiguousarray(new.reshape(dims).astype(dtype))
        old = None if t.data_location == t.EXTERNAL else numpy_helper.to_array(t)
        if old is not None and np.array_equal(old, new):
            done.noop_lines.append(line)
            continue
        t.CopyFrom(numpy_helper.from_array(new, name))
        done.weight_lines.append(line)
    nodes = {n.name: n for n in model.graph.node}
    for node, attrs in spec.get("attributes", {}).items():
        n = nodes.get(node)
        if n is None:
            raise LayerdiffError(f"the fix for {f.kind} does not apply to the candidate file: "
                                 f"no node {node!r}")
        have = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for key, value in attrs.items():
            line = f"node {node!r} attribute {key} = " + \
                (f"{value:.7g}" if isinstance(value, float) else repr(value))
            new = helper.make_attribute(key, value)
            if key in have and helper.get_attribute_value(new) == have[key]:
                done.noop_lines.append(line)
                continue
            keep = [a for a in n.attribute if a.name != key]
            del n.attribute[:]
            n.attribute.extend(keep + [new])
            done.code_lines.append(line)
    return done

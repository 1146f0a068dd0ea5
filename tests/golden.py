"""Loading the golden traces of ``../shared/golden`` and checking the engine against them.

See ``../shared/golden/README.md`` for the layout. Two checks per golden:

- teacher forcing: each layer is fed the *recorded* values of its bottoms, so the error measures
  that layer alone (tolerance ``1e-5 * max(1, max|ref|)``, the README's recommendation);
- end to end: the whole net runs from the input and every layer is compared (error grows with
  depth; callers pass the bound).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from layerdiff.caffe import load_caffe
from layerdiff.caffe.net import CaffeNet
from layerdiff.caffe.weights import RawBlob
from layerdiff.engine import make_plan, run_caffe

SHARED = Path(os.environ.get("LAYERDIFF_SHARED", Path(__file__).resolve().parents[1].parent
                             / "shared"))
GOLDEN = SHARED / "golden"
CORPUS = SHARED / "corpus"
FLT_MAX = np.float32(3.4028235e38)
UNIT_TOL = 1e-5


def require_shared() -> None:
    """Skip when ../shared is absent; under CI its absence is a failure."""
    if not GOLDEN.is_dir():
        msg = f"shared data not found at {SHARED} (set LAYERDIFF_SHARED)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " and CI=true: the test data must be present in CI")
        pytest.skip(msg)


def golden_dirs(kind: str) -> list[Path]:
    root = GOLDEN / kind
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


def golden_ids(kind: str) -> list[str]:
    return [p.name for p in golden_dirs(kind)] or ["<no shared data>"]


@lru_cache(maxsize=1)
def _make_caffemodel():
    spec = importlib.util.spec_from_file_location("make_caffemodel", GOLDEN / "make_caffemodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Golden:
    path: Path
    meta: dict
    trace: np.lib.npyio.NpzFile
    feeds: dict[str, np.ndarray]
    net: CaffeNet

    @property
    def sampled(self) -> bool:
        return self.meta.get("trace") == "sampled"

    def key(self, rec: dict, top: str) -> str:
        return f"{rec['index']:04d}|{rec['name']}|{top}"

    def value_before(self, blob: str, index: int) -> np.ndarray:
        """The recorded value of runtime blob ``blob`` as layer ``index`` saw it (full traces)."""
        for rec in reversed(self.meta["layers"][:index]):
            if blob in rec["tops"]:
                return self.trace[self.key(rec, blob)]
        raise KeyError(blob)


def load_golden(path: str | Path) -> Golden:
    require_shared()
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    trace = np.load(path / "trace.npz")
    first = next(iter(meta["inputs"]))
    if (path / "inputs.npz").exists():
        feeds = dict(np.load(path / "inputs.npz"))
    else:
        feeds = {first: np.load(path / "input.npy")}
    w = meta["weights"]
    if w["kind"] == "real":
        net = load_caffe(prototxt=path / "deploy.prototxt", weights=path / w["file"])
    else:
        net = load_caffe(prototxt=path / "deploy.prototxt")
        blobs = _make_caffemodel().build(path)[0]
        for lay in net.layers:
            if lay.name in blobs:
                lay.blobs = [RawBlob(np.asarray(a, np.float32).ravel(), tuple(np.shape(a)), False)
                             for a in blobs[lay.name]]
    return Golden(path, meta, trace, feeds, net)


def compare(got: np.ndarray, ref: np.ndarray, tol: float, where: str) -> float:
    """Assert ``got`` matches ``ref`` per the README rules; return the relative error."""
    got = np.asarray(got)
    assert got.shape == ref.shape, f"{where}: shape {got.shape} != golden {ref.shape}"
    special = np.isnan(ref) | (ref == -FLT_MAX) | (ref == FLT_MAX)
    if special.any():
        same = (np.isnan(got) & np.isnan(ref)) | (got == ref)
        assert same[special].all(), f"{where}: NaN/FLT_MAX elements differ from Caffe's"
    g, r = got[~special].astype(np.float64), ref[~special].astype(np.float64)
    if r.size == 0:
        return 0.0
    assert np.isfinite(g).all(), f"{where}: non-finite values where Caffe has finite ones"
    scale = max(1.0, float(np.abs(r).max()))
    err = float(np.abs(g - r).max()) / scale
    assert err <= tol, f"{where}: max|err|/max(1,|ref|) = {err:.3g} > {tol:g}"
    return err


def compare_sampled(got: np.ndarray, g: Golden, key: str, tol: float, where: str) -> float:
    shape = tuple(g.trace[key + "|shape"])
    assert got.shape == shape, f"{where}: shape {got.shape} != golden {shape}"
    idx, val = g.trace[key + "|idx"], g.trace[key + "|val"]
    err = compare(np.asarray(got).reshape(-1)[idx], val, tol, where)
    stats = g.trace[key + "|stats"]
    flat = np.asarray(got, np.float64).reshape(-1)
    if flat.size:
        scale = max(1.0, float(np.abs(flat).max()))
        assert abs(flat.min() - stats[3]) <= tol * scale, f"{where}: min differs"
        assert abs(flat.max() - stats[4]) <= tol * scale, f"{where}: max differs"
    return err


def layer_records(g: Golden):
    """(meta record, its top index, golden key) for each checked output, splits skipped."""
    for rec in g.meta["layers"]:
        if rec.get("auto_split") or rec["type"] == "Input":
            continue
        for k, top in enumerate(rec["tops"]):
            yield rec, k, g.key(rec, top)


def check_teacher_forced(g: Golden, tol: float = UNIT_TOL) -> dict[str, float]:
    """Run each layer alone on its recorded bottoms; returns {key: relative error}."""
    assert not g.sampled, "teacher forcing needs a full trace"
    plan = make_plan(g.net, {k: tuple(v.shape) for k, v in g.feeds.items()})
    by_name = {p.layer.name: p for p in plan.layers}
    errs: dict[str, float] = {}
    for rec in g.meta["layers"]:
        if rec.get("auto_split") or rec["type"] == "Input" or not rec["tops"]:
            continue
        p = by_name[rec["name"]]
        bottoms = [g.value_before(b, rec["index"]) for b in rec["bottoms"]]
        for b in bottoms:
            b.flags.writeable = False
        outs = p.impl.forward(bottoms, p.blobs or [])
        for k, top in enumerate(rec["tops"]):
            key = g.key(rec, top)
            errs[key] = compare(outs[k], g.trace[key], tol, f"{g.path.name} {key}")
    return errs


def check_end_to_end(g: Golden, tol: float, dtype: str = "float32") -> dict[str, float]:
    """Run the whole net from the recorded input; compare every recorded layer output."""
    trace = run_caffe(g.net, g.feeds, dtype=dtype)
    errs: dict[str, float] = {}
    for rec, k, key in layer_records(g):
        ours = trace[rec["name"]].outputs[k]
        where = f"{g.path.name} {key}"
        assert ours.dtype == np.dtype(dtype), f"{where}: computed in {ours.dtype}, not {dtype}"
        if g.sampled:
            errs[key] = compare_sampled(ours, g, key, tol, where)
        else:
            errs[key] = compare(ours, g.trace[key], tol, where)
    return errs

"""Loading the golden traces of ``../shared/golden`` and checking the engine against them.

See ``../shared/golden/README.md`` for the layout. Two checks per golden:

- teacher forcing: each layer is fed the *recorded* values of its bottoms, so the error measures
  that layer alone (tolerance ``1e-5 * max(1, max|ref|)``, the README's recommendation);
- end to end: the whole net runs from the input and every layer is compared (error grows with
  depth; callers pass the bound, optionally widened to K x Caffe's own float32 noise, measured
  against our float64 run: :func:`check_end_to_end_with_noise`).
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


def golden_dirs(kind: str, trace: str | None = None) -> list[Path]:
    """The goldens of ``kind``; with ``trace`` ("full"/"sampled") only those traces."""
    root = GOLDEN / kind
    if not root.is_dir():
        return []
    dirs = sorted(p for p in root.iterdir() if (p / "meta.json").is_file())
    if trace is not None:
        dirs = [p for p in dirs if json.loads((p / "meta.json").read_text())["trace"] == trace]
    return dirs


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


def _finite_part(got: np.ndarray, ref: np.ndarray, where: str) -> np.ndarray:
    """Assert NaN/FLT_MAX elements equal Caffe's; return the mask of the other elements."""
    assert got.shape == ref.shape, f"{where}: shape {got.shape} != golden {ref.shape}"
    special = np.isnan(ref) | (ref == -FLT_MAX) | (ref == FLT_MAX)
    if special.any():
        same = (np.isnan(got) & np.isnan(ref)) | (got == ref)
        assert same[special].all(), f"{where}: NaN/FLT_MAX elements differ from Caffe's"
    return ~special


def compare(got: np.ndarray, ref: np.ndarray, tol: float, where: str) -> float:
    """Assert ``got`` matches ``ref`` per the README rules; return the relative error."""
    return compare_with_noise(got, ref, None, tol, 0.0, where).err


@dataclass(frozen=True)
class LayerError:
    """One output's error against the golden, scaled by ``max(1, max|golden|)``.

    ``noise`` is the golden's own distance from our float64 run (Caffe's float32 rounding);
    ``bound`` is what ``err`` was held to.
    """

    err: float
    noise: float
    bound: float


def compare_with_noise(got: np.ndarray, ref: np.ndarray, ours64: np.ndarray | None, tol: float,
                       k: float, where: str) -> LayerError:
    """Assert ``max|got - ref| <= max(tol, k * max|ref - ours64|)``, all scaled by max(1,|ref|).

    Without ``ours64`` the bound is ``tol`` alone.
    """
    got, ref = np.asarray(got), np.asarray(ref)
    keep = _finite_part(got, ref, where)
    g, r = got[keep].astype(np.float64), ref[keep].astype(np.float64)
    if r.size == 0:
        return LayerError(0.0, 0.0, tol)
    assert np.isfinite(g).all(), f"{where}: non-finite values where Caffe has finite ones"
    scale = max(1.0, float(np.abs(r).max()))
    err = float(np.abs(g - r).max()) / scale
    noise = 0.0
    if ours64 is not None:
        noise = float(np.abs(np.asarray(ours64, np.float64).reshape(ref.shape)[keep] - r).max())
        noise /= scale
    bound = max(tol, k * noise)
    assert err <= bound, (f"{where}: max|err|/max(1,|ref|) = {err:.3g} > {bound:.3g} "
                          f"(max of {tol:g} and {k:g} x Caffe's own noise {noise:.3g})")
    return LayerError(err, noise, bound)


def compare_sampled(got: np.ndarray, g: Golden, key: str, tol: float, where: str) -> float:
    return compare_sampled_with_noise(got, None, g, key, tol, 0.0, where).err


def compare_sampled_with_noise(got: np.ndarray, ours64: np.ndarray | None, g: Golden, key: str,
                               tol: float, k: float, where: str) -> LayerError:
    """A sampled golden: the stored indices, then the whole tensor's min and max.

    The noise is measured on the same elements: the sampled ones, and the whole-tensor min and
    max. The min and max may each move by as much as any element, so their noise is also at
    least the sampled elements' noise.
    """
    shape = tuple(g.trace[key + "|shape"])
    assert got.shape == shape, f"{where}: shape {got.shape} != golden {shape}"
    idx, val = g.trace[key + "|idx"], g.trace[key + "|val"]
    on_idx = None if ours64 is None else np.asarray(ours64).reshape(-1)[idx]
    res = compare_with_noise(np.asarray(got).reshape(-1)[idx], val, on_idx, tol, k, where)
    stats = g.trace[key + "|stats"]
    flat = np.asarray(got, np.float64).reshape(-1)
    if flat.size:
        scale = max(1.0, abs(float(stats[3])), abs(float(stats[4])))
        sampled_scale = max(1.0, float(np.abs(val.astype(np.float64)).max(initial=0.0)))
        flat64 = None if ours64 is None else np.asarray(ours64, np.float64).reshape(-1)
        for what, pick, ref in (("min", np.min, stats[3]), ("max", np.max, stats[4])):
            noise = 0.0
            if flat64 is not None:
                noise = max(abs(float(pick(flat64)) - ref), res.noise * sampled_scale)
            bound = max(tol * scale, k * noise)
            diff = abs(float(pick(flat)) - ref)
            assert diff <= bound, f"{where}: {what} differs by {diff:.3g} > {bound:.3g}"
    return res


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


def float64_run(g: Golden) -> dict:
    """Our engine on the golden's net and input in float64: the reference Caffe's float32
    rounding is measured against (costs about 3x a float32 run; callers cache it per net)."""
    return run_caffe(g.net, g.feeds, dtype="float64")


def recorded_keys(g: Golden) -> set[str]:
    """Every trace key a layer-by-layer check must compare: all but Input and auto Splits."""
    skipped = {g.key(rec, top) for rec in g.meta["layers"]
               if rec.get("auto_split") or rec["type"] == "Input" for top in rec["tops"]}
    keys = {k.rsplit("|", 1)[0] if g.sampled else k for k in g.trace.files}
    return keys - skipped


def check_end_to_end(g: Golden, tol: float, dtype: str = "float32") -> dict[str, float]:
    """Run the whole net from the recorded input; compare every recorded layer output."""
    return {key: e.err for key, e in check_end_to_end_with_noise(g, tol, 0.0, None, dtype).items()}


def check_end_to_end_with_noise(g: Golden, tol: float, k: float, trace64: dict | None,
                                dtype: str = "float32") -> dict[str, LayerError]:
    """Whole net from the recorded input; per output ``err <= max(tol, k * Caffe's noise)``.

    ``trace64`` is :func:`float64_run` of the same golden (None: the bound is ``tol`` alone).
    """
    trace = run_caffe(g.net, g.feeds, dtype=dtype)
    errs: dict[str, LayerError] = {}
    for rec, k_top, key in layer_records(g):
        ours = trace[rec["name"]].outputs[k_top]
        ours64 = None if trace64 is None else trace64[rec["name"]].outputs[k_top]
        where = f"{g.path.name} {key}"
        assert ours.dtype == np.dtype(dtype), f"{where}: computed in {ours.dtype}, not {dtype}"
        if g.sampled:
            errs[key] = compare_sampled_with_noise(ours, ours64, g, key, tol, k, where)
        else:
            errs[key] = compare_with_noise(ours, g.trace[key], ours64, tol, k, where)
    return errs

"""``compare``: run both sides on the same input, align, measure, decide, find the first divergence.

This is the verdict alone; the face (``layerdiff.api``: the CLI and ``layerdiff.compare``) runs
the diagnosis after it.

First divergence: the first aligned pair, in reference order, that fails end to end while every
aligned pair feeding it passes. Where the error entered is told by the pair's local error (its
candidate group re-run on the reference's own inputs), measured only for failing pairs: failing
locally means in the pair itself; passing locally means between its passing inputs and it, on
the unaligned records ``align.path.between`` finds. A pair that fails only locally is no
divergence (a port that permutes to NHWC and keeps HWC weights is right end to end).

Tolerance per aligned pair: ``max|ref - cand| <= atol + rtol * max|ref| + noise_factor * noise``
where ``noise`` is the reference's own float32 rounding at that layer, measured against a float64
run of the reference (when the reference can be re-run). A fixed tolerance cannot serve every
input: on a constant input, near-constant channels make BatchNorm divide by tiny variances and
float32 noise grows a thousandfold; the float64 reference measures that instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from layerdiff.align import Alignment, MapFile, Pair, align, load_mapfile
from layerdiff.align.path import between
from layerdiff.coverage import Coverage, coverage
from layerdiff.errors import InputSpecError, LayerdiffError
from layerdiff.inputs import make_inputs, parse_specs
from layerdiff.metrics import Metrics, measure
from layerdiff.rerun import reference_inputs, rerun_group
from layerdiff.trace import Record, Trace

DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-4
NOISE_FACTOR = 10.0


@dataclass
class PairResult:
    position: int
    pair: Pair
    metrics: Metrics
    atol: float
    rtol: float
    noise: float | None
    passed: bool
    #: every aligned pair producing this pair's inputs passed (or they are model inputs)
    inputs_pass: bool = True
    #: the candidate re-run on the reference's own inputs (measured for failing pairs)
    local: Metrics | None = None

    @property
    def local_passed(self) -> bool | None:
        """Whether this layer is right on its own (None when it could not be re-run)."""
        return None if self.local is None else self.local.passes(self.tolerance)

    @property
    def amplification(self) -> float | None:
        """Candidate error over the reference's own float32 noise at this layer."""
        if self.noise is None or math.isnan(self.metrics.max_abs):
            return None
        return self.metrics.max_abs / self.noise if self.noise > 0 else (
            0.0 if self.metrics.max_abs == 0 else math.inf)

    @property
    def status(self) -> str:
        """``ok``, ``noise`` (passes only thanks to the measured noise floor), or ``fail``."""
        if not self.passed:
            return "fail"
        plain = self.atol + self.rtol * self.metrics.ref_max_abs
        return "noise" if self.metrics.max_abs > plain else "ok"

    @property
    def tolerance(self) -> float:
        noise = NOISE_FACTOR * self.noise if self.noise else 0.0
        return self.atol + self.rtol * self.metrics.ref_max_abs + noise

    def row(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "position": self.position, "reference": self.pair.ref_name,
            "candidate": self.pair.cand_name, "ref_kind": self.pair.ref[-1].kind,
            "cand_kind": self.pair.cand[-1].kind, "match": self.pair.method,
            "note": self.pair.note, "ref_shape": "x".join(map(str, m.ref_shape)),
            "cand_shape": "x".join(map(str, m.cand_shape)), "max_abs": m.max_abs,
            "mean_abs": m.mean_abs, "max_rel": m.max_rel, "rmse": m.rmse, "cosine": m.cosine,
            "snr_db": m.snr_db, "nan_mismatch": m.nan_mismatch, "inf_mismatch": m.inf_mismatch,
            "worst_index": "" if m.worst_index is None else ",".join(map(str, m.worst_index)),
            "ref_max_abs": m.ref_max_abs, "noise_floor": self.noise,
            "amplification": self.amplification, "tolerance": self.tolerance,
            "local_max_abs": self.local.max_abs if self.local is not None else None,
            "local_passed": self.local_passed, "status": self.status, "passed": self.passed,
        }


@dataclass
class Entry:
    """Where the error entered the first divergence."""

    #: True: in the pair itself; False: between its passing inputs and it; None: cannot tell
    #: (the pair could not be re-run alone and unaligned records lie on the way to it)
    inside: bool | None
    #: unaligned records on the path from the passing pairs feeding it, per side
    ref: list[Record] = field(default_factory=list)
    cand: list[Record] = field(default_factory=list)

    def text(self) -> str:
        path = self.path()
        if self.inside:
            return "error entered in the pair itself"
        if self.inside is False:
            return "error entered between its passing inputs and it" + (
                f", through {path}" if path else "")
        return (f"error entered in the pair itself or between its passing inputs and it, "
                f"through {path} (the pair could not be re-run alone to tell)")

    def path(self) -> str:
        parts = []
        for side, recs in (("candidate ops", self.cand), ("reference layers", self.ref)):
            if recs:
                names = ", ".join(r.name for r in recs[:6]) + (", ..." if len(recs) > 6 else "")
                parts.append(f"{side}: {names}")
        return "; ".join(parts)


@dataclass
class Report:
    """The outcome of a comparison: truthy when every aligned pair passes and every weighted
    reference layer is compared."""

    results: list[PairResult]
    alignment: Alignment
    reference: Trace
    candidate: Trace
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stopped_early: bool = False
    #: diagnosis findings, most telling first (filled by the face, see layerdiff.api)
    findings: list[Any] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)
    #: findings the diagnosis tried and rejected, one line each (shown under --explain)
    ruled_out: list[Any] = field(default_factory=list)
    #: how compare() was called (sources and keyword options), so the port can be re-compared
    call: dict[str, Any] = field(default_factory=dict, repr=False)
    #: what ``fix`` did (a layerdiff.fix.FixOutcome), when it ran
    fixes: Any = None
    #: set by the face (layerdiff.api): writes the repaired port; the verdict never imports it
    fixer: ClassVar[Callable[..., Any] | None] = None

    def __bool__(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results) and \
            self.coverage.complete

    @property
    def failures(self) -> list[PairResult]:
        return [r for r in self.results if not r.passed]

    @property
    def first_divergence(self) -> PairResult | None:
        """The first pair, in reference order, failing end to end while every aligned pair
        feeding it passes."""
        return next((r for r in self.results if not r.passed and r.inputs_pass), None)

    @property
    def entry(self) -> Entry | None:
        """Where the error entered the first divergence (None without one)."""
        fd = self.first_divergence
        if fd is None:
            return None
        way = between(self.alignment, self.reference, self.candidate, fd.pair)
        inside = fd.local_passed is False if fd.local is not None else (None if way else True)
        return Entry(inside, way.ref, way.cand)

    @property
    def worst(self) -> PairResult | None:
        scored = [r for r in self.results if not math.isnan(r.metrics.max_abs)]
        if not scored:
            return self.failures[0] if self.failures else None
        return max(scored, key=lambda r: r.metrics.scaled_error())

    def fix(self, out_dir: str | Path, force: bool = False) -> Report:
        """Write the candidate with every proven fix applied to ``out_dir`` and compare it
        again; returns that new Report (see layerdiff.fix)."""
        if Report.fixer is None:
            raise LayerdiffError("report.fix needs the layerdiff package face: import layerdiff")
        return Report.fixer(self, out_dir, force=force).after

    def to_frame(self):
        """One row per aligned pair (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([r.row() for r in self.results])

    def __str__(self) -> str:
        if self:
            return f"PASS: {len(self.results)} aligned layers agree"
        fd = self.first_divergence
        parts = [f"{len(self.failures)} of {len(self.results)} layers differ"]
        if fd is not None:
            parts.append(f"first divergence at {fd.pair.ref_name} <-> {fd.pair.cand_name} "
                         f"({self.entry.text()})")
        if not self.coverage.complete:
            parts.append(self.coverage.failure())
        return "FAIL: " + "; ".join(parts)


def compare(
    reference: Any,
    candidate: Any,
    input: str | list[str] | dict[str, np.ndarray] | None = None,  # noqa: A002 - the CLI's name
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    map: str | Path | MapFile | None = None,  # noqa: A002
    noise_floor: bool = True,
    fail_fast: bool = False,
    ref_options: Any = None,
    cand_options: Any = None,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> Report:
    """Compare two models (or saved traces) layer by layer: the verdict, without diagnosis.

    ``reference``/``candidate``: a path (Caffe model dir or prototxt, torch model, trace
    ``.npz``), a :class:`Trace`, a :class:`CaffeNet` or a ``torch.nn.Module``. ``input``: specs
    like ``"ones:0.5"`` (shapes from the reference) or ``{name: array}``.
    """
    from layerdiff.sources import ModelOptions

    call = {"reference": reference, "candidate": candidate, "input": input, "atol": atol,
            "rtol": rtol, "map": map, "noise_floor": noise_floor, "fail_fast": fail_fast,
            "ref_options": ref_options, "cand_options": cand_options}
    ropts = ref_options or ModelOptions()
    copts = cand_options or ModelOptions()
    mf = map if isinstance(map, MapFile) or map is None else load_mapfile(map)
    notes: list[str] = []

    feeds = {k: np.asarray(v) for k, v in input.items()} if isinstance(input, dict) else None
    specs = parse_specs(input if not isinstance(input, dict) else None)
    if any(s.channel_symmetric for s in specs.values()) and feeds is None:
        notes.append("constant input: every channel sees the same values, so a BGR/RGB channel "
                     "swap cannot show up; use a random input to rule it out")

    def step(side: str):
        return (lambda i, n, name: progress(side, i, n, name)) if progress else None

    if isinstance(reference, (str, Path)) and not _is_saved_trace(reference):
        from layerdiff.sources import detect_framework, load_caffe_model

        if detect_framework(reference) == "caffe":  # parsed once for both reference runs
            reference = load_caffe_model(reference, ropts)
    ref_trace = _trace(reference, specs, ropts, feeds, step("reference"))
    feeds = feeds or dict(ref_trace.inputs)
    cand_trace = _trace(candidate, specs, copts, candidate_inputs(feeds, candidate, copts),
                        step("candidate"))
    noise_of: dict[str, float] | None = None
    if noise_floor and not isinstance(reference, Trace) and ropts.dtype == "float32" and \
            not _is_saved_trace(reference) and not _is_onnx(reference):
        from dataclasses import replace

        stream = str(Path(ropts.stream_dir) / "float64") if ropts.stream_dir else None
        floor_trace = _trace(reference, specs, replace(ropts, dtype="float64", stream_dir=stream),
                             feeds, step("float64 reference"))
        # One number per record is all that is kept: the float64 trace is as big as the
        # reference itself.
        noise_of = _noise_by_record(ref_trace, floor_trace)
        del floor_trace

    alignment = align(ref_trace, cand_trace, mf)
    notes.extend(alignment.warnings)
    results: list[PairResult] = []
    stopped = False
    pair_of: dict[int, int] = {}
    for pos, pair in enumerate(alignment.pairs):
        for r in pair.ref:
            pair_of[r.index] = pos
        m = measure(pair.ref_output, pair.cand_output)
        tol = mf.tolerance_for(pair.ref[-1].name) if mf else {}
        noise = noise_of.get(pair.ref[-1].name) if noise_of is not None else None
        res = PairResult(pos, pair, m, tol.get("atol", atol), tol.get("rtol", rtol), noise, False)
        res.passed = m.passes(res.tolerance)
        res.inputs_pass = _inputs_pass(pair, ref_trace, pair_of, results)
        results.append(res)
        if fail_fast and not res.passed and res.inputs_pass:
            stopped = True
            break
    if not alignment.pairs:
        raise LayerdiffError("no layer of the candidate could be aligned with the reference; "
                             "write a map file (layerdiff align REF CAND --write-map map.toml)")
    opts = {"atol": atol, "rtol": rtol,
            "noise_factor": NOISE_FACTOR if noise_of is not None else None,
            "input": input if isinstance(input, (str, list)) else "arrays"}
    for res in results:
        if not res.passed:  # a passing pair needs no local error: nothing entered there
            res.local = local_error(res.pair, ref_trace)
    cover = coverage(alignment, ref_trace, cand_trace)
    notes.extend(cover.notes())
    return Report(results, alignment, ref_trace, cand_trace, opts, notes, stopped,
                  coverage=cover, call=call)


def local_error(pair: Pair, ref: Trace) -> Metrics | None:
    """The pair's candidate group re-run on the reference's own inputs, against the reference
    (None when it cannot be re-run)."""
    inputs = reference_inputs(ref, pair.ref)
    out = None if inputs is None else rerun_group(pair.cand, inputs)
    return None if out is None else measure(pair.ref_output, out)


def _is_saved_trace(x: Any) -> bool:
    return isinstance(x, (str, Path)) and Path(x).suffix == ".npz"


def _is_onnx(x: Any) -> bool:
    """An ONNX model runs in its graph's own types: it has no float64 run to measure noise."""
    if not isinstance(x, (str, Path)):
        return False
    from layerdiff.sources import detect_framework

    return detect_framework(x) == "onnx"


def _trace(model: Any, specs, opts, feeds, progress) -> Trace:
    from layerdiff.sources import trace_model

    if isinstance(model, Trace):
        return model
    if isinstance(model, (str, Path)):
        return trace_model(model, specs, opts, progress=progress, inputs=feeds)
    from layerdiff.caffe import CaffeNet

    if isinstance(model, CaffeNet):
        from layerdiff.adapters.caffe import capture_caffe

        feeds = feeds or make_inputs(specs, model.inputs)
        return capture_caffe(model, feeds, dtype=opts.dtype, stream_dir=opts.stream_dir,
                             progress=progress)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        from layerdiff.adapters.torch import capture_torch

        if feeds is None:
            raise InputSpecError("a torch module as reference needs input arrays: pass "
                                 "input={name: array}")
        return capture_torch(model, feeds, device=opts.device, dtype=opts.dtype,
                             keep_train_mode=opts.keep_train_mode)
    raise LayerdiffError(f"cannot compare a {type(model).__name__}: pass a path, Trace, "
                         "CaffeNet or torch.nn.Module")


def candidate_inputs(feeds, candidate, opts) -> dict[str, np.ndarray] | None:
    """The candidate gets the reference's input arrays, by position when names differ."""
    if isinstance(candidate, Trace) or _is_saved_trace(candidate):
        return None  # a saved trace brings its own inputs
    if feeds is None:
        return None
    from layerdiff.caffe import CaffeNet

    names = None
    if isinstance(candidate, CaffeNet):
        names = list(candidate.inputs)
    elif isinstance(candidate, (str, Path)):
        from layerdiff.sources import detect_framework

        if detect_framework(candidate) == "caffe":
            from layerdiff.caffe import find_model_files, load_caffe

            # Only the input names are needed: read the prototxt, not the weights.
            proto = opts.prototxt or find_model_files(candidate)[0]
            names = list(load_caffe(prototxt=proto, shape=opts.shape).inputs)
        # an ONNX candidate pairs the arrays itself (sources.trace_onnx): no second model load
    if names is None:
        return feeds
    if set(names) == set(feeds):  # same names: pair by name, whatever the order
        return {n: feeds[n] for n in names}
    return dict(zip(names, feeds.values(), strict=False))


def _noise_by_record(lo: Trace, hi: Trace) -> dict[str, float]:
    """max |float32 - float64| of each reference record's first output."""
    out: dict[str, float] = {}
    for rec in lo:
        if rec.name not in hi or not rec.outputs:
            continue
        a, b = rec.outputs[0], hi[rec.name].outputs[0]
        if np.shape(a) != np.shape(b):
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        d = d[np.isfinite(d)]
        out[rec.name] = float(d.max()) if d.size else 0.0
    return out


def _inputs_pass(pair: Pair, ref: Trace, pair_of: dict[int, int],
                 results: list[PairResult]) -> bool:
    """Whether the aligned pairs that produced this pair's inputs all passed."""
    first = pair.ref[0]
    seen: set[int] = set()
    todo = [(b, first.index) for b in first.bottoms]
    while todo:
        blob, before = todo.pop()
        producer = next((r for r in reversed(ref.records[:before]) if blob in r.tops), None)
        if producer is None or producer.index in seen:
            continue  # a model input
        seen.add(producer.index)
        pos = pair_of.get(producer.index)
        if pos is not None and pos < len(results):
            if not results[pos].passed:
                return False
        else:  # not aligned (a Split, an unmatched layer): look through it
            todo.extend((b, producer.index) for b in producer.bottoms)
    return True

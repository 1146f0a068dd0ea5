"""What a probe gets: one aligned pair, the values around it, and a way to re-run it.

Records' ``handle`` objects (a :class:`layerdiff.engine.runner.CaffeCall`, a torch
``TorchCall``) share one protocol: ``handle.run(*inputs) -> list[np.ndarray]`` re-runs that one
layer on other inputs. Torch handles also expose ``handle.fn`` (the module) so a probe can
re-run a modified copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from layerdiff.metrics import Metrics, measure
from layerdiff.trace import Record, Trace

if TYPE_CHECKING:
    from layerdiff.comparator import PairResult, Report


@dataclass
class LayerCase:
    """One aligned pair under diagnosis."""

    result: PairResult
    report: Report
    #: the reference's own inputs to this group (values of the first record's bottoms)
    ref_inputs: list[np.ndarray]
    #: the candidate group re-run on ``ref_inputs`` (None when it cannot be re-run)
    local_output: np.ndarray | None = None
    local_metrics: Metrics | None = None
    notes: list[str] = field(default_factory=list)

    # -- convenient views -------------------------------------------------------------------
    @property
    def pair(self):
        return self.result.pair

    @property
    def name(self) -> str:
        return f"{self.pair.ref_name} <-> {self.pair.cand_name}"

    @property
    def ref_output(self) -> np.ndarray:
        return np.asarray(self.pair.ref_output)

    @property
    def cand_output(self) -> np.ndarray:
        return np.asarray(self.pair.cand_output)

    @property
    def ref_records(self) -> list[Record]:
        return self.pair.ref

    @property
    def cand_records(self) -> list[Record]:
        return self.pair.cand

    @property
    def ref_trace(self) -> Trace:
        return self.report.reference

    @property
    def cand_trace(self) -> Trace:
        return self.report.candidate

    def caffe_layers(self) -> list[Any]:
        """The reference group's CaffeLayer objects (empty when the reference is not Caffe)."""
        return [r.handle.layer for r in self.ref_records
                if r.handle is not None and hasattr(r.handle, "layer")]

    def cand_modules(self) -> list[Any]:
        """The candidate group's torch modules (None for functional ops)."""
        out = []
        for c in self.cand_records:
            fn = getattr(c.handle, "fn", None)
            out.append(fn if fn is not None and hasattr(fn, "state_dict") else None)
        return out

    @property
    def tolerance(self) -> float:
        return self.result.tolerance

    @property
    def error(self) -> float:
        """The error to explain: local when known (this layer alone), else propagated."""
        m = self.local_metrics or self.result.metrics
        return m.max_abs

    # -- re-running -------------------------------------------------------------------------
    def rerun(self, inputs: list[np.ndarray] | None = None,
              replace: dict[int, Any] | None = None) -> np.ndarray | None:
        """Run the candidate group on ``inputs`` (default: the reference's inputs).

        ``replace`` maps a position in the candidate group to a callable used instead of that
        record (e.g. a modified copy of its module). Returns the group's final output, or None
        when some record cannot be re-run.
        """
        xs = list(self.ref_inputs if inputs is None else inputs)
        out = None
        for k, rec in enumerate(self.cand_records):
            fn = (replace or {}).get(k)
            try:
                if fn is not None:
                    out = _call(fn, xs, rec)
                elif rec.handle is not None and hasattr(rec.handle, "run"):
                    n = _arity(rec)
                    out = rec.handle.run(*xs[:n])[0] if k == 0 else rec.handle.run(xs[0])[0]
                else:
                    return None
            except Exception:  # noqa: BLE001 - a probe's counterfactual may not run: no finding
                return None
            xs = [np.asarray(out)]
        return None if out is None else np.asarray(out)

    def improvement(self, new_output: np.ndarray | None) -> tuple[float, float, float] | None:
        """(error before, error after, fraction explained) of a re-run output vs the reference."""
        if new_output is None:
            return None
        before = self.error
        m = measure(self.ref_output, new_output)
        if not m.shape_match:
            return None
        after = m.max_abs
        if np.isnan(before):  # the layer had the wrong shape: a fix that restores it explains
            return before, after, 1.0 if after <= self.tolerance else 0.0
        frac = 1.0 - after / before if before > 0 else 0.0
        return before, after, max(0.0, min(1.0, frac))


def _arity(rec: Record) -> int:
    tops = getattr(rec.handle, "input_tops", None)
    if tops is not None:
        return max(1, len(tops))
    return max(1, len(rec.bottoms))


def _call(fn: Any, xs: list[np.ndarray], rec: Record) -> np.ndarray:
    """Call a replacement: a torch module gets torch tensors, anything else numpy arrays."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(fn, torch.nn.Module):
        param = next(iter(fn.parameters()), None)
        if param is None:
            param = next(iter(fn.buffers()), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            out = fn(*[torch.as_tensor(np.asarray(x)).to(device, dtype) for x in xs])
        return out.detach().float().cpu().numpy()
    return np.asarray(fn(*xs))

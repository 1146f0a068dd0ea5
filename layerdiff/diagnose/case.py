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

from layerdiff.metrics import Metrics
from layerdiff.rerun import rerun_group
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
        return rerun_group(self.cand_records, self.ref_inputs if inputs is None else inputs,
                           replace)

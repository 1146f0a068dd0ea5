"""Re-running the candidate's path into a pair: the counterfactual for ops that have no twin.

When a pair fails end to end while the aligned pairs feeding it pass (and the pair itself is
right on the reference's inputs), the error entered on the way: through candidate records with
no twin (an extra ReLU, ``x * 255``, ``amax`` where Caffe averages) or reference layers the port
skipped (a missing ReLU). :func:`path_case` collects those records with
:func:`layerdiff.align.path.between`; :meth:`PathCase.rerun` runs the candidate's path again
from the feeders' recorded outputs, with one record swapped or one value altered, then the
pair's own candidate group, so ``check_fix(pc.case, out)`` judges the fix against the pair's
end-to-end error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from layerdiff.align.kinds import families
from layerdiff.align.path import Between, between
from layerdiff.diagnose.case import LayerCase
from layerdiff.trace import Record

Op = Callable[..., np.ndarray]

#: record families that only change values elementwise (an activation)
ACTIVATIONS = ("relu", "prelu", "elu", "sigmoid", "tanh", "swish", "clip", "abs")


def identity(*xs: np.ndarray) -> np.ndarray:
    """A removed op: its first input passes through."""
    return np.asarray(xs[0])


@dataclass
class PathCase:
    """A pair that fails end to end with unaligned records between it and its feeders."""

    #: the pair, measured end to end (no local error): ``check_fix`` judges against that
    case: LayerCase
    path: Between
    notes: list[str] = field(default_factory=list)

    @property
    def cand_ops(self) -> list[Record]:
        return self.path.cand

    @property
    def ref_ops(self) -> list[Record]:
        return self.path.ref

    def entry_tops(self) -> list[str]:
        """Candidate values that flow into the path (or straight into the group) from outside
        it: the feeders' outputs and model inputs, in first-use order."""
        made = {t for r in self.cand_ops for t in r.tops}
        out: list[str] = []
        for rec in [*self.cand_ops, self.case.cand_records[0]]:
            for t in _input_tops(rec):
                if t not in made and t not in out:
                    out.append(t)
        return out

    def rerun(self, swap: dict[int, Op] | None = None,
              alter: dict[str, Op] | None = None) -> np.ndarray | None:
        """The pair's candidate output when the path runs again with ``swap`` (record index ->
        what runs instead, on that record's input values) and ``alter`` (top -> a function
        applied to that value where it is made or read). None when something cannot re-run."""
        swap, alter = swap or {}, alter or {}
        trace = self.case.cand_trace
        values: dict[str, np.ndarray] = {}

        def value(top: str, before: int) -> np.ndarray | None:
            if top not in values:
                v = trace.value_before(top, before)
                if v is None:
                    return None
                values[top] = alter[top](v) if top in alter else np.asarray(v)
            return values[top]

        try:
            for rec in self.cand_ops:
                ins = [value(t, rec.index) for t in _input_tops(rec)]
                if any(v is None for v in ins):
                    return None
                if rec.index in swap:
                    out = swap[rec.index](*ins)
                elif rec.handle is not None and hasattr(rec.handle, "run"):
                    out = rec.handle.run(*ins)[0]
                else:
                    return None
                out = np.asarray(out)
                values[rec.tops[0]] = alter[rec.tops[0]](out) if rec.tops[0] in alter else out
            first = self.case.cand_records[0]
            ins = [value(t, first.index) for t in _input_tops(first)]
        except Exception:  # noqa: BLE001 - a counterfactual that cannot run is no finding
            return None
        if not ins or any(v is None for v in ins):
            return None
        return self.case.rerun(inputs=ins)


def path_case(case: LayerCase) -> PathCase | None:
    """The pair as a :class:`PathCase`, when it fails end to end, its aligned feeders pass,
    it is not wrong on its own, and unaligned records lie on its path; else None."""
    res, report = case.result, case.report
    if res.passed or not res.inputs_pass or res.local_passed is False:
        return None
    alignment = getattr(report, "alignment", None)
    if alignment is None or not any(p is case.pair for p in alignment.pairs):
        return None
    path = between(alignment, report.reference, report.candidate, case.pair)
    if not path:
        return None
    return PathCase(LayerCase(res, report, []), path)


def of_family(rec: Record, names: tuple[str, ...]) -> bool:
    return bool(families(rec.kind) & set(names))


def _input_tops(rec: Record) -> list[str]:
    """The tops a record reads, in the order its handle takes them (duplicates kept)."""
    tops = getattr(rec.handle, "input_tops", None)
    return list(tops) if tops is not None else list(rec.bottoms)


def made_by(case: LayerCase, rec: Record) -> str:
    """Name of the candidate record that made ``rec``'s first input (or that input's name)."""
    tops = _input_tops(rec)
    if not tops:
        return "?"
    prod = next((r for r in reversed(case.cand_trace.records[:rec.index]) if tops[0] in r.tops),
                None)
    return prod.name if prod is not None else tops[0]


def op_text(rec: Record) -> str:
    """How a candidate record reads in a finding: name and kind."""
    return rec.name if rec.name == rec.kind else f"{rec.name} ({rec.kind})"

"""What ``--fix-out`` did, and one comparison summed up in three numbers (before/after)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from layerdiff.comparator import Report
from layerdiff.diagnose.finding import Finding
from layerdiff.fix.apply import AppliedFix


@dataclass
class Summary:
    """One comparison in three numbers: where it first diverges, how many layers agree, and the
    error at the output (the last aligned pair)."""

    passed: bool
    first_divergence: str
    agreeing: int
    layers: int
    output_error: float
    #: output elements NaN/Inf on one side only (the max error covers the finite ones)
    output_nonfinite: int = 0

    def cells(self) -> tuple[str, str, str]:
        err = "nan" if math.isnan(self.output_error) else f"{self.output_error:.3g}"
        if self.output_nonfinite:
            err += f" (+{self.output_nonfinite} NaN/Inf on one side)"
        return (self.first_divergence, f"{self.agreeing}/{self.layers}", err)


def summarise(report: Report) -> Summary:
    fd = report.first_divergence
    where = f"{fd.pair.ref_name} <-> {fd.pair.cand_name}" if fd else "none"
    if fd is None and not report:
        where = "none (inherited error only)"
    last = report.results[-1].metrics if report.results else None
    return Summary(bool(report), where, sum(r.passed for r in report.results),
                   len(report.results), math.nan if last is None else last.max_abs,
                   0 if last is None else int(last.nan_mismatch + last.inf_mismatch))


@dataclass
class FixOutcome:
    """What ``--fix-out`` did: the fixes applied, those left to the user, and both reports."""

    out_dir: Path
    before: Report
    after: Report
    applied: list[AppliedFix] = field(default_factory=list)
    manual: list[Finding] = field(default_factory=list)
    #: how many times DIR was written and compared (see fix_port)
    rounds: int = 0
    #: the candidate's framework: what DIR holds (torch: model.py + weights.pt; onnx: the file)
    framework: str = "torch"

    @property
    def written(self) -> bool:
        return bool(self.applied)

    @property
    def passed(self) -> bool:
        return bool(self.after)

    def summaries(self) -> tuple[Summary, Summary]:
        return summarise(self.before), summarise(self.after)

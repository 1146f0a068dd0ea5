"""Diagnosis: say why two layers disagree, prove it with numbers, give the fix.

``diagnose(report)`` runs after the comparison:
1. local error: every aligned candidate group is re-run on the reference's own inputs, so a
   layer's own mistake is told apart from error it inherited (``PairResult.local``);
2. probes (``probes/``): at each pair that fails locally (or, without local errors, at the
   first divergence), counterfactual re-runs name the fix that removes the error;
3. model-wide probes (weight audit, train mode, TF32/reduced precision).
Findings are ranked by how much of the error they explain, then stored on the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import all_probes
from layerdiff.metrics import measure

if TYPE_CHECKING:
    from layerdiff.comparator import Report

__all__ = ["Finding", "LayerCase", "diagnose", "layer_cases"]


def layer_cases(report: Report) -> list[LayerCase]:
    """One LayerCase per aligned pair, with its local (re-run) output when possible."""
    cases = []
    ref = report.reference
    for res in report.results:
        first = res.pair.ref[0]
        inputs = [ref.value_before(b, first.index) for b in first.bottoms]
        case = LayerCase(res, report, [np.asarray(x) for x in inputs if x is not None])
        if len(case.ref_inputs) == len(first.bottoms) and case.ref_inputs:
            case.local_output = case.rerun()
        if case.local_output is not None:
            case.local_metrics = measure(case.ref_output, case.local_output)
            res.local = case.local_metrics
        cases.append(case)
    return cases


def diagnose(report: Report, max_layers: int = 8) -> list[Finding]:
    """Fill ``report.findings`` (and each result's local error); returns the findings."""
    cases = layer_cases(report)
    probes = all_probes()
    findings: list[Finding] = []
    for p in probes:
        if p.model_wide:
            findings.extend(_as_list(_safe(p, report)))
    targets = [c for c in cases if c.result.local_passed is False]
    if not targets:
        fd = report.first_divergence
        targets = [c for c in cases if c.result is fd]
    for case in targets[:max_layers]:
        here: list[Finding] = []
        for p in probes:
            if not p.model_wide:
                here.extend(_as_list(_safe(p, case)))
        for f in here:
            f.layer = f.layer or case.name
        findings.extend(sorted(here, key=lambda f: -f.score))
    report.findings = findings
    return findings


def _safe(p, arg):
    try:
        return p.fn(arg)
    except Exception as e:  # noqa: BLE001 - one broken probe must not hide the others
        return Finding("probe_error", "", f"probe {p.name} failed: {type(e).__name__}: {e}",
                       "", "", probe=p.name)


def _as_list(x) -> list[Finding]:
    if x is None:
        return []
    for f in [x] if isinstance(x, Finding) else x:
        f.probe = f.probe or ""
    return [x] if isinstance(x, Finding) else list(x)

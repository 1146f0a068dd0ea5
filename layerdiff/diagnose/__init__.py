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
            if res.local_passed:  # only failing layers are probed: keep their arrays alone
                case.local_output = None
                case.ref_inputs = []
        cases.append(case)
    return cases


def diagnose(report: Report, max_layers: int = 8) -> list[Finding]:
    """Fill ``report.findings`` (and each result's local error); returns the findings."""
    cases = layer_cases(report)
    probes = all_probes()
    findings: list[Finding] = []
    for p in probes:
        if p.model_wide:
            findings.extend(_as_list(_safe(p, report), p.name))
    # A pair that is right end to end but wrong re-run alone was fed differently than the
    # candidate feeds it (an unaligned op in between): not a place to probe.
    targets = [c for c in cases if c.result.local_passed is False and not c.result.passed]
    if not targets:
        fd = report.first_divergence
        targets = [c for c in cases if c.result is fd]
    # The first pair failing end to end whose feeders pass, when it is right on its own: the
    # error entered between them; the probes for ops with no twin re-run the path into it.
    entered = next((c for c in cases if not c.result.passed and c.result.inputs_pass), None)
    if entered is None or entered.result.local_passed is False or entered in targets:
        entered = None
    else:
        targets.insert(0, entered)  # probed even past max_layers local failures
    for case in targets[:max_layers]:
        for p in probes:
            if not p.model_wide and (p.between or case is not entered):
                for f in _as_list(_safe(p, case), p.name):
                    f.layer = f.layer or case.name
                    findings.append(f)
    wide = {p.name for p in probes if p.model_wide}
    report.findings = _rank(findings, cases, wide)
    return report.findings


def _rank(findings: list[Finding], cases: list[LayerCase], wide: set[str]) -> list[Finding]:
    """Order by layer depth, then fixes that reach tolerance, then the layer's own probe over a
    model-wide one, then how much they explain.

    The same cause at the same layer found by two probes (a weight audit and a re-run) is
    reported once, by the one ranked first.
    """
    where: dict[str, tuple[int, float]] = {}
    for c in cases:
        key = (c.result.position, c.tolerance)
        for name in (c.name, c.pair.ref_name, c.pair.cand_name,
                     *(r.name for r in c.pair.ref), *(r.name for r in c.pair.cand)):
            where.setdefault(name, key)

    def locate(f: Finding) -> tuple[int, float]:
        for name in (f.layer, f.layer.split(" <-> ")[0], *f.layer.split("+")):
            if name in where:
                return where[name]
        return (1 << 30, 0.0)  # model-wide: after the layers

    def key(f: Finding):
        pos, tol = locate(f)
        reaches = f.error_after is not None and f.error_after <= tol
        return (pos, not reaches, f.probe in wide,
                -(f.explained if f.explained is not None else -1.0))

    best: dict[tuple[int, str], Finding] = {}
    rest: list[Finding] = []
    for f in sorted(findings, key=key):
        pos = locate(f)[0]
        if pos < 1 << 30 and (pos, f.kind) in best:
            winner = best[(pos, f.kind)]
            more = f.data.get("layers") or []
            if len(more) > 1 and "layers" not in winner.data:  # e.g. the audit saw it everywhere
                winner.data["layers"] = more
                winner.evidence = (f"{winner.evidence.rstrip('. ')}. The {f.probe or 'probe'} "
                                   f"finds the same cause in {len(more) - 1} more layer(s).")
            continue
        best[(pos, f.kind)] = f
        rest.append(f)
    return rest


def _safe(p, arg):
    try:
        return p.fn(arg)
    except Exception as e:  # noqa: BLE001 - one broken probe must not hide the others
        return Finding("probe_error", "", f"probe {p.name} failed: {type(e).__name__}: {e}",
                       "", "", probe=p.name)


def _as_list(x, name: str) -> list[Finding]:
    if x is None:
        return []
    out = [x] if isinstance(x, Finding) else list(x)
    for f in out:
        f.probe = f.probe or name
    return out

"""Diagnosis: say why two layers disagree, prove it with numbers, give the fix.

``diagnose(report)`` runs after the verdict (the face, ``layerdiff.api``, calls it):
1. probes (``probes/``) at the pairs that fail end to end and on their own (local error,
   measured by the verdict): counterfactual re-runs name the fix that removes the error;
2. model-wide probes (weight audit, train mode, inline preprocessing, ...).

One acceptance rule (:func:`accepted`): a finding is shown only when its counterfactual re-run
removes at least 90% of the pair's error and ends within the pair's tolerance (plus the
rounding slack of a reduced-precision candidate), the rule ``check_fix`` applies inside the
probes. Labels are exempt because they propose no change to the port: ``precision`` ("rounding,
not a bug"), ``model_train_mode`` (the model arrived in train mode; it was compared in eval())
and ``input_channel_order_undecidable`` (a constant input cannot tell BGR from RGB). A
model-wide finding that names no aligned pair has no tolerance to meet, so only a label may be
one; so may a weight the audit proves rearranged when the input cannot test the
fix (a constant input hides a BGR/RGB swap). Rejected findings become ``report.ruled_out``
(shown under ``--explain``). A passing port gets no finding but labels. A probe that raises is
logged (``logging``, debug) and is never a finding.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.patch import merge_patch
from layerdiff.diagnose.probes import all_probes
from layerdiff.diagnose.probes.counterfactual import MIN_EXPLAINED, fix_tolerance
from layerdiff.rerun import reference_inputs

if TYPE_CHECKING:
    from layerdiff.comparator import Report

__all__ = ["Finding", "LayerCase", "accepted", "diagnose", "layer_cases"]

log = logging.getLogger(__name__)

#: findings that name a cause but propose no fix of the port's numbers
LABELS = frozenset({"precision", "model_train_mode", "input_channel_order_undecidable"})


def layer_cases(report: Report, probed: set[int] | None = None) -> list[LayerCase]:
    """One LayerCase per aligned pair. Pairs in ``probed`` (positions; default: those that
    fail end to end) get the reference's inputs and their local re-run output."""
    cases = []
    for res in report.results:
        case = LayerCase(res, report, [])
        case.local_metrics = res.local
        wanted = not res.passed if probed is None else res.position in probed
        if wanted:
            case.ref_inputs = reference_inputs(report.reference, res.pair.ref) or []
            if case.ref_inputs:
                case.local_output = case.rerun()
        cases.append(case)
    return cases


def diagnose(report: Report, max_layers: int = 8) -> list[Finding]:
    """Fill ``report.findings`` and ``report.ruled_out``; returns the findings."""
    probes = all_probes()
    fd = report.first_divergence
    # Pairs that fail end to end and on their own (the first divergence also when it cannot
    # be re-run alone). A pair right end to end (even if wrong re-run alone: it was fed
    # differently than the candidate feeds it) is no place to probe, nor one right on its own
    # (the error entered before it: the model-wide probes look there).
    targets = [r for r in report.results if not r.passed and (
        r.local_passed is False or (r is fd and r.local is None))][:max_layers]
    # The first divergence when it is right on its own: the error entered between its passing
    # feeders and it; only the probes for ops with no twin (``between``) re-run that path.
    entered = fd if fd is not None and fd.local_passed is True else None
    if entered is not None:
        targets.insert(0, entered)  # probed even past max_layers local failures
    cases = layer_cases(report, {r.position for r in targets})
    findings: list[Finding] = []
    for p in probes:
        if p.model_wide and (not report or p.name in _label_probes(report)):
            findings.extend(_as_list(_safe(p, report), p.name))
    for res in targets:
        case = cases[res.position]
        for p in probes:
            if not p.model_wide and (p.between or res is not entered):
                for f in _as_list(_safe(p, case), p.name):
                    f.layer = f.layer or case.name
                    findings.append(f)
    where = _where(cases)
    kept, ruled_out = [], []
    for f in findings:
        case = _locate(f, where)
        reason = accepted(f, case, bool(report))
        if reason:
            f.data["ruled_out"] = reason
            ruled_out.append(f)
        else:
            kept.append(f)
    wide = {p.name for p in probes if p.model_wide}
    report.findings = _rank(kept, where, wide)
    report.ruled_out = ruled_out
    return report.findings


def _label_probes(report: Report) -> set[str]:
    """The model-wide probes a passing port still gets: their findings are labels. The
    weight audit only on a constant input, which cannot show a BGR/RGB swap the weights do."""
    names = {"train_mode"}
    if any(n.startswith("constant input") for n in report.notes):
        names.add("weight_audit")
    return names


def accepted(f: Finding, case: LayerCase | None, passing: bool = False) -> str:
    """"" when ``f`` may be shown, else why it is ruled out (one line)."""
    if f.kind in LABELS or f.data.get("label"):
        return ""
    if passing:
        return "the port passes: no fix is shown"
    if case is None:
        return "it names no compared pair, so its re-run has no tolerance to meet"
    if f.explained is None or f.error_after is None:
        return "no counterfactual re-run measured it"
    tol = fix_tolerance(case)
    if f.explained < MIN_EXPLAINED or not f.error_after <= tol:
        return (f"its re-run removes {f.explained:.1%} of the error ({_g(f.error_before)} -> "
                f"{_g(f.error_after)}, tolerance {tol:.3g}); a fix must remove "
                f"{MIN_EXPLAINED:.0%} and end within tolerance")
    return ""


def _g(x: float | None) -> str:
    return "?" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _where(cases: list[LayerCase]) -> dict[str, LayerCase]:
    """Every name a finding may use for a pair (pair, reference or candidate record)."""
    where: dict[str, LayerCase] = {}
    for c in cases:
        for name in (c.name, c.pair.ref_name, c.pair.cand_name,
                     *(r.name for r in c.pair.ref), *(r.name for r in c.pair.cand)):
            where.setdefault(name, c)
    return where


def _locate(f: Finding, where: dict[str, LayerCase]) -> LayerCase | None:
    if not f.layer:
        return None
    for name in (f.layer, f.layer.split(" <-> ")[0], *f.layer.split("+")):
        if name in where:
            return where[name]
    return None


def _rank(findings: list[Finding], where: dict[str, LayerCase],
          wide: set[str]) -> list[Finding]:
    """Order by layer depth, then fixes that reach tolerance, then the layer's own probe over a
    model-wide one, then how much they explain.

    The same cause at the same layer found by two probes (a weight audit and a re-run) is
    reported once, by the one ranked first.
    """
    def locate(f: Finding) -> tuple[int, float]:
        case = _locate(f, where)
        return (1 << 30, 0.0) if case is None else (case.result.position, case.tolerance)

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
            merge_patch(winner, f)
            if len(more) > 1 and "layers" not in winner.data:  # e.g. the audit saw it everywhere
                winner.data["layers"] = more
                winner.evidence = (f"{winner.evidence.rstrip('. ')}. The {f.probe or 'probe'} "
                                   f"finds the same cause in {len(more) - 1} more layer(s).")
            continue
        best[(pos, f.kind)] = f
        rest.append(f)
    return rest


def _safe(p, arg) -> object:
    """A probe's result; a probe that raises found nothing (logged, never shown)."""
    try:
        return p.fn(arg)
    except Exception:  # noqa: BLE001 - one broken probe must not hide the others
        log.debug("probe %s raised", p.name, exc_info=True)
        return None


def _as_list(x, name: str) -> list[Finding]:
    if x is None:
        return []
    out = [x] if isinstance(x, Finding) else list(x)
    for f in out:
        f.probe = f.probe or name
    return out

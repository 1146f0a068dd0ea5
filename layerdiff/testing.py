"""Regression tests for a port: one assertion that says where and why it broke.

.. code-block:: python

    from layerdiff.testing import assert_ports_agree

    def test_port_matches_caffe():
        assert_ports_agree("models/caffe/", "models/torch_port/", input="randn:0")

On a divergence the :class:`AssertionError` names the first diverging layer pair, its numbers
and the diagnosis findings (cause, evidence, fix), so a failing CI log is enough to act on.
"""

from __future__ import annotations

from typing import Any

from layerdiff.api import compare
from layerdiff.comparator import Report


def assert_ports_agree(reference: Any, candidate: Any, input: Any = None,  # noqa: A002
                       *, max_findings: int = 5, **options: Any) -> Report:
    """Compare ``reference`` and ``candidate`` layer by layer; raise when they disagree.

    ``reference``/``candidate``/``input`` and ``options`` (``atol``, ``rtol``, ``map``,
    ``noise_floor``, ``ref_options``, ``cand_options``, ...) are those of
    :func:`layerdiff.compare`. Returns the passing :class:`~layerdiff.comparator.Report`.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this one
    report = compare(reference, candidate, input, **options)
    if not report:
        raise AssertionError(failure_message(report, max_findings))
    return report


def failure_message(report: Report, max_findings: int = 5) -> str:
    """Plain text: the verdict, the first divergence, the findings (most telling first)."""
    from layerdiff.report import describe

    n, bad = len(report.results), len(report.failures)
    lines = [f"ports disagree: {bad} of {n} aligned layers differ"]
    fd = report.first_divergence
    if fd is not None:
        lines.append(f"first divergence: {fd.pair.ref_name} <-> {fd.pair.cand_name} "
                     f"(#{fd.position}, {report.entry.text()}: {describe(fd)})")
    if not report.coverage.complete:
        lines.append(report.coverage.failure())
    worst = report.worst
    if worst is not None and worst is not fd and not worst.passed:
        lines.append(f"worst layer: {worst.pair.ref_name} <-> {worst.pair.cand_name} "
                     f"({describe(worst)})")
    findings = report.findings[:max_findings]
    if findings:
        lines.append("findings:")
    for f in findings:
        where = f" at {f.layer}" if f.layer else ""
        lines.append(f"- {f.kind}{where}: {f.cause}")
        if f.evidence:
            lines.append(f"  evidence: {f.evidence}")
        if f.fix:
            lines.append(f"  fix: {f.fix}")
        if f.explained is not None:
            lines.append(f"  explains {f.explained:.0%} of the error")
    if len(report.findings) > max_findings:
        lines.append(f"  ... and {len(report.findings) - max_findings} more findings")
    if not report.findings:
        lines.append("no diagnosis finding explains it; run `layerdiff compare` for the table")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


__all__ = ["assert_ports_agree", "failure_message"]

"""``--fix-out DIR``: write the candidate with every proven fix applied, and prove it passes.

1. copy the candidate into DIR (the user's folder is only read);
2. torch ``model.py`` ports: load the candidate fresh and run each finding's patch
   (``Finding.patch``, set by the probes whose counterfactual proved it); tensor-only statements
   go into DIR/weights.pt, the others into DIR/model.py, which builds the original model and
   patches it in place. ONNX files (``layerdiff.fix.onnx_port``): each finding's patch as data
   (``data["onnx_patch"]``: initializers, node attributes) is applied to a copy of the file with
   the ``onnx`` API, saved as DIR/<name>.onnx and checked with ``onnx.checker``;
3. compare the reference with DIR again; 4. DIR/FIXES.md says what changed and what it did.

Findings without a patch (an op inside forward, a precision choice, a torch patch on an ONNX
candidate) are listed as manual.
This package sits above the comparator and the diagnosis and imports them, never the reverse.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from layerdiff.comparator import Report, compare
from layerdiff.diagnose import diagnose
from layerdiff.diagnose.finding import Finding
from layerdiff.errors import LayerdiffError
from layerdiff.fix.apply import AppliedFix, apply_patches, patchable
from layerdiff.fix.notes import fixes_markdown
from layerdiff.fix.outcome import FixOutcome, Summary

__all__ = ["AppliedFix", "FixOutcome", "Summary", "check_fixable", "fix_port"]


def check_fixable(candidate: Any, out_dir: str | Path, force: bool = False) -> None:
    """Refuse, before any comparison runs, what ``--fix-out`` cannot do (one line each)."""
    if not isinstance(candidate, (str, Path)):
        raise LayerdiffError("--fix-out needs the candidate as a path (a torch port folder "
                             f"with model.py or an .onnx file), not a "
                             f"{type(candidate).__name__}")
    from layerdiff.sources import detect_framework

    cand = Path(candidate)
    framework = detect_framework(cand)
    if framework == "trace":
        raise LayerdiffError(f"{cand}: nothing to patch in a trace (it holds recorded values, "
                             "not the model)")
    if framework not in _PORT_WRITERS:
        raise LayerdiffError(f"{cand}: --fix-out cannot repair {framework} candidates (it "
                             "repairs torch ports written as model.py and ONNX files)")
    _PORT_WRITERS[framework].check(cand, Path(out_dir), force)


def fix_port(report: Report, out_dir: str | Path, *, force: bool = False,
             progress: Any = None) -> FixOutcome:
    """Repair ``report``'s candidate into ``out_dir`` and compare it again (see module doc).

    The diagnosis probes the first failing layers only: when the repaired port still fails
    and its comparison proves fixes for layers further on (the same eps mistake in every
    BatchNorm), they join the others and DIR is written again, up to ``MAX_ROUNDS`` times.
    Nothing is written when no finding has a patch: the outcome's ``after`` is ``report``.
    """
    call = dict(report.call)
    if not call:
        raise LayerdiffError("this report was not made by layerdiff.compare: nothing to re-run")
    out = Path(out_dir)
    check_fixable(call["candidate"], out, force)
    cand = Path(call["candidate"])
    from layerdiff.sources import ModelOptions, detect_framework

    framework = detect_framework(cand)
    writer = _PORT_WRITERS[framework]
    auto, manual = _patchable(writer, report.findings)
    outcome = FixOutcome(out, report, report, manual=manual, framework=framework)
    if auto:
        copts = call.get("cand_options") or ModelOptions()
        target = writer.target(cand, out) if hasattr(writer, "target") else out
        call.update(candidate=str(target), progress=progress,
                    cand_options=replace(copts, prototxt=None, weights=None))
        for rounds in range(1, MAX_ROUNDS + 1):
            # every round rebuilds DIR from the user's candidate: patches set absolute values
            outcome.applied = writer.write(cand, out, auto, copts, force or rounds > 1)
            outcome.after, outcome.rounds = _compare_and_diagnose(call), rounds
            more, still_manual = _patchable(writer, auto + outcome.after.findings)
            outcome.manual = _union(manual, still_manual)
            if outcome.after or len(more) == len(auto):
                break
            auto = more
        (out / "FIXES.md").write_text(fixes_markdown(outcome))
    report.fixes = outcome
    return outcome


def _patchable(writer: Any, findings: list[Finding]) -> tuple[list[Finding], list[Finding]]:
    """``patchable``, less the patches this writer cannot apply (they join the manual ones)."""
    auto, manual = patchable(findings)
    if not hasattr(writer, "accepts"):
        return auto, manual
    return [f for f in auto if writer.accepts(f)], \
        [f for f in auto if not writer.accepts(f)] + manual


def _compare_and_diagnose(call: dict[str, Any]) -> Report:
    report = compare(**call)
    diagnose(report)
    return report


#: repair rounds at most (each one compares again)
MAX_ROUNDS = 4


def _union(a: list[Finding], b: list[Finding]) -> list[Finding]:
    seen = {(f.kind, f.layer) for f in a}
    return a + [f for f in b if (f.kind, f.layer) not in seen]


class _TorchPorts:
    """model.py ports: load fresh, patch, write DIR (layerdiff.fix.folder)."""

    @staticmethod
    def check(cand: Path, out: Path, force: bool) -> None:
        from layerdiff.fix.folder import check_out_dir, model_py

        model_py(cand)
        check_out_dir(out, cand, force)

    @staticmethod
    def write(cand: Path, out: Path, findings: list[Finding], opts: Any,
              force: bool) -> list[AppliedFix]:
        from layerdiff.adapters.torch import load_torch
        from layerdiff.fix.folder import write_port

        model = load_torch(cand, trust_pickle=opts.trust_pickle, weights=opts.weights)
        applied = apply_patches(model, findings)
        write_port(out, cand, model, applied, force)
        return applied


def _onnx_writer() -> Any:
    from layerdiff.fix.onnx_port import OnnxPorts

    return OnnxPorts


#: one writer per candidate framework: a check/write pair (optional: ``target``, the path
#: compared again, DIR by default; ``accepts``, which findings' patches it can apply)
_PORT_WRITERS: dict[str, Any] = {"torch": _TorchPorts, "onnx": _onnx_writer()}

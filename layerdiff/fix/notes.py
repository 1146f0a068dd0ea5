"""Before/after in numbers, and DIR/FIXES.md."""

from __future__ import annotations

from layerdiff.fix.outcome import FixOutcome


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


#: (weight-level, code-level) statements: where they went
_WHERE = {"torch": ("statement(s) baked into weights.pt", "line(s) in model.py"),
          "onnx": ("initializer(s) replaced", "node attribute(s) set")}


def _layout(outcome: FixOutcome) -> str:
    if outcome.framework == "onnx":
        return ("The `.onnx` file here is a copy of the candidate (which is unchanged) with the "
                "initializers and node attributes below set through the `onnx` API; it passes "
                "`onnx.checker`.")
    return ("`model.py` builds the original port (`original/`, unchanged) and applies the "
            "code-level fixes; `weights.pt` holds all weights with the weight-level fixes.")


def fixes_markdown(outcome: FixOutcome) -> str:
    before, after = outcome.summaries()
    verdict = "passes" if after.passed else "still diverges"
    out = [
        "# Fixes applied by layerdiff",
        "",
        f"The repaired port {verdict}."
        + (f" It took {outcome.rounds} rounds: comparing the repaired port proved fixes for "
           "layers the first diagnosis did not reach." if outcome.rounds > 1 else ""),
        "",
        "| | first divergence | layers agreeing | max error at the output |",
        "| --- | --- | --- | --- |",
        "| before | {} | {} | {} |".format(*before.cells()),
        "| after | {} | {} | {} |".format(*after.cells()),
        "",
        _layout(outcome),
        "",
    ]
    where = _WHERE.get(outcome.framework, _WHERE["torch"])
    for i, a in enumerate(outcome.applied, 1):
        f = a.finding
        out += [f"## {i}. `{f.kind}`" + (f" at {f.layer}" if f.layer else ""), "",
                f"- cause: {f.cause}", f"- evidence: {f.evidence}",
                f"- the pair's error re-run with the fix: {_num(f.error_before)} -> "
                f"{_num(f.error_after)}",
                f"- applied as: {a.level} ("
                + (f"{len(a.weight_lines)} {where[0]}" if a.weight_lines else "")
                + ("; " if a.weight_lines and a.code_lines else "")
                + (f"{len(a.code_lines)} {where[1]}" if a.code_lines else "")
                + (f"{len(a.noop_lines)} statement(s) changed nothing" if a.level == "no change"
                   else "") + ")",
                "", "For your own conversion script:", "", "```python", f.fix, "```", ""]
    if outcome.manual:
        out += ["## Left to you (no safe automatic patch)", ""]
        out += [f"- `{f.kind}`" + (f" at {f.layer}" if f.layer else "") + f": {f.cause}. "
                f"Fix: `{f.fix}`" for f in outcome.manual]
        out.append("")
    return "\n".join(out)

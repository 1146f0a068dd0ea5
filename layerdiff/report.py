"""Render a comparison :class:`~layerdiff.comparator.Report`: rich table + summary, or files.

File outputs all come from ``Report.to_frame()``: CSV and JSON via pandas, Markdown written
here (pandas' own ``to_markdown`` needs an extra package).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from layerdiff.comparator import PairResult, Report
from layerdiff.errors import LayerdiffError


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def render(report: Report, console: Console, all_rows: bool = True) -> None:
    """The per-pair table (failures red, first divergence marked) and the summary panel."""
    fd = report.first_divergence
    table = Table(header_style="bold", title="layer by layer", title_justify="left")
    for col, just in (("#", "right"), ("reference", "left"), ("candidate", "left"),
                      ("match", "left"), ("shape", "left"), ("max abs", "right"),
                      ("mean abs", "right"), ("local", "right"), ("max rel", "right"),
                      ("cosine", "right"), ("SNR dB", "right"), ("tol", "right"), ("", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in report.results:
        m = r.metrics
        shape = "x".join(map(str, m.ref_shape))
        if m.ref_shape != m.cand_shape:
            shape += " vs " + "x".join(map(str, m.cand_shape))
        status = r.status if r.passed else ("FIRST DIVERGENCE" if r is fd else "FAIL")
        if not r.passed and r is not fd and r.local_passed:
            status = "inherited"  # wrong only because its inputs are
        style = None if r.passed else ("bold red" if r is fd else "red")
        local = _f(r.local.max_abs) if r.local is not None else "-"
        table.add_row(str(r.position), r.pair.ref_name, r.pair.cand_name, r.pair.method, shape,
                      _f(m.max_abs), _f(m.mean_abs), local, _f(m.max_rel), _f(m.cosine, 6),
                      _f(m.snr_db, 4), _f(r.tolerance), status, style=style)
    if all_rows:
        console.print(table)
    console.print(summary_panel(report))
    if report.findings:
        console.print(findings_panel(report))


def findings_panel(report: Report, limit: int = 10) -> Panel:
    """Each cause once (with the other layers it appears at): the evidence, the fix, and how
    much of the error the fix removes."""
    from layerdiff.diagnose.finding import group_findings

    blocks = [finding_text(f, others) for f, others in group_findings(report.findings)[:limit]]
    more = len(group_findings(report.findings)) - limit
    if more > 0:
        blocks.append(f"... and {more} more (--json for all)")
    return Panel("\n\n".join(blocks), title="findings", border_style="yellow")


def finding_text(f, others: list | None = None) -> str:
    head = f"[bold]{escape(f.kind)}[/]" + (f" at [bold]{escape(f.layer)}[/]" if f.layer else "")
    lines = [head, f"  cause: {escape(f.cause)}"]
    if f.evidence:
        lines.append(f"  evidence: {escape(f.evidence)}")
    if f.fix:
        lines.append(f"  fix: [green]{escape(f.fix)}[/]")
    if f.explained is not None:
        lines.append(f"  removes {f.explained:.1%} of the error "
                     f"({_f(f.error_before)} -> {_f(f.error_after)})")
    if others:
        names = ", ".join(o.layer for o in others[:4]) + (", ..." if len(others) > 4 else "")
        lines.append(f"  the same at {len(others)} more place(s): {escape(names)}")
    return "\n".join(lines)


def summary_panel(report: Report) -> Panel:
    fd, worst = report.first_divergence, report.worst
    lines = []
    n, bad = len(report.results), len(report.failures)
    verdict = "[bold green]PASS[/]" if report else (
        "[bold red]DIVERGENCE[/]" if bad else "[bold red]FAIL[/]")
    lines.append(f"{verdict}: {n - bad} of {n} aligned layers agree"
                 + (" (stopped at the first divergence)" if report.stopped_early else ""))
    if fd is not None:
        lines.append(f"first divergence: [bold]{escape(fd.pair.ref_name)}[/] <-> "
                     f"[bold]{escape(fd.pair.cand_name)}[/] ({escape(report.entry.text())})")
        lines.append(f"  {describe(fd)}")
    if not report.coverage.complete:
        lines.append(f"[bold red]{escape(report.coverage.failure())}[/]")
    if worst is not None and not worst.passed and worst is not fd:
        lines.append(f"worst layer: {worst.pair.ref_name} <-> {worst.pair.cand_name} "
                     f"({describe(worst)})")
    methods = ", ".join(f"{k} {v}" for k, v in report.alignment.methods().items())
    lines.append(f"aligned by: {methods}")
    for side, recs in (("reference", report.alignment.unaligned_ref),
                       ("candidate", report.alignment.unaligned_cand)):
        if recs:
            names = ", ".join(r.name for r in recs[:6]) + (", ..." if len(recs) > 6 else "")
            lines.append(f"unaligned {side} layers ({len(recs)}): {names}")
    for note in report.notes:
        lines.append(f"note: {note}")
    return Panel("\n".join(lines), title="summary", border_style="green" if report else "red")


def describe(r: PairResult) -> str:
    m = r.metrics
    if not m.shape_match:
        return (f"shape {list(m.ref_shape)} vs {list(m.cand_shape)}")
    parts = [f"max abs err {_f(m.max_abs)} > tol {_f(r.tolerance)}" if not r.passed
             else f"max abs err {_f(m.max_abs)}",
             f"max|ref| {_f(m.ref_max_abs)}", f"cosine {_f(m.cosine, 6)}"]
    if m.nan_mismatch or m.inf_mismatch:
        parts.append(f"NaN mismatches {m.nan_mismatch}, Inf mismatches {m.inf_mismatch}")
    if m.worst_index is not None:
        parts.append(f"worst at {list(m.worst_index)}")
    return ", ".join(parts)


def write_outputs(report: Report, csv: str | None = None, json_path: str | None = None,
                  markdown: str | None = None, force: bool = False) -> list[Path]:
    """Write the requested files; an existing file is refused unless ``force``."""
    targets = [(p, kind) for p, kind in ((csv, "csv"), (json_path, "json"), (markdown, "md"))
               if p]
    for p, _ in targets:
        if Path(p).exists() and not force:
            raise LayerdiffError(f"{p}: already exists; pass --force to overwrite it")
    if not targets:
        return []  # no table to build (pandas is slow to import)
    frame = report.to_frame()
    written = []
    for p, kind in targets:
        path = Path(p)
        if kind == "csv":
            frame.to_csv(path, index=False)
        elif kind == "json":
            fd = report.first_divergence
            doc = {"passed": bool(report),
                   "first_divergence": fd.row() if fd else None,
                   "error_entered": report.entry.text() if fd else None,
                   "not_ported": [r.name for r in report.coverage.not_ported],
                   "findings": [f.to_dict() for f in report.findings],
                   "unaligned_reference": [r.name for r in report.alignment.unaligned_ref],
                   "unaligned_candidate": [r.name for r in report.alignment.unaligned_cand],
                   "notes": report.notes,
                   "pairs": json.loads(frame.to_json(orient="records"))}
            path.write_text(json.dumps(doc, indent=1))
        else:
            path.write_text(to_markdown(frame))
        written.append(path)
    return written


def to_markdown(frame) -> str:
    cols = ["position", "reference", "candidate", "match", "ref_shape", "max_abs", "mean_abs",
            "cosine", "tolerance", "passed"]
    cols = [c for c in cols if c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame[cols].iterrows():
        cells = [_f(v) if isinstance(v, float) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def explain(report: Report, layer: str) -> Panel:
    """One layer's whole analysis: how it was paired, every metric, local vs propagated error,
    the noise floor, and every finding at it."""
    res = next((r for r in report.results
                if layer in (r.pair.ref_name, r.pair.cand_name)
                or layer in [x.name for x in r.pair.ref + r.pair.cand]), None)
    if res is None:
        names = ", ".join(r.pair.ref_name for r in report.results[:8])
        raise LayerdiffError(f"--explain {layer}: no aligned layer has that name (e.g. {names})")
    m, pair = res.metrics, res.pair
    lines = [
        f"[bold]{escape(pair.ref_name)}[/] ({', '.join(r.kind for r in pair.ref)}) <-> "
        f"[bold]{escape(pair.cand_name)}[/] ({', '.join(c.kind for c in pair.cand)})",
        f"paired by: {pair.method}" + (f" ({escape(pair.note)})" if pair.note else ""),
        f"verdict: {res.status}" + (f" - the first divergence ({escape(report.entry.text())})"
                                    if res is report.first_divergence else ""),
        f"shapes: reference {list(m.ref_shape)}, candidate {list(m.cand_shape)}",
        f"propagated: {describe(res)}, mean abs {_f(m.mean_abs)}, max rel {_f(m.max_rel)}, "
        f"RMSE {_f(m.rmse)}, SNR {_f(m.snr_db, 4)} dB",
        f"tolerance {_f(res.tolerance)} = atol {_f(res.atol)} + rtol {_f(res.rtol)} x max|ref| "
        + (f"+ noise term (float32 noise {_f(res.noise)}, error/noise "
           f"{_f(res.amplification)})" if res.noise is not None else "(no noise floor)"),
    ]
    if res.local is not None:
        lines.append(f"local (candidate re-run on the reference's inputs): max abs "
                     f"{_f(res.local.max_abs)} -> "
                     + ("passes: the error is inherited" if res.local_passed
                        else "fails on its own"))
    here = [f for f in report.findings
            if f.layer and (layer in f.layer or pair.ref_name in f.layer)]
    lines += [""] + [finding_text(f) for f in here] if here else ["", "no finding at this layer"]
    gone = [f for f in report.ruled_out
            if f.layer and (layer in f.layer or pair.ref_name in f.layer)]
    lines += [f"ruled out: {escape(f.kind)} ({escape(f.probe)}): {escape(f.data['ruled_out'])}"
              for f in gone]
    return Panel("\n".join(lines), title=f"explain {escape(layer)}")

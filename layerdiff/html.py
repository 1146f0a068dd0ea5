"""A comparison as one self-contained HTML file: summary, findings, error chart, table.

No JavaScript, no network: the chart is SVG written here, styles are inline, and a
Content-Security-Policy forbids loading anything, so the file renders the same offline, in a
mail attachment or in a CI artifact viewer. Chart points link to their table rows and carry
their numbers as hover titles (plain SVG ``<a>``/``<title>``).
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from layerdiff.comparator import PairResult, Report
from layerdiff.diagnose.finding import group_findings
from layerdiff.errors import LayerdiffError
from layerdiff.report import _f, describe

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;
 margin:0;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.meta{color:#5b6575;font-size:13px}.meta code{font-size:12px}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600;
 margin-right:8px}.pass{background:#1f8a4c}.fail{background:#c62828}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:14px 18px;
 margin:10px 0}
.summary li{margin:3px 0}.finding h3{font-size:15px;margin:0 0 6px}
.finding .kind{font-family:ui-monospace,monospace;font-size:12px;background:#eef1f5;
 padding:1px 6px;border-radius:3px;margin-left:6px;color:#3a4556}
.finding dl{display:grid;grid-template-columns:90px 1fr;gap:4px 10px;margin:6px 0 0}
.finding dt{color:#5b6575}.finding dd{margin:0}
pre,code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
pre.fix{background:#f3f6fa;border:1px solid #dde1e7;padding:6px 10px;margin:0;
 white-space:pre-wrap}
.explained{font-weight:600;color:#1f8a4c}
details{margin-top:6px;color:#3a4556}
svg{background:#fff;border:1px solid #dde1e7;border-radius:6px;width:100%;height:auto}
svg text{font:12px system-ui,sans-serif;fill:#3a4556}
.legend{font-size:12.5px;color:#3a4556;margin:6px 2px}
.legend span{margin-right:18px;white-space:nowrap}
.sw{display:inline-block;width:18px;height:10px;vertical-align:middle;margin-right:5px}
.scroll{overflow-x:auto;border:1px solid #dde1e7;border-radius:6px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:12px}
th,td{padding:3px 6px;border-bottom:1px solid #e6e9ee;text-align:left;white-space:nowrap}
th{position:sticky;top:0;background:#eef1f5;z-index:1}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-family:ui-monospace,monospace;font-size:11.5px;white-space:normal}
td.status{white-space:normal;min-width:70px}
tr.fail td{background:#fff3f2}tr.first td{background:#ffd9d5;font-weight:600}
tr:target td{outline:2px solid #1565c0}
.st-ok{color:#1f8a4c}.st-noise{color:#8a6d00}.st-fail{color:#c62828;font-weight:600}
.st-inherited{color:#9a5b5b}.st-first{color:#c62828;font-weight:700}
tr.inherited td{background:#fffafa}
.note{color:#5b6575;font-size:12.5px}
"""

# Chart colours: propagated error, local error, noise band, tolerance, first divergence.
C_PROP, C_LOCAL, C_NOISE, C_TOL, C_FIRST = "#1565c0", "#ef6c00", "#cfd8dc", "#607d8b", "#c62828"


def to_html(report: Report, title: str | None = None) -> str:
    """The whole report as one HTML document (a string)."""
    ref, cand = report.reference.meta, report.candidate.meta
    title = title or "layerdiff report"
    ok = bool(report)
    n, bad = len(report.results), len(report.failures)
    verdict = (f'<span class="verdict pass">PASS</span>{n} of {n} aligned layers agree' if ok
               else f'<span class="verdict fail">DIVERGENCE</span>{n - bad} of {n} aligned '
                    'layers agree')
    opts = report.options
    meta = [f"reference: <code>{escape(_side(ref))}</code>",
            f"candidate: <code>{escape(_side(cand))}</code>",
            f"input: <code>{escape(_input_text(opts.get('input')))}</code>",
            f"atol {_f(opts.get('atol'))}, rtol {_f(opts.get('rtol'))}"
            + (f", noise factor {_f(opts.get('noise_factor'))}"
               if opts.get("noise_factor") else ", no noise floor")]
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{" &middot; ".join(meta)}</p>',
        f'<div class="card summary"><p>{verdict}</p>{_summary(report)}</div>',
        _findings(report),
        _fixes(report),
        "<h2>Error by layer depth</h2>", chart_svg(report), _legend(report),
        "<h2>Layer by layer</h2>", _table(report),
        f'<p class="note">written by {escape(_version())}</p>',
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_html(report: Report, path: str | Path, force: bool = False,
               title: str | None = None) -> Path:
    """Write :func:`to_html` to ``path``; an existing file is refused unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise LayerdiffError(f"{path}: already exists; pass --force to overwrite it")
    path.write_text(to_html(report, title), encoding="utf-8")
    return path


# -- sections -------------------------------------------------------------------------------
def _side(meta: dict) -> str:
    what = meta.get("model") or meta.get("framework") or "?"
    return f"{what} ({meta.get('framework', '?')}, {meta.get('dtype', '?')})"


def _input_text(spec) -> str:
    if isinstance(spec, (list, tuple)):
        return " ".join(map(str, spec))
    return "uniform:-1,1 (default)" if spec is None else str(spec)


def _version() -> str:
    from layerdiff import __version__

    return f"layerdiff {__version__}"


def _pair_link(r: PairResult) -> str:
    return (f'<a href="#pair-{r.position}"><b>{escape(r.pair.ref_name)}</b> &harr; '
            f"<b>{escape(r.pair.cand_name)}</b></a>")


def _summary(report: Report) -> str:
    fd, worst = report.first_divergence, report.worst
    items = []
    if fd is not None:
        items.append(f"first divergence: {_pair_link(fd)} ({escape(report.entry.text())}; "
                     f"{escape(describe(fd))})")
    if not report.coverage.complete:
        items.append(escape(report.coverage.failure()))
    if worst is not None and not worst.passed and worst is not fd:
        items.append(f"worst layer: {_pair_link(worst)} ({escape(describe(worst))})")
    methods = ", ".join(f"{k} {v}" for k, v in report.alignment.methods().items())
    items.append(f"aligned by: {escape(methods)}")
    for side, recs in (("reference", report.alignment.unaligned_ref),
                       ("candidate", report.alignment.unaligned_cand)):
        if recs:
            names = ", ".join(r.name for r in recs[:12]) + (", ..." if len(recs) > 12 else "")
            items.append(f"unaligned {side} layers ({len(recs)}): {escape(names)}")
    if report.stopped_early:
        items.append("stopped at the first divergence (--fail-fast)")
    items += [f"note: {escape(n)}" for n in report.notes]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _findings(report: Report) -> str:
    groups = group_findings(report.findings)
    if not groups:
        if report:
            return ""
        return ('<h2>Findings</h2><div class="card">No probe explained the divergence; see the '
                "first divergence above and the local errors in the table.</div>")
    out = [f"<h2>Findings ({len(report.findings)})</h2>"]
    for f, more in groups:
        rows = [("evidence", escape(str(f.evidence or "-")))]
        if f.fix:
            rows.append(("fix", f'<pre class="fix">{escape(str(f.fix))}</pre>'))
        if f.explained is not None:
            err = ""
            if f.error_before is not None and f.error_after is not None:
                err = f" (max abs error {_f(f.error_before)} &rarr; {_f(f.error_after)})"
            rows.append(("explains", f'<span class="explained">{100 * f.explained:.0f}%</span>'
                                     f" of the error{err}"))
        layer = f"at <b>{escape(f.layer)}</b>" if f.layer else "model-wide"
        out.append(
            f'<div class="card finding"><h3>{escape(str(f.cause))}'
            f'<span class="kind">{escape(f.kind)}</span></h3>'
            f'<div class="meta">{layer}</div><dl>'
            + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"
            + (f"<details><summary>the same cause at {len(more)} more place(s)</summary><ul>"
               + "".join(f"<li><b>{escape(m.layer or 'model-wide')}</b>: "
                         f"<code>{escape(str(m.fix))}</code>"
                         + (f" (explains {100 * m.explained:.0f}%)"
                            if m.explained is not None else "") + "</li>" for m in more)
               + "</ul></details>" if more else "")
            + "</div>")
    return "\n".join(out)


def _fixes(report: Report) -> str:
    """What ``--fix-out`` did (report.fixes): before/after, each applied patch, manual ones."""
    outcome = report.fixes
    if outcome is None:
        return ""
    out = ["<h2>Fixes</h2>"]
    if not outcome.written:
        out.append(f'<div class="card">Nothing written to <code>{escape(str(outcome.out_dir))}'
                   "</code>: no finding has a safe automatic fix.</div>")
    else:
        before, after = outcome.summaries()
        verdict = ('<span class="verdict pass">PASS</span>the repaired port agrees' if after.passed
                   else '<span class="verdict fail">DIVERGENCE</span>the repaired port still '
                        "diverges")
        rows = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{escape(c)}</td>" for c in s.cells())
                       + "</tr>" for name, s in (("before", before), ("after", after)))
        out.append(f'<div class="card"><p>{verdict}: written to '
                   f"<code>{escape(str(outcome.out_dir))}</code> (FIXES.md)</p><table><tr><th>"
                   "</th><th>first divergence</th><th>layers agreeing</th><th>max error at the "
                   f"output</th></tr>{rows}</table></div>")
        for a in outcome.applied:
            f = a.finding
            layer = f" at <b>{escape(f.layer)}</b>" if f.layer else ""
            out.append(f'<div class="card finding"><h3>{escape(f.kind)}{layer}<span class="kind">'
                       f'{escape(a.level)}</span></h3><pre class="fix">'
                       f"{escape(chr(10).join(a.weight_lines + a.code_lines) or f.patch)}"
                       "</pre></div>")
    if outcome.manual:
        out.append('<div class="card"><p>Left to you (no safe automatic patch):</p><ul>'
                   + "".join(f"<li><b>{escape(f.kind)}</b>"
                             + (f" at {escape(f.layer)}" if f.layer else "")
                             + f": <code>{escape(str(f.fix))}</code></li>"
                             for f in outcome.manual) + "</ul></div>")
    return "\n".join(out)


def _table(report: Report) -> str:
    fd = report.first_divergence
    cols = ["#", "reference", "candidate", "match", "shape", "max abs", "local", "mean abs",
            "max rel", "cosine", "SNR dB", "noise", "tol", "status"]
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    rows = []
    for r in report.results:
        m = r.metrics
        shape = "x".join(map(str, m.ref_shape))
        if m.ref_shape != m.cand_shape:
            shape += " vs " + "x".join(map(str, m.cand_shape))
        status = _status(r, fd)
        cls = {"FIRST DIVERGENCE": "first", "inherited": "inherited"}.get(
            status, "fail" if not r.passed else "")
        local = _f(r.local.max_abs) if r.local is not None else "-"
        if r.local_passed is False:
            local += " &#10007;"
        num = [_f(m.max_abs), local, _f(m.mean_abs), _f(m.max_rel), _f(m.cosine, 6),
               _f(m.snr_db, 4), _f(r.noise), _f(r.tolerance)]
        rows.append(
            f'<tr id="pair-{r.position}" class="{cls}"><td class="num">{r.position}</td>'
            f'<td class="name">{_breakable(r.pair.ref_name)}</td>'
            f'<td class="name">{_breakable(r.pair.cand_name)}</td><td>{escape(r.pair.method)}</td>'
            f"<td>{shape}</td>" + "".join(f'<td class="num">{v}</td>' for v in num)
            + f'<td class="status st-{status.split()[0].lower()}">{status}</td></tr>')
    return (f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody>'
            "</table></div>")


def _breakable(name: str) -> str:
    """A layer name that may wrap after ``+`` (a group) and ``/``, never inside a word."""
    return escape(name).replace("+", "+<wbr>").replace("/", "/<wbr>")


def _status(r: PairResult, fd: PairResult | None) -> str:
    if r is fd:
        return "FIRST DIVERGENCE"
    if not r.passed and r.local_passed:
        return "inherited"  # right on its own, wrong only because its inputs are
    return r.status


def _legend(report: Report) -> str:
    items = [(C_PROP, "line", "propagated error (candidate vs reference, whole run)")]
    if any(r.local is not None for r in report.results):
        items.append((C_LOCAL, "box", "local error: the candidate layer re-run on the "
                                       "reference's inputs (filled: fails on its own)"))
    if any(r.noise is not None for r in report.results):
        items.append((C_NOISE, "band", "float32 noise of the reference (vs its float64 run)"))
    items.append((C_TOL, "dash", "tolerance"))
    if any(not r.metrics.shape_match for r in report.results):
        items.append((C_FIRST, "cross", "shapes differ (no error value)"))
    if report.first_divergence is not None:
        items.append((C_FIRST, "line", "first divergence"))
    spans = []
    for color, kind, text in items:
        if kind == "cross":
            spans.append(f'<span><b style="color:{color}">&#10005;</b> {escape(text)}</span>')
            continue
        style = (f"background:{color}" if kind == "band" else
                 f"border:1.5px solid {color};width:8px;height:8px" if kind == "box" else
                 f"border-top:2px {'dashed' if kind == 'dash' else 'solid'} {color};height:0")
        spans.append(f'<span><i class="sw" style="{style}"></i>{escape(text)}</span>')
    return ('<div class="legend">' + "".join(spans) + "<br>y: max |reference - candidate| "
            "(log scale; an exact zero sits on the bottom axis); hover a point for its numbers, "
            "click it for its table row</div>")


# -- the chart ------------------------------------------------------------------------------
W, H = 1100, 380
ML, MR, MT, MB = 64, 16, 28, 46


def _finite_pos(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and x > 0 else None


def chart_svg(report: Report) -> str:
    """Error against layer depth, log scale: propagated and local error, noise band,
    tolerance, the first divergence marked."""
    res = report.results
    if not res:
        return "<p>nothing was aligned</p>"
    vals = []
    for r in res:
        vals += [_finite_pos(r.metrics.max_abs), _finite_pos(r.noise), _finite_pos(r.tolerance)]
        if r.local is not None:
            vals.append(_finite_pos(r.local.max_abs))
    vals = [v for v in vals if v is not None] or [1e-6, 1.0]
    lo = math.floor(math.log10(min(vals)))
    hi = math.ceil(math.log10(max(vals)))
    lo = max(lo, hi - 16)  # keep the scale readable when something is ~1e-30
    if hi - lo < 2:
        lo, hi = lo - 1, hi + 1
    n = len(res)
    pw, ph = W - ML - MR, H - MT - MB

    def x(i: int) -> float:
        return ML + (pw * (i + 0.5) / n)

    def y(v: float | None) -> float:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.nan
        if v == math.inf or (v > 0 and math.log10(v) > hi):
            return MT
        if v <= 0 or math.log10(v) < lo:
            return MT + ph  # exact zero (or below the scale): the bottom axis
        return MT + ph * (hi - math.log10(v)) / (hi - lo)

    s = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
         f'aria-label="error by layer">']
    for e in range(lo, hi + 1):  # decade grid
        yy = y(10.0 ** e)
        s.append(f'<line x1="{ML}" x2="{W - MR}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eceff3"/>')
        s.append(f'<text x="{ML - 6}" y="{yy + 4:.1f}" text-anchor="end">10<tspan dy="-6" '
                 f'font-size="9">{e}</tspan></text>')
    step = max(1, round(n / 12))
    for i in range(0, n, step):
        s.append(f'<text x="{x(i):.1f}" y="{MT + ph + 16}" text-anchor="middle">{i}</text>')
    s.append(f'<text x="{ML + pw / 2}" y="{H - 8}" text-anchor="middle">layer depth '
             "(aligned pair #, reference order)</text>")
    s.append(f'<text x="14" y="{MT + ph / 2}" text-anchor="middle" '
             f'transform="rotate(-90 14 {MT + ph / 2})">max abs error</text>')

    noise = [(x(i), y(r.noise)) for i, r in enumerate(res) if r.noise is not None]
    if noise:  # the band from the bottom up to the reference's own float32 noise
        half = pw / n / 2
        top = " ".join(f"{px - half:.1f},{py:.1f} {px + half:.1f},{py:.1f}" for px, py in noise)
        s.append(f'<polygon points="{noise[0][0] - half:.1f},{MT + ph} {top} '
                 f'{noise[-1][0] + half:.1f},{MT + ph}" fill="{C_NOISE}" opacity="0.8">'
                 "<title>float32 noise of the reference</title></polygon>")
    s.append(_polyline([(x(i), y(r.tolerance)) for i, r in enumerate(res)], C_TOL, "4 3", 1.2))

    fd = report.first_divergence
    if fd is not None:
        fx = x(fd.position)
        anchor = "start" if fd.position < n * 0.6 else "end"
        dx = 6 if anchor == "start" else -6
        s.append(f'<line x1="{fx:.1f}" x2="{fx:.1f}" y1="{MT}" y2="{MT + ph}" '
                 f'stroke="{C_FIRST}" stroke-width="1.5"/>')
        s.append(f'<text x="{fx + dx:.1f}" y="{MT - 10}" text-anchor="{anchor}" '
                 f'style="fill:{C_FIRST};font-weight:600">first divergence: '
                 f"{escape(fd.pair.ref_name)} &#8596; {escape(fd.pair.cand_name)}</text>")

    s.append(_polyline([(x(i), y(r.metrics.max_abs)) for i, r in enumerate(res)], C_PROP, "",
                       1.8))
    rad = 3.2 if n <= 200 else 2.0
    for i, r in enumerate(res):
        # Local error as markers only: exact zeros (a ReLU re-run on the reference's inputs)
        # are common, and a line dropping to the axis for each would hide the picture.
        lv = _finite_pos(r.local.max_abs) if r.local is not None else None
        if lv is None:
            continue
        bad = r.local_passed is False
        d = rad + 0.8
        s.append(f'<a href="#pair-{r.position}"><rect x="{x(i) - d:.1f}" y="{y(lv) - d:.1f}" '
                 f'width="{2 * d:.1f}" height="{2 * d:.1f}" fill="{C_LOCAL if bad else "#fff"}" '
                 f'stroke="{C_LOCAL}" stroke-width="1.2"><title>#{r.position} local error '
                 f"{_f(lv)} ({'fails on its own' if bad else 'right on its own'})</title>"
                 "</rect></a>")
    for i, r in enumerate(res):
        py = y(r.metrics.max_abs)
        if math.isnan(py):  # no error value (shapes differ): a cross along the top edge
            m = r.metrics
            tip = (f"#{r.position} {r.pair.ref_name} <-> {r.pair.cand_name}\nshape "
                   f"{list(m.ref_shape)} vs {list(m.cand_shape)}")
            cx, cy, d = x(i), MT + 8, rad + 1
            s.append(f'<a href="#pair-{r.position}"><path d="M{cx - d:.1f},{cy - d:.1f}'
                     f"L{cx + d:.1f},{cy + d:.1f}M{cx - d:.1f},{cy + d:.1f}L{cx + d:.1f},"
                     f'{cy - d:.1f}" stroke="{C_FIRST}" stroke-width="2">'
                     f"<title>{escape(tip)}</title></path></a>")
            continue
        tip = (f"#{r.position} {r.pair.ref_name} <-> {r.pair.cand_name}\n"
               f"max abs {_f(r.metrics.max_abs)}, tolerance {_f(r.tolerance)}"
               + (f"\nlocal {_f(r.local.max_abs)}" if r.local is not None else "")
               + (f"\nnoise {_f(r.noise)}" if r.noise is not None else "")
               + f"\n{_status(r, report.first_divergence)}")
        fill = C_FIRST if not r.passed else C_PROP
        s.append(f'<a href="#pair-{r.position}"><circle cx="{x(i):.1f}" cy="{py:.1f}" '
                 f'r="{rad}" fill="{fill}" stroke="#fff" stroke-width="0.6">'
                 f"<title>{escape(tip)}</title></circle></a>")
    s.append(f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" '
             'stroke="#b0b8c4"/>')
    s.append("</svg>")
    return "\n".join(s)


def _polyline(points: list[tuple[float, float]], color: str, dash: str, width: float) -> str:
    """One polyline per run of finite points (a NaN breaks the line)."""
    runs, cur = [], []
    for p in points:
        if math.isnan(p[1]):
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(p)
    if cur:
        runs.append(cur)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return "".join(
        f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in run)}" fill="none" '
        f'stroke="{color}" stroke-width="{width}"{dash_attr} stroke-linejoin="round"/>'
        for run in runs)

"""The ``layerdiff`` command line.

Exit codes: 0 success, 1 a comparison found a divergence, 2 a usage or input error (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from layerdiff.errors import LayerdiffError
from layerdiff.inputs import parse_shape, parse_specs

# Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else
              int(os.environ.get("COLUMNS", "160")))
err = Console(stderr=True, highlight=False)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?",
                   help="model directory, prototxt, torch model, .onnx or trace .npz")
    p.add_argument("--prototxt", help="Caffe deploy prototxt (instead of finding it in MODEL)")
    p.add_argument("--weights", help="Caffe .caffemodel, or torch state_dict beside model.py")
    p.add_argument("--shape", help="input shape N,C,H,W (or NAME=N,C,H,W;NAME2=...)")


def _side_args(p: argparse.ArgumentParser) -> None:
    for side in ("ref", "cand"):
        p.add_argument(f"--{side}-prototxt", help=f"{side} Caffe prototxt (explicit file)")
        p.add_argument(f"--{side}-weights", help=f"{side} caffemodel or torch state_dict")
        p.add_argument(f"--{side}-dtype", choices=["float32", "float64", "float16", "bfloat16"],
                       help=f"{side} precision (default --dtype)")
        p.add_argument(f"--{side}-device", choices=["cpu", "cuda"],
                       help=f"{side} torch device (default --device)")
        p.add_argument(f"--{side}-onnx-optimize", choices=["none", "basic", "extended"],
                       help=f"{side} ONNX: onnxruntime graph optimizations (default "
                            "--onnx-optimize)")
    p.add_argument("--shape", help="input shape N,C,H,W (or NAME=N,C,H,W;...)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", metavar="SPEC",
                   help="ones[:V] | const:V | zeros | randn[:SEED] | uniform:LO,HI[:SEED] | "
                        "npy:PATH, or NAME=SPEC per input (repeatable; default uniform:-1,1)")
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "float16", "bfloat16"],
                   help="compute precision (Caffe engine: float32 or float64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
    p.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                   help="TF32 for float32 conv/matmul on CUDA: torch's default (cuDNN on, "
                        "matmul off), on or off for both")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled torch module (runs code from the file)")
    p.add_argument("--keep-train-mode", action="store_true",
                   help="do not call eval() on a torch model that arrived in train mode")
    p.add_argument("--stream", metavar="DIR",
                   help="write each layer output to DIR as it is computed (memory-mapped)")
    p.add_argument("--onnx-optimize", default="none", choices=["none", "basic", "extended"],
                   help="ONNX models: record onnxruntime's optimized graph instead of the "
                        "file's own nodes (default none)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="layerdiff",
        description="Layer-by-layer numerical diff for model ports (Caffe <-> PyTorch <-> ONNX).")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a Caffe or ONNX model's layers, shapes and port traps")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print the same content as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run one model and print per-layer output statistics")
    _model_args(p)
    _run_args(p)
    p.add_argument("--save", metavar="TRACE.npz", help="save the trace (see docs/trace-format.md)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --save file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run two models on one input and find where they diverge")
    p.add_argument("reference", help="reference: Caffe model, torch model, .onnx or trace .npz")
    p.add_argument("candidate", help="candidate: Caffe model, torch model, .onnx or trace .npz")
    _side_args(p)
    _run_args(p)
    p.add_argument("--map", help="TOML map file pairing layer names (see docs/alignment.md)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default 1e-6)")
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance relative to the layer's max|ref| (default 1e-4)")
    p.add_argument("--no-noise-floor", action="store_true",
                   help="do not widen tolerances by the reference's measured float32 noise")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first divergence")
    p.add_argument("--csv", help="write the per-layer table as CSV")
    p.add_argument("--json", dest="json_out", help="write the result as JSON")
    p.add_argument("--markdown", help="write the per-layer table as Markdown")
    p.add_argument("--html", metavar="FILE",
                   help="write a self-contained HTML report (table, findings, error chart)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--summary-only", action="store_true", help="print only the summary")
    p.add_argument("--explain", metavar="LAYER",
                   help="print one layer's whole analysis (reference or candidate name)")
    p.add_argument("--repro", metavar="DIR",
                   help="write the first diverging layer as a standalone reproduction")
    p.add_argument("--fix-out", metavar="DIR",
                   help="write the candidate with every proven fix applied to DIR (new or "
                        "empty; --force to reuse), compare it again, exit 0 if it passes")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("align", help="print how the layers of two models pair up")
    p.add_argument("reference")
    p.add_argument("candidate")
    _side_args(p)
    _run_args(p)
    p.add_argument("--map", help="TOML map file to start from")
    p.add_argument("--write-map", metavar="MAP.toml", help="write the mapping as a map file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --write-map file")
    p.set_defaults(func=cmd_align)

    from layerdiff.diagnose.audit_cli import add_audit_parser

    add_audit_parser(sub)

    p = sub.add_parser("pycaffe-script",
                       help="print a script that records a trace with a real Caffe install")
    p.set_defaults(func=cmd_pycaffe_script)

    p = sub.add_parser("example", help="write the built-in example Caffe model to a directory")
    p.add_argument("out", help="directory to create (must not exist or be empty)")
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("demo", help="build a buggy ResNet-50 port, find its bug, check the fix")
    p.add_argument("--keep", metavar="DIR",
                   help="build in DIR (must not exist or be empty) and keep the files")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from layerdiff.engine.runner import tune_allocator

    tune_allocator()  # this process is ours: keep activation memory instead of re-faulting it
    if getattr(args, "tf32", "default") != "default":
        from layerdiff.adapters.torch_capture import set_tf32

        set_tf32(args.tf32 == "on")  # process-wide: captures and re-runs see the same flags
    try:
        return int(args.func(args) or 0)
    except LayerdiffError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def _version() -> str:
    from layerdiff import __version__

    return f"layerdiff {__version__}"


def _require_model(args) -> str:
    if args.model is None and not args.prototxt:
        raise LayerdiffError("no model given: pass a model directory or --prototxt")
    return args.model or args.prototxt


def _options(args):
    from layerdiff.sources import ModelOptions

    return ModelOptions(
        prototxt=args.prototxt, weights=args.weights,
        shape=parse_shape(args.shape) if args.shape else None,
        dtype=getattr(args, "dtype", "float32"), device=getattr(args, "device", "cpu"),
        trust_pickle=getattr(args, "trust_pickle", False),
        keep_train_mode=getattr(args, "keep_train_mode", False),
        stream_dir=getattr(args, "stream", None),
        extra={"onnx_optimize": getattr(args, "onnx_optimize", "none")})


# -- inspect --------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from layerdiff.inspect import inspect_net
    from layerdiff.sources import load_caffe_model

    model = _require_model(args)
    if Path(model).suffix == ".onnx" or (Path(model).is_dir() and not args.prototxt and
                                         any(Path(model).glob("*.onnx")) and
                                         not any(Path(model).glob("*.prototxt"))):
        return _inspect_onnx(model, args.json)
    if Path(model).suffix in (".npz", ".py", ".pt", ".pth", ".pt2"):
        raise LayerdiffError(f"{model}: inspect reads Caffe models (a prototxt or its directory) "
                             "and ONNX models (.onnx)")
    ins = inspect_net(load_caffe_model(model, _options(args)))
    if args.json:
        print(json.dumps(ins.to_dict(), indent=1))
        return 0
    table = Table(title=f"{ins.model}", title_justify="left", header_style="bold")
    for col in ("#", "name", "type", "bottoms -> tops", "output shape", "params", "blobs"):
        table.add_column(col, overflow="fold")
    for r in ins.layers:
        shapes = " ".join("?" if s is None else "x".join(map(str, s)) for s in r.output_shapes)
        blobs = " ".join("x".join(map(str, b)) or "scalar" for b in r.blob_shapes)
        flow = f"{', '.join(r.bottoms) or '-'} -> {', '.join(r.tops) or '-'}"
        table.add_row(str(r.index), r.name, r.type + (" (in-place)" if r.in_place else ""),
                      flow, shapes, r.params, blobs)
    out.print(table)
    lines = [f"[bold]{f.kind}[/]: {f.message}" for f in ins.findings]
    lines += [f"note: {n}" for n in ins.notes]
    if ins.unsupported:
        lines.append("[yellow]unsupported layer types (shapes unknown past them): "
                     + ", ".join(ins.unsupported) + "[/]")
    if not ins.weights:
        lines.append("no caffemodel: structure only (blob values unknown)")
    out.print(Panel("\n".join(lines) or "nothing to report", title="findings"))
    return 0


def _inspect_onnx(model: str, as_json: bool) -> int:
    from layerdiff.adapters.onnx import load_onnx
    from layerdiff.adapters.onnx_inspect import inspect_onnx

    ins = inspect_onnx(load_onnx(model))
    if as_json:
        print(json.dumps(ins.to_dict(), indent=1))
        return 0
    table = Table(title=f"{ins.model} ({ins.producer or 'unknown producer'}, opset {ins.opset})",
                  title_justify="left", header_style="bold")
    for col in ("#", "name", "op", "inputs -> outputs", "output shape", "attributes",
                "initializers"):
        table.add_column(col, overflow="fold")
    for r in ins.nodes:
        shapes = " ".join("?" if s is None else "x".join(map(str, s)) for s in r.output_shapes)
        inits = " ".join("x".join(map(str, s)) or "scalar" for s in r.initializers)
        flow = f"{', '.join(x for x in r.inputs if x) or '-'} -> {', '.join(r.outputs)}"
        table.add_row(str(r.index), r.name, r.op_type, flow, shapes, r.attrs, inits)
    out.print(table)
    inputs = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in ins.inputs.items())
    lines = [f"inputs: {inputs}"]
    lines += [f"[bold]{t.kind}[/]: {escape(t.message)}" for t in ins.traps]
    lines += [f"note: {escape(n)}" for n in ins.notes]
    out.print(Panel("\n".join(lines), title="findings"))
    return 0


# -- run ------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from rich.progress import Progress

    from layerdiff.sources import trace_model

    model = _require_model(args)
    save = Path(args.save) if args.save else None
    _check_output(save, args.force)
    _check_stream_dir(args.stream, args.force)
    specs = parse_specs(args.input)
    if any(s.channel_symmetric for s in specs.values()):
        err.print("note: a constant input is the same in every channel, so it cannot reveal a "
                  "BGR/RGB channel swap")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("running", total=None)

        def progress(i: int, n: int, name: str) -> None:
            bar.update(task, total=n, completed=i, description=name[:30])

        trace = trace_model(model, specs, _options(args), progress=progress)
    table = Table(title=f"{trace.meta.get('framework', '?')} trace of {model} "
                        f"({trace.meta.get('dtype', '')})", title_justify="left",
                  header_style="bold")
    for col in ("#", "name", "kind", "top", "shape", "min", "max", "mean", "std", "nan", "inf"):
        table.add_column(col, justify="right" if col in ("#", "min", "max", "mean", "std",
                                                         "nan", "inf") else "left")
    for rec in trace:
        for top, arr in zip(rec.tops, rec.outputs, strict=True):
            s = _stats(arr)
            table.add_row(str(rec.index), rec.name, rec.kind, top, "x".join(map(str, arr.shape)),
                          *s)
    out.print(table)
    for note in trace.meta.get("notes") or []:
        err.print(f"note: {escape(str(note))}", soft_wrap=True)
    if save is not None:
        trace.save(save)
        out.print(f"saved {len(trace)} records to {save}")
    return 0


def _stats(arr: np.ndarray) -> list[str]:
    a = np.asarray(arr)
    if a.size == 0:
        return ["-"] * 4 + ["0", "0"]
    a = a.astype(np.float64, copy=False)
    fin = np.isfinite(a)
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    v = a[fin] if not fin.all() else a
    if v.size == 0:
        return ["-"] * 4 + [str(nan), str(inf)]
    return [f"{v.min():.4g}", f"{v.max():.4g}", f"{v.mean():.4g}", f"{v.std():.4g}",
            str(nan), str(inf)]


# -- compare / align ------------------------------------------------------------------------
def _side_options(args, side: str):
    from layerdiff.sources import ModelOptions

    return ModelOptions(
        prototxt=getattr(args, f"{side}_prototxt"), weights=getattr(args, f"{side}_weights"),
        shape=parse_shape(args.shape) if args.shape else None,
        dtype=getattr(args, f"{side}_dtype") or args.dtype,
        device=getattr(args, f"{side}_device") or args.device,
        trust_pickle=args.trust_pickle, keep_train_mode=args.keep_train_mode,
        stream_dir=(str(Path(args.stream) / side) if args.stream else None),
        extra={"onnx_optimize": getattr(args, f"{side}_onnx_optimize") or args.onnx_optimize})


def _check_output(path: Path | None, force: bool) -> None:
    """Refuse, before any work, an output that would overwrite a file or cannot be written."""
    if path is None:
        return
    if path.exists() and not force:
        raise LayerdiffError(f"{path}: already exists; pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise LayerdiffError(f"{path}: is a directory, not a file")
    if not path.parent.is_dir():
        raise LayerdiffError(f"{path}: directory {path.parent} does not exist")


def _check_stream_dir(stream: str | None, force: bool) -> None:
    if not stream:
        return
    d = Path(stream)
    if d.exists() and not d.is_dir():
        raise LayerdiffError(f"--stream {d}: is a file; give a directory")
    if d.is_dir() and any(d.iterdir()) and not force:
        raise LayerdiffError(f"--stream {d}: directory is not empty (its files would be "
                             "overwritten); choose an empty one or pass --force")


def cmd_compare(args) -> int:
    from layerdiff.api import compare
    from layerdiff.comparator import DEFAULT_ATOL, DEFAULT_RTOL
    from layerdiff.progress import progress_bar
    from layerdiff.report import render, write_outputs

    for p in (args.csv, args.json_out, args.markdown, args.html):
        _check_output(Path(p) if p else None, args.force)
    _check_stream_dir(args.stream, args.force)
    if args.repro and Path(args.repro).exists() and (
            not Path(args.repro).is_dir() or any(Path(args.repro).iterdir())):
        raise LayerdiffError(f"{args.repro}: exists and is not an empty directory; choose another")
    if args.fix_out:
        from layerdiff.fix import check_fixable

        check_fixable(args.candidate, args.fix_out, args.force)
    bar, progress = progress_bar(err)
    with bar:
        report = compare(
            args.reference, args.candidate, args.input,
            atol=DEFAULT_ATOL if args.atol is None else args.atol,
            rtol=DEFAULT_RTOL if args.rtol is None else args.rtol,
            map=args.map, noise_floor=not args.no_noise_floor, fail_fast=args.fail_fast,
            ref_options=_side_options(args, "ref"), cand_options=_side_options(args, "cand"),
            progress=progress)
    if args.explain:
        from layerdiff.report import explain

        out.print(explain(report, args.explain))
    else:
        render(report, out, all_rows=not args.summary_only)
    code = 0 if report else 1
    if args.fix_out:
        from layerdiff.fix.show import fix_and_show

        code = fix_and_show(report, args.fix_out, args.force, out, lambda: progress_bar(err))
    if args.repro:
        from layerdiff.diagnose.repro import write_repro

        where = write_repro(report, args.repro)
        out.print(f"wrote a reproduction of the first divergence to {where}")
    for path in write_outputs(report, args.csv, args.json_out, args.markdown, args.force):
        out.print(f"wrote {path}")
    if args.html:
        from layerdiff.html import write_html

        out.print(f"wrote {write_html(report, args.html, args.force)}")
    return code


def cmd_align(args) -> int:
    from layerdiff.align import align, load_mapfile
    from layerdiff.comparator import candidate_inputs
    from layerdiff.sources import trace_model

    target = Path(args.write_map) if args.write_map else None
    if target is not None and target.exists() and not args.force:
        raise LayerdiffError(f"{target}: already exists; pass --force to overwrite it")
    specs = parse_specs(args.input)
    ref = trace_model(args.reference, specs, _side_options(args, "ref"))
    copts = _side_options(args, "cand")
    cand = trace_model(args.candidate, specs, copts,
                       inputs=candidate_inputs(dict(ref.inputs), args.candidate, copts))
    al = align(ref, cand, load_mapfile(args.map) if args.map else None)
    table = Table(title="alignment", title_justify="left", header_style="bold")
    for col in ("reference", "candidate", "match", "note"):
        table.add_column(col, overflow="fold")
    for pair in al.pairs:
        table.add_row(pair.ref_name, pair.cand_name, pair.method, pair.note)
    out.print(table)
    for side, recs in (("reference", al.unaligned_ref), ("candidate", al.unaligned_cand)):
        if recs:
            out.print(f"unaligned {side} ({len(recs)}): {', '.join(r.name for r in recs)}")
    for w in al.warnings:
        out.print(f"warning: {w}")
    if target is not None:
        target.write_text(al.to_mapfile())
        out.print(f"wrote {target}")
    return 0


def cmd_pycaffe_script(args) -> int:
    from importlib.resources import files

    sys.stdout.write(files("layerdiff.tools").joinpath("pycaffe_dump.py").read_text())
    return 0


# -- example --------------------------------------------------------------------------------
def cmd_example(args) -> int:
    from layerdiff.examples import write_example

    paths = write_example(args.out)
    for p in paths:
        out.print(f"wrote {p}")
    return 0


# -- demo -----------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from layerdiff.demo import run_demo

    return run_demo(args.keep, out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

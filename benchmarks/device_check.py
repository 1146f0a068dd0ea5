"""The device check of issue 15: the demo's ResNet-50 ports compared on a GPU, in every precision.

    python benchmarks/device_check.py [--device cuda|cpu] [--out DIR] [--budget-s 480]

``scripts/device_check.sh`` installs what is missing and runs this. Steps, each a child process
so one failure or timeout leaves the others' results:

1. the demo scenario (``layerdiff demo --keep`` builds the same files): the Caffe ResNet-50, the
   buggy port (BatchNorm statistics not divided by Caffe's factor) and the fixed port;
2. ``layerdiff compare caffe/ port/ --device D --cand-dtype T --tf32 on|off`` for each
   precision (float32 with TF32 on and off, float16, bfloat16) and port, verdict checked: the
   buggy port's first non-precision cause is ``bn_scale_factor`` at the first BatchNorm group,
   explaining >= 99%, with nothing but precision labels before it; the fixed port passes or
   carries only precision findings. Then the same candidate against the float64 reference
   (saved once by ``layerdiff run --dtype float64``), undiagnosed: its per-layer error;
3. ``benchmarks/bench_torch_capture.py --device D`` at the bench batches (capture vs forward);
4. peak ``torch.cuda.max_memory_allocated`` (and host max RSS) of a capture of the fixed port at
   the memory batch, with and without ``--stream``.

Writes ``results.json`` and ``results.md`` (precision x port x verdict) into ``--out`` (default
``$OUT``, else a new temp dir). Exit 0 when every check held, 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INPUT = "uniform:-1,1:0"  # the demo's input (layerdiff.demo.INPUT)
#: name -> (candidate dtype, TF32 flag)
PRECISIONS = {
    "fp32-tf32": ("float32", "on"),
    "fp32": ("float32", "off"),
    "fp16": ("float16", "off"),
    "bf16": ("bfloat16", "off"),
}
PORTS = ("buggy", "fixed")
PRECISION_KINDS = {"precision", "precision_range"}
BUG_KIND = "bn_scale_factor"
BUG_LAYER = "bn_conv1+scale_conv1 <-> bn1"  # layerdiff.demo.EXPECTED_FIRST


_LOG_LOCK = threading.Lock()


class Budget:
    """Seconds left of the whole run; every child gets at most what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _child(cmd: list[str], budget: Budget, cap: float, log: Path) -> tuple[int | None, str]:
    """Run ``cmd``; (exit code or None on timeout, its output). The output goes to ``log``."""
    limit = min(cap, budget.left())
    if limit < 5:
        return None, "skipped: time budget spent"
    try:
        # Not from the checkout: there `-m layerdiff` would find the bare source folder before
        # an installed or staged layerdiff (which has layerdiff.adapters).
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                           cwd=tempfile.gettempdir())
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, rc = text + f"\ntimed out after {limit:.0f}s", None
    with _LOG_LOCK, log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{text}\n")
    return rc, text


# -- 2. compares --------------------------------------------------------------------------------
def pair_order(doc: dict[str, Any]) -> list[str]:
    """The aligned pairs of a compare's JSON, in net order, named as findings name them."""
    return [f"{p['reference']} <-> {p['candidate']}" for p in doc["pairs"]]


def verdict(doc: dict[str, Any]) -> dict[str, Any]:
    """What a compare's JSON says, in the terms of the check: pass, precision (not a bug), or
    a bug (the first in net order, then the most explaining)."""
    passed, findings, first = doc["passed"], doc["findings"], doc.get("first_divergence")
    pos = {layer: i for i, layer in enumerate(pair_order(doc))}
    bugs = sorted((f for f in findings if f["kind"] not in PRECISION_KINDS),
                  key=lambda f: (pos.get(f["layer"], len(pos)), -(f.get("explained") or 0)))
    prec = [f for f in findings if f["kind"] in PRECISION_KINDS]
    first_at = f"{first['reference']} <-> {first['candidate']}" if first else None
    if passed:
        label = "pass"
    elif bugs:
        top = bugs[0]
        label = f"bug: {top['kind']} at {top['layer']} ({100 * (top['explained'] or 0):.0f}%)"
    elif prec:
        fmts = sorted({str(f.get("data", {}).get("format")) for f in prec})
        label = f"precision ({'/'.join(fmts)}), not a bug"
    else:
        label = "divergence, no cause found"
    return {"label": label, "first_divergence": first_at, "bugs": bugs, "precision": prec}


def per_layer_error(pairs: list[dict]) -> dict[str, Any]:
    """Relative error per aligned layer (max|d| / max|ref|) against the float64 reference."""
    rel = [(p["max_abs"] / p["ref_max_abs"], p["reference"]) for p in pairs
           if p.get("ref_max_abs") and p.get("max_abs") is not None]
    if not rel:
        return {"layers": 0}
    worst = max(rel)
    return {"layers": len(rel), "median_rel": statistics.median(r for r, _ in rel),
            "max_rel": worst[0], "worst_layer": worst[1],
            "failing": sum(1 for p in pairs if p.get("passed") is False)}


def check(port: str, v: dict[str, Any], order: list[str],
          bug_layer: str = BUG_LAYER) -> tuple[bool, str]:
    """Did the compare say what it must? (ok, why not). ``order``: the pairs, in net order;
    ``bug_layer``: where the buggy port's ``bn_scale_factor`` must be found."""
    pos = {layer: i for i, layer in enumerate(order)}
    if port == "fixed":
        if v["bugs"]:
            return False, f"false divergence with a cause: {v['label']}"
        if v["label"].startswith("divergence"):
            return False, "fails without a precision label"
        return True, ""
    ours = [f for f in v["bugs"] if f["kind"] == BUG_KIND and f["layer"] == bug_layer]
    if not ours:
        return False, f"no {BUG_KIND} at {bug_layer} ({v['label']})"
    if (ours[0].get("explained") or 0) < 0.99:
        return False, f"{BUG_KIND} explains only {ours[0]['explained']:.1%}"
    at = pos.get(bug_layer, -1)
    before = [f for f in v["bugs"] if pos.get(f["layer"], at) < at]
    if before:
        return False, f"a cause before the BN bug: {before[0]['kind']} at {before[0]['layer']}"
    labelled = {f["layer"] for f in v["precision"]}
    if v["first_divergence"] != bug_layer and v["first_divergence"] not in labelled:
        return False, f"first divergence {v['first_divergence']}: neither the bug nor precision"
    return True, ""


def error_child(port: str, ref64: str, dtype: str, tf32: str, device: str) -> None:
    """In a fresh process: the candidate against the float64 reference trace, undiagnosed;
    prints its per-layer error as JSON."""
    from layerdiff.adapters.torch_capture import set_tf32

    import layerdiff
    from layerdiff.report import write_outputs
    from layerdiff.sources import ModelOptions

    if tf32 != "default":
        set_tf32(tf32 == "on")
    report = layerdiff.compare(ref64, port, None, diagnose=False,
                               cand_options=ModelOptions(dtype=dtype, device=device))
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "pairs.json"
        write_outputs(report, json_path=str(js))
        print(json.dumps(per_layer_error(json.loads(js.read_text())["pairs"])))


def _error_vs_float64(port: Path, ref64: Path | None, row: dict[str, Any],
                      args: argparse.Namespace, budget: Budget, log: Path) -> dict[str, Any]:
    if ref64 is None:
        return {"layers": 0, "error": "no float64 reference"}
    cmd = [sys.executable, __file__, "--error-child", str(port), "--ref64", str(ref64),
           "--cand-dtype", row["dtype"], "--tf32", row["tf32"], "--device", args.device]
    rc, text = _child(cmd, budget, args.compare_cap_s, log)
    if rc != 0:
        return {"layers": 0, "error": (text.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(text.strip().splitlines()[-1])


def float64_reference(sc: Any, args: argparse.Namespace, budget: Budget, work: Path,
                      log: Path) -> Path | None:
    """The Caffe reference run once in float64 and saved: every precision's error is against
    it."""
    ref64 = work / "ref64.npz"
    cmd = [sys.executable, "-m", "layerdiff", "run", str(sc.caffe), "--input", INPUT, "--shape",
           f"{args.batch},3,224,224", "--dtype", "float64", "--save", str(ref64)]
    rc, _ = _child(cmd, budget, args.compare_cap_s, log)
    return ref64 if rc == 0 and ref64.is_file() else None


def _one_compare(name: str, port: str, sc: Any, ref64: Path | None, args: argparse.Namespace,
                 budget: Budget, out: Path, log: Path) -> dict[str, Any]:
    dtype, tf32 = PRECISIONS[name]
    path = {"buggy": sc.port, "fixed": sc.fixed}[port]
    js = out / f"compare-{name}-{port}.json"
    cmd = [sys.executable, "-m", "layerdiff", "compare", str(sc.caffe), str(path), "--input",
           INPUT, "--shape", f"{args.batch},3,224,224", "--cand-dtype", dtype, "--device",
           args.device, "--tf32", tf32, "--json", str(js), "--force", "--summary-only"]
    t0 = time.perf_counter()
    rc, text = _child(cmd, budget, args.compare_cap_s, log)
    row: dict[str, Any] = {"precision": name, "port": port, "dtype": dtype, "tf32": tf32,
                           "rc": rc, "seconds": time.perf_counter() - t0}
    if rc in (0, 1) and js.is_file():
        d = json.loads(js.read_text())
        js.unlink()  # the summary is in children.log; keep $OUT small
        v = verdict(d)
        ok, why = check(port, v, pair_order(d))
        row.update(verdict=v["label"], first_divergence=v["first_divergence"], ok=ok, why=why,
                   findings=[{k: f.get(k) for k in ("kind", "layer", "explained",
                                                     "error_before", "error_after")}
                             for f in d["findings"]])
        row["error_vs_float64"] = _error_vs_float64(path, ref64, row, args, budget, log)
    else:
        row.update(verdict="error", ok=False,
                   why=(text.strip().splitlines() or ["no output"])[-1][:300])
    print(f"  {name:10} {port:6} {row['verdict']}  ({row['seconds']:.0f}s)"
          + ("" if row["ok"] else f"  CHECK FAILED: {row['why']}"), flush=True)
    return row


def run_compares(sc: Any, args: argparse.Namespace, budget: Budget, out: Path, work: Path,
                 log: Path) -> list[dict[str, Any]]:
    """Every precision x port, ``args.jobs`` at a time (the GPU machine has cores to spare)."""
    ref64 = float64_reference(sc, args, budget, work, log)
    jobs = [(name, port) for name in args.precisions for port in args.ports]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return list(pool.map(lambda j: _one_compare(*j, sc, ref64, args, budget, out, log),
                             jobs))


# -- 3. capture overhead ------------------------------------------------------------------------
def run_bench(args: argparse.Namespace, budget: Budget, out: Path,
              log: Path) -> list[dict[str, Any]]:
    rows = []
    for batch in args.bench_batches:
        js = out / f"bench-{batch}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_torch_capture.py"), "--device",
               args.device, "--batch", str(batch), "--rounds", str(args.bench_rounds),
               "--no-tuned", "--no-hooks", "--json", str(js)]
        rc, text = _child(cmd, budget, args.bench_cap_s, log)
        row: dict[str, Any] = {"batch": batch, "rc": rc}
        if rc == 0 and js.is_file():
            d = json.loads(js.read_text())
            js.unlink()
            fx, plain = d["runs"]["capture (fx)"], d["runs"]["plain forward"]
            row.update(plain_ms=plain["median_ms"], capture_ms=fx["median_ms"],
                       output_gib=d["output_bytes"] / 2 ** 30,
                       ratio=fx["ratio"], paired=fx["paired"], target_met=fx["paired"] <= 1.25)
        else:
            row["error"] = (text.strip().splitlines() or ["no output"])[-1][:300]
        print(f"  batch {batch}: {row}", flush=True)
        rows.append(row)
    return rows


# -- 4. peak memory -----------------------------------------------------------------------------
def peak_child(port: str, device: str, batch: int, stream: str | None) -> None:
    """In a fresh process: capture ``port`` the way ``layerdiff run`` does; print the peaks."""
    import resource

    import torch

    from layerdiff.inputs import parse_specs
    from layerdiff.sources import ModelOptions, trace_model

    opts = ModelOptions(shape={None: (batch, 3, 224, 224)}, device=device, stream_dir=stream)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trace = trace_model(port, parse_specs([INPUT]), opts)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "records": len(trace), "seconds": seconds,
        "device_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_kept": sum(a.nbytes for r in trace for a in r.outputs),
        "stream_used": any(getattr(a, "filename", None) for r in trace for a in r.outputs)}))


def run_memory(sc: Any, args: argparse.Namespace, budget: Budget, work: Path,
               log: Path) -> list[dict[str, Any]]:
    rows = []
    for stream in (False, True):
        sdir = work / "stream" if stream else None
        cmd = [sys.executable, __file__, "--peak-child", str(sc.fixed), "--device", args.device,
               "--memory-batch", str(args.memory_batch)]
        if sdir is not None:
            cmd += ["--peak-stream", str(sdir)]
        rc, text = _child(cmd, budget, args.memory_cap_s, log)
        row: dict[str, Any] = {"batch": args.memory_batch, "stream": stream, "rc": rc}
        if rc == 0:
            row.update(json.loads(text.strip().splitlines()[-1]))
        else:
            row["error"] = (text.strip().splitlines() or ["no output"])[-1][:300]
        print(f"  memory: {row}", flush=True)
        rows.append(row)
    return rows


# -- results ------------------------------------------------------------------------------------
def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [f"# layerdiff device check ({env['device_name']}, torch {env['torch']}, "
             f"batch {res['batch']})", "",
             "| precision | port | verdict | first divergence | per-layer error vs float64 "
             "(median / max rel) | check |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["compares"]:
        e = r.get("error_vs_float64") or {}
        err = (f"{e['median_rel']:.2g} / {e['max_rel']:.2g} ({e['worst_layer']})"
               if e.get("layers") else "-")
        lines.append(f"| {r['precision']} | {r['port']} | {r['verdict']} | "
                     f"{r.get('first_divergence') or '-'} | {err} | "
                     f"{'ok' if r['ok'] else 'FAILED: ' + r['why']} |")
    if res["bench"]:
        # The capture ends with every output on the host: output GiB / (capture - plain) is
        # the copy's bandwidth, which bounds the ratio on a fast GPU.
        lines += ["", "| batch | plain forward ms | capture ms | ratio (medians) | paired ratio "
                  "| <= 1.25x | outputs to host |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for b in res["bench"]:
            if "ratio" in b:
                lines.append(f"| {b['batch']} | {b['plain_ms']:.1f} | {b['capture_ms']:.1f} | "
                             f"{b['ratio']:.2f}x | {b['paired']:.2f}x | "
                             f"{'yes' if b['target_met'] else 'no'} | "
                             f"{b.get('output_gib', 0):.2f} GiB |")
            else:
                lines.append(f"| {b['batch']} | error: {b['error']} | | | | | |")
    if res["memory"]:
        lines += ["", "| capture | batch | device peak (max_memory_allocated) | host max RSS | "
                  "outputs kept | streamed to disk |", "| --- | --- | --- | --- | --- | --- |"]
        for m in res["memory"]:
            name = "--stream" if m["stream"] else "in memory"
            if "records" in m:
                lines.append(f"| {name} | {m['batch']} | {_gib(m['device_peak_bytes'])} | "
                             f"{_gib(m['host_max_rss_bytes'])} | {_gib(m['bytes_kept'])} | "
                             f"{'yes' if m['stream_used'] else 'no'} |")
            else:
                lines.append(f"| {name} | {m['batch']} | error: {m['error']} | | | |")
    lines += ["", f"all checks held: {'yes' if res['ok'] else 'NO'}; "
              f"wall time {res['seconds']:.0f}s"]
    return "\n".join(lines) + "\n"


def _env(device: str) -> dict[str, Any]:
    import torch

    cuda = device == "cuda"
    return {"torch": torch.__version__, "python": sys.version.split()[0], "device": device,
            "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", help="results folder (default $OUT, else a new temp dir)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole run, seconds")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument("--ports", default=",".join(PORTS), help="comma list of buggy, fixed")
    ap.add_argument("--batch", type=int, default=1, help="compare batch")
    ap.add_argument("--jobs", type=int, default=0,
                    help="compares at a time (default: 2 on cuda, 1 on cpu)")
    ap.add_argument("--bench-batches", default="8,32", help="comma list; empty: no benchmark")
    ap.add_argument("--bench-rounds", type=int, default=11)
    ap.add_argument("--memory-batch", type=int, default=64, help="0: no memory measurement")
    ap.add_argument("--compare-cap-s", type=float, default=150.0)
    ap.add_argument("--bench-cap-s", type=float, default=150.0)
    ap.add_argument("--memory-cap-s", type=float, default=120.0)
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    ap.add_argument("--peak-stream", help=argparse.SUPPRESS)
    ap.add_argument("--error-child", help=argparse.SUPPRESS)
    ap.add_argument("--ref64", help=argparse.SUPPRESS)
    ap.add_argument("--cand-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--tf32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.error_child:
        error_child(args.error_child, args.ref64, args.cand_dtype, args.tf32, args.device)
        return 0
    if args.peak_child:
        peak_child(args.peak_child, args.device, args.memory_batch, args.peak_stream)
        return 0
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.ports = [p for p in args.ports.split(",") if p]
    bad = [p for p in args.precisions if p not in PRECISIONS] + \
        [p for p in args.ports if p not in PORTS]
    if bad:
        print(f"error: unknown precision/port {', '.join(bad)}", file=sys.stderr)
        return 2
    args.bench_batches = [int(b) for b in args.bench_batches.split(",") if b]
    args.jobs = args.jobs or (2 if args.device == "cuda" else 1)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False (use --device cpu)",
              file=sys.stderr)
        return 2
    from layerdiff.demo import build_scenario, write_correct_port

    budget = Budget(args.budget_s)
    t0 = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="device-check-"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "children.log"
    log.write_text("")
    res: dict[str, Any] = {"env": _env(args.device), "batch": args.batch,
                           "budget_s": args.budget_s}
    print(f"device check: {res['env']}, results in {out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="device-check-work-") as tmp:
        work = Path(tmp)
        sc = build_scenario(work / "demo")  # what `layerdiff demo --keep` writes
        write_correct_port(sc, sc.fixed)  # the hand-made correct port
        print(f"scenario built ({time.perf_counter() - t0:.0f}s); compares:", flush=True)
        res["compares"] = run_compares(sc, args, budget, out, work, log)
        res["bench"] = run_bench(args, budget, out, log) if args.bench_batches else []
        res["memory"] = run_memory(sc, args, budget, work, log) if args.memory_batch else []
    res["seconds"] = time.perf_counter() - t0
    res["ok"] = all(r["ok"] for r in res["compares"]) and \
        all("ratio" in b for b in res["bench"]) and all("records" in m for m in res["memory"])
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / "results.md").write_text(md)
    print("\n" + md, flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of big-model comparisons, with and without ``--stream``.

    python benchmarks/bench_memory.py [--workdir DIR] [--batch 32] [--skip-vgg] [--skip-resnet]
                                      [--keep]

Writes generated weights for two corpus prototxts (../shared/corpus) with a streaming V2
caffemodel writer (no protobuf objects, no model-sized buffers: a 550 MB VGG16 caffemodel is
written in 16 MB chunks), then runs each case as its own ``python -m layerdiff`` process:

- VGG16 (138 M parameters, ~553 MB caffemodel), batch 1: ``compare`` against itself, plain and
  with ``--stream``: weights dominate.
- ResNet-50 (25.6 M parameters), batch ``--batch`` (32): ``run --stream``, ``compare --stream``
  with and without the float64 noise floor, and the unstreamed ``run``/``compare`` when they
  fit this machine's memory (otherwise at the largest batch that fits, plus the estimate):
  activations dominate.

Peak RSS comes from the kernel (``os.wait4``: the child's ``ru_maxrss``, what
``getrusage(RUSAGE_CHILDREN)`` reports for a single child). ``/proc/PID/status`` is sampled
every 50 ms as well, to split the peak into anonymous memory (heap: arrays, weights) and
file-backed pages (the caffemodel's pages, memory-mapped stream files): file pages count in
RSS but are page cache the kernel can drop; anonymous memory is what can run a machine out of
memory. Prints one table; nothing is timed for speed.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
MB = 1 << 20


# -- a streaming V2 caffemodel writer -----------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _key(num: int, wire: int = 2) -> bytes:
    return _varint(num << 3 | wire)


def _len_field(num: int, payload: bytes) -> bytes:
    return _key(num) + _varint(len(payload)) + payload


def _values(layer_type: str, index: int, shape: tuple[int, ...], rng, count: int,
            chunk: int):
    """Chunks of plausible float32 values for blob ``index`` of a layer (keeps nets finite)."""
    fan_in = max(1, math.prod(shape[1:]))
    done = 0
    while done < count:
        n = min(chunk, count - done)
        if layer_type == "BatchNorm":  # mean, variance, moving-average factor
            v = (rng.standard_normal(n) * 0.1 if index == 0 else
                 rng.uniform(0.5, 1.5, n) if index == 1 else np.ones(n))
        elif layer_type == "Scale":
            v = rng.uniform(0.5, 1.5, n) if index == 0 else rng.standard_normal(n) * 0.1
        elif index == 0:  # conv / inner product weights: He init
            v = rng.standard_normal(n, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
        else:
            v = rng.standard_normal(n) * 0.01
        yield np.asarray(v, dtype="<f4").tobytes()
        done += n


def write_caffemodel(prototxt: Path, out: Path, shape: tuple[int, ...], seed: int = 0,
                     chunk: int = 4 << 20) -> int:
    """Write generated weights for ``prototxt`` as a V2 caffemodel; returns its size in bytes.

    Each layer's message length is computed from the blob shapes first, so the float data can
    be streamed in ``chunk``-value pieces: memory stays at a few chunks whatever the model.
    """
    from layerdiff.caffe import load_caffe
    from layerdiff.engine import make_plan

    plan = make_plan(load_caffe(prototxt=prototxt, shape=shape))
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        fh.write(_len_field(1, b"generated"))
        for p in plan.layers:
            if not p.expected_blobs:
                continue
            heads = []
            for s in p.expected_blobs:
                shape_msg = _len_field(7, _len_field(1, b"".join(_varint(int(d)) for d in s)))
                nbytes = 4 * math.prod(s)
                data_head = _key(5) + _varint(nbytes)
                blob_len = len(shape_msg) + len(data_head) + nbytes
                heads.append((s, _key(7) + _varint(blob_len) + shape_msg + data_head))
            name = _len_field(1, p.layer.name.encode()) + _len_field(2, p.layer.type.encode())
            layer_len = len(name) + sum(len(h) + 4 * math.prod(s) for s, h in heads)
            fh.write(_key(100) + _varint(layer_len) + name)
            for i, (s, head) in enumerate(heads):
                fh.write(head)
                for piece in _values(p.layer.type, i, s, rng, math.prod(s), chunk):
                    fh.write(piece)
    tmp.replace(out)
    return out.stat().st_size


def model_dir(work: Path, corpus_name: str, shape: tuple[int, ...]) -> Path:
    """deploy.prototxt + generated weights in ``work/corpus_name`` (reused when present)."""
    d = work / corpus_name
    model = d / "generated.caffemodel"
    if not model.exists():
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / corpus_name / "deploy.prototxt", d / "deploy.prototxt")
        t0 = time.perf_counter()
        size = write_caffemodel(d / "deploy.prototxt", model, shape)
        print(f"wrote {model} ({size / MB:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return d


# -- measuring a child ---------------------------------------------------------------------------
def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(argv: list[str], env: dict[str, str]) -> dict:
    """Run ``python -m layerdiff ARGV``; peak RSS (kernel) and sampled anon/file peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "layerdiff", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            st = _proc_status(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], st.get(k, 0))
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    return {"rc": proc.returncode, "maxrss": usage.ru_maxrss * 1024, "anon": peaks["RssAnon"],
            "file": peaks["RssFile"], "seconds": time.perf_counter() - t0,
            "stderr": stderr.decode(errors="replace").strip().splitlines()[-1:]}


def net_sizes(d: Path, shape: tuple[int, ...]) -> dict[str, float]:
    """Weights, largest activation and the sum of every record's output (float32 bytes)."""
    from layerdiff.caffe import load_caffe
    from layerdiff.engine import make_plan

    plan = make_plan(load_caffe(prototxt=d / "deploy.prototxt", shape=shape))
    acts = [4 * math.prod(s) for p in plan.layers for s in (p.top_shapes or [])]
    weights = sum(4 * math.prod(s) for p in plan.layers for s in p.expected_blobs)
    return {"weights": weights, "max_act": max(acts), "sum_acts": sum(acts)}


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# -- the cases ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir())
                    / "layerdiff-bench-memory", help="generated models and stream files")
    ap.add_argument("--batch", type=int, default=32, help="ResNet-50 batch size")
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated caffemodels")
    args = ap.parse_args()
    if not CORPUS.is_dir():
        sys.exit(f"corpus not found at {CORPUS}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COLUMNS="200")
    rows: list[tuple[str, dict, dict[str, float]]] = []

    def case(label: str, argv: list[str], sizes: dict[str, float]) -> None:
        stream = work / "stream"
        shutil.rmtree(stream, ignore_errors=True)
        argv = [a if a != "STREAM" else str(stream) for a in argv]
        r = measure(argv, env)
        shutil.rmtree(stream, ignore_errors=True)
        rows.append((label, r, sizes))
        print(f"{label:50s} rc {r['rc']}  peak RSS {r['maxrss'] / MB:7.0f} MiB  "
              f"(anon {r['anon'] / MB:6.0f}, file {r['file'] / MB:6.0f})  "
              f"{r['seconds']:5.0f} s  {' '.join(r['stderr']) if r['rc'] not in (0, 1) else ''}",
              flush=True)

    if not args.skip_vgg:
        shape = (1, 3, 224, 224)
        d = model_dir(work, "vgg16_v2format", shape)
        sz = net_sizes(d, shape)
        # the corpus prototxt declares batch 10: --shape makes it the batch-1 case
        base = ["compare", str(d), str(d), "--shape", "1,3,224,224", "--input", "randn:0",
                "--summary-only"]
        case("VGG16 b1 compare", base, sz)
        case("VGG16 b1 compare --stream", base + ["--stream", "STREAM"], sz)
        case("VGG16 b1 compare --stream --no-noise-floor",
             base + ["--stream", "STREAM", "--no-noise-floor"], sz)

    if not args.skip_resnet:
        b = args.batch
        shape = (b, 3, 224, 224)
        d = model_dir(work, "resnet50_kaiminghe", (1, 3, 224, 224))
        sz = net_sizes(d, shape)
        shp = ",".join(map(str, shape))
        # Anonymous memory measured per float32 trace size S (see docs/hardening.md): a
        # compare holds ~5.3 S unstreamed (two traces, a float64 one, the diagnosis' re-run
        # outputs) and ~3.2 S streamed. A case that would not fit runs at a smaller batch.
        avail = mem_available()

        def fits(factor: float, s: dict[str, float]) -> bool:
            return factor * s["sum_acts"] < 0.85 * avail

        def smaller(factor: float) -> tuple[int, dict[str, float]]:
            n = b
            while n > 1 and not fits(factor, net_sizes(d, (n, 3, 224, 224))):
                n //= 2
            return n, net_sizes(d, (n, 3, 224, 224))

        def cmp_argv(n: int) -> list[str]:
            return ["compare", str(d), str(d), "--shape", f"{n},3,224,224", "--input",
                    "randn:0", "--summary-only"]

        run = ["run", str(d), "--shape", shp, "--input", "randn:0"]
        case(f"ResNet-50 b{b} run --stream", run + ["--stream", "STREAM"], sz)
        if fits(1.2, sz):
            case(f"ResNet-50 b{b} run", run, sz)
        case(f"ResNet-50 b{b} compare --stream --no-noise-floor",
             cmp_argv(b) + ["--stream", "STREAM", "--no-noise-floor"], sz)
        n, sz_n = (b, sz) if fits(3.2, sz) else smaller(3.2)
        case(f"ResNet-50 b{n} compare --stream", cmp_argv(n) + ["--stream", "STREAM"], sz_n)
        n, sz_n = (b, sz) if fits(5.3, sz) else smaller(5.3)
        if n != b:
            print(f"ResNet-50 b{b} compare without --stream needs ~{5.3 * sz['sum_acts'] / MB:.0f}"
                  f" MiB, {avail / MB:.0f} MiB available: measured at batch {n}", flush=True)
            case(f"ResNet-50 b{n} compare --stream", cmp_argv(n) + ["--stream", "STREAM"],
                 sz_n)
        case(f"ResNet-50 b{n} compare", cmp_argv(n), sz_n)

    print()
    print("sizes (float32): W = weights, A = largest activation, S = sum of all activations;"
          " B = W + 4A, what a streamed run should need")
    hdr = (f"{'case':50s} {'peak RSS':>9s} {'anon':>7s} {'file':>7s}  {'W':>5s} {'A':>5s} "
           f"{'S':>6s}  {'RSS/B':>6s} {'anon/B':>6s} {'anon/S':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for label, r, s in rows:
        budget = s["weights"] + 4 * s["max_act"]
        print(f"{label:50s} {r['maxrss'] / MB:8.0f}M {r['anon'] / MB:6.0f}M "
              f"{r['file'] / MB:6.0f}M  {s['weights'] / MB:4.0f}M {s['max_act'] / MB:4.0f}M "
              f"{s['sum_acts'] / MB:5.0f}M  {r['maxrss'] / budget:6.1f} {r['anon'] / budget:6.1f} "
              f"{r['anon'] / s['sum_acts']:6.2f}")
    print("(MiB; peak RSS = the child's ru_maxrss from the kernel, which counts memory-mapped "
          "stream pages once read; anon/file = sampled peaks of RssAnon/RssFile)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

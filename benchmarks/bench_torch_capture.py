"""Capture overhead: plain ResNet-50 forward vs ``capture_torch``, side by side in one run.

    .venv/bin/python benchmarks/bench_torch_capture.py [--rounds 31] [--threads N]
        [--device cpu|cuda] [--batch N] [--json FILE]

torchvision-style ResNet-50 (tests/torch_models.py), input Nx3x224x224 float32 (batch 1 on the
CPU by default). On CUDA every timed call ends with the outputs on the host (capture) or a
``torch.cuda.synchronize`` (plain forward), so both count the whole GPU work. Rounds
interleave plain / fx capture / hooks capture so machine load hits all alike; medians are
printed with the capture/plain ratio of medians and the median of per-round ratios ("paired",
steadier when other processes load the machine). "first" is the first fx capture of a fresh
model (trace and graph instrumentation included; later captures reuse the cached graph).

A capture must keep every layer's output (~128 MB here) where a plain forward reuses a few
buffers, so with glibc's defaults, which hand freed memory back to the OS, every capture writes
into fresh pages (~19k minor page faults). The second table reruns the benchmark in a child
process started with ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296``
(freed memory stays in the process), which is what repeated captures see with those settings.
``--no-tuned`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from layerdiff.adapters.torch import capture_torch  # noqa: E402
from timing import interleaved  # noqa: E402
from torch_models import resnet50  # noqa: E402

_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per run: median and min ms, ratio of medians to the plain forward, paired ratio."""
    plain = times["plain forward"]
    base = statistics.median(plain)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        # paired: median over rounds of this round's time / this round's plain forward
        paired = statistics.median(t / p for t, p in zip(ts, plain, strict=True))
        out[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "ratio": med / base,
                     "paired": paired}
    return out


def _table(title: str, times: dict[str, list[float]]) -> None:
    print(title)
    print(f"  {'':18}{'median ms':>10}{'min ms':>9}{'ratio':>8}{'paired':>8}")
    for name, s in _summary(times).items():
        print(f"  {name:18}{s['median_ms']:10.1f}{s['min_ms']:9.1f}{s['ratio']:8.2f}x"
              f"{s['paired']:7.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--no-tuned", action="store_true", help="skip the tuned-malloc table")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-hooks", action="store_true", help="time the fx capture only")
    ap.add_argument("--json", metavar="FILE", help="also write the first table as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    dev = torch.device(args.device)
    model = resnet50().to(dev)
    x = np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)
    xt = torch.from_numpy(x).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    first = capture_torch(model, x, device=args.device)
    cold = time.perf_counter() - t0
    assert first.meta["capture"] == "fx", first.meta

    def plain() -> None:
        with torch.no_grad():
            model(xt)
        sync()

    runs: dict[str, Callable[[], object]] = {
        "plain forward": plain,
        "capture (fx)": lambda: capture_torch(model, x, device=args.device),
    }
    if not args.no_hooks:
        runs["capture (hooks)"] = lambda: capture_torch(model, x, device=args.device,
                                                        prefer_graph=False)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"ResNet-50 {args.batch}x3x{args.size}x{args.size} float32 {where}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved "
          f"rounds, {len(first)} records, {first.meta['lazy_clones']} lazy clones (fx), "
          f"{sum(a.nbytes for r in first for a in r.outputs) / 2 ** 20:.0f} MiB of outputs")
    out_bytes = sum(a.nbytes for r in first for a in r.outputs)
    del first
    times = interleaved(runs, args.rounds)
    tuned = all(os.environ.get(k) == v for k, v in _TUNED_ENV.items())
    _table("malloc tuned (MALLOC_*_THRESHOLD_):" if tuned else "default malloc settings:",
           times)
    print(f"  {'first fx capture':18}{cold * 1e3:10.1f}{'':9}"
          f"{cold / statistics.median(times['plain forward']):8.2f}x  (trace + instrument)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": where, "batch": args.batch, "size": args.size, "rounds": args.rounds,
            "torch": torch.__version__, "malloc_tuned": tuned, "first_fx_ms": cold * 1e3,
            "output_bytes": out_bytes,
            "runs": _summary(times)}, indent=1))
    if not args.no_tuned and not tuned:
        sys.stdout.flush()
        child = [sys.executable, __file__, "--no-tuned", "--rounds", str(args.rounds),
                 "--threads", str(args.threads), "--size", str(args.size),
                 "--device", args.device, "--batch", str(args.batch)]
        if args.no_hooks:
            child.append("--no-hooks")
        out = subprocess.run(child, env={**os.environ, **_TUNED_ENV}, check=True,
                             capture_output=True, text=True).stdout
        print("".join(out.splitlines(keepends=True)[1:]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

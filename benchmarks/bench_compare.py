"""`layerdiff compare` on the demo's ResNet-50 (fixed port, ``ones:0.5``, with diagnosis) next to
its floor: import torch + load both models + one torch forward + one NumPy forward.

    layerdiff demo --keep /tmp/demo        # writes caffe_resnet50/ and torch_port_fixed/
    python benchmarks/bench_compare.py /tmp/demo [--repeat 5]

Each run is a fresh process (imports count: a user pays them). Prints the medians side by side
and their ratio; on a shared 2-core machine timings are noisy, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = """
import sys
import numpy as np
import torch
import layerdiff
from layerdiff.adapters.torch_load import load_torch
from layerdiff.engine import make_plan, run_caffe
demo = sys.argv[1]
net = layerdiff.load_caffe(demo + "/caffe_resnet50")
model = load_torch(demo + "/torch_port_fixed").eval()
x = np.full(net.inputs["data"], 0.5, np.float32)
with torch.no_grad():
    model(torch.from_numpy(x))
run_caffe(make_plan(net), {"data": x})
"""


def _time(argv: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    took = time.perf_counter() - t
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo", type=Path, help="the folder `layerdiff demo --keep` wrote")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    demo = args.demo.resolve()
    for sub in ("caffe_resnet50", "torch_port_fixed"):
        if not (demo / sub).is_dir():
            sys.exit(f"{demo / sub}: missing; run `layerdiff demo --keep {demo}` first")
    runs = {
        "baseline (import torch + load + torch forward + NumPy forward)":
            [sys.executable, "-c", BASELINE, str(demo)],
        "layerdiff compare (fixed port, ones:0.5, with diagnosis)":
            [sys.executable, "-m", "layerdiff", "compare", str(demo / "caffe_resnet50"),
             str(demo / "torch_port_fixed"), "--input", "ones:0.5", "--summary-only"],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):  # interleaved, so machine load hits both alike
        for name, argv in runs.items():
            times[name].append(_time(argv))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:<66} median {med[name]:6.2f} s  (runs: "
              + ", ".join(f"{t:.2f}" for t in ts) + ")")
    base, comp = med.values()
    print(f"ratio compare / baseline: {comp / base:.2f}x")


if __name__ == "__main__":
    main()

"""Load a ResNet-50 caffemodel: layerdiff's reader vs OpenCV's readNetFromCaffe, side by side.

    python benchmarks/bench_load.py [--repeat 7]

Builds the caffemodel from ../shared/golden/nets/resnet50_kaiminghe with the golden recipe
(about 100 MB), then times, alternating, `load_caffe` (parse + blobs) and `load_caffe` +
`make_plan` (shape inference and blob checks) against `cv2.dnn.readNetFromCaffe`
(requires `pip install "opencv-python-headless<5"`). Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    import cv2

    from layerdiff.caffe import load_caffe
    from layerdiff.engine import make_plan

    src = GOLDEN / "nets" / "resnet50_kaiminghe"
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "resnet50.caffemodel"
        subprocess.run([sys.executable, str(GOLDEN / "make_caffemodel.py"), str(src), str(model)],
                       check=True)
        proto = src / "deploy.prototxt"
        print(f"caffemodel: {model.stat().st_size / 1e6:.1f} MB")

        def ours():
            load_caffe(prototxt=proto, weights=model)

        def ours_planned():
            make_plan(load_caffe(prototxt=proto, weights=model))

        def opencv():
            cv2.dnn.readNetFromCaffe(str(proto), str(model))

        times: dict[str, list[float]] = {"layerdiff load": [], "layerdiff load+plan": [],
                                         "opencv readNetFromCaffe": []}
        fns = dict(zip(times, (ours, ours_planned, opencv), strict=True))
        for fn in fns.values():
            fn()  # warm the page cache and imports
        for _ in range(args.repeat):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:26s} median {v * 1000:8.1f} ms  (n={args.repeat})")
    cv = med["opencv readNetFromCaffe"]
    print(f"ratio load / opencv:      {med['layerdiff load'] / cv:.2f}x")
    print(f"ratio load+plan / opencv: {med['layerdiff load+plan'] / cv:.2f}x")


if __name__ == "__main__":
    main()

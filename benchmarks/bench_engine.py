"""ResNet-50 forward (1x3x224x224, float32), side by side in one run:
layerdiff's NumPy engine vs torch eager CPU (same architecture and weights) vs OpenCV dnn
(fusion off).

    python benchmarks/bench_engine.py [--repeat 9]

The weights come from ../shared/golden/nets/resnet50_kaiminghe (recipe). The torch model is
the torchvision-style port in tests/ports.py loaded from the same blobs (outputs are checked
to agree first). OpenCV needs `pip install "opencv-python-headless<5"`. Prints medians and
ratios; timings on a shared 2-core machine are noisy, so compare ratios from one run.

This machine sets OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for old OpenBLAS builds; they make a
current numpy pick a slower GEMM kernel. To measure without them, unset both for this
command only: `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_engine.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--no-opencv", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch
    from golden import load_golden
    from ports import load_resnet50_from_caffe

    from layerdiff.engine import make_plan, run_caffe
    from layerdiff.engine.runner import tune_allocator

    tune_allocator()
    g = load_golden(GOLDEN / "nets" / "resnet50_kaiminghe")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    plan = make_plan(g.net)
    model = load_resnet50_from_caffe(g.net).eval()
    xt = torch.from_numpy(x)

    ours_out = run_caffe(plan, {"data": x})["fc1000"].output
    with torch.no_grad():
        torch_out = model(xt).numpy()
    print(f"agreement ours vs torch: max abs {np.abs(ours_out - torch_out).max():.2e}")

    fns = {"layerdiff engine": lambda: run_caffe(plan, {"data": x})}

    def torch_fwd():
        with torch.no_grad():
            model(xt)

    fns["torch eager"] = torch_fwd
    if not args.no_opencv:
        import cv2

        tmp = tempfile.mkdtemp()
        weights = Path(tmp) / "r50.caffemodel"
        mk = GOLDEN / "make_caffemodel.py"
        os.system(f"{sys.executable} {mk} {g.path} {weights}")
        net = cv2.dnn.readNetFromCaffe(str(g.path / "deploy.prototxt"), str(weights))
        net.enableFusion(False)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

        def cv_fwd():
            net.setInput(x)
            net.forward()

        fns["opencv dnn"] = cv_fwd
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch threads {torch.get_num_threads()}, OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    for k, v in med.items():
        print(f"{k:18s} median {v * 1000:8.1f} ms  (n={args.repeat})")
    ours = med["layerdiff engine"]
    print(f"ratio engine / torch eager: {ours / med['torch eager']:.2f}x (target <= 1.0)")
    if "opencv dnn" in med:
        print(f"ratio engine / opencv dnn:  {ours / med['opencv dnn']:.2f}x (target <= 1.25)")


if __name__ == "__main__":
    main()

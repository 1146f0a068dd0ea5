"""Micro-benchmark: the engine's convolution on ResNet-50's conv layers vs torch eager CPU.

Runs every convolution of a Caffe ResNet-50 (1x3x224x224, float32, stride on the first 1x1 of
each downsampling block as in KaimingHe's deploy files) through ``conv_forward`` and through
``torch.nn.functional.conv2d``, and prints the sum of per-layer best times of each and their ratio.

    python benchmarks/conv_gemm.py [--repeat 5] [--dtype float32] [--threads N]

``--threads`` sets torch's thread count; set OPENBLAS_NUM_THREADS to the same for NumPy.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from layerdiff.engine.conv import Geometry, conv_forward


def resnet50_convs() -> list[tuple[str, int, int, int, int, int, int]]:
    """(name, C_in, C_out, H_in, kernel, stride, pad) for each convolution, in order."""
    convs = [("conv1", 3, 64, 224, 7, 2, 3)]
    cin, h = 64, 56  # after the 3x3/2 max pool
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            s = 2 if stage > 0 and b == 0 else 1
            if b == 0:
                convs.append((f"res{stage + 2}a_proj", cin, 4 * width, h, 1, s, 0))
            convs.append((f"res{stage + 2}{b}_a", cin, width, h, 1, s, 0))
            h //= s
            convs.append((f"res{stage + 2}{b}_b", width, width, h, 3, 1, 1))
            convs.append((f"res{stage + 2}{b}_c", width, 4 * width, h, 1, 1, 0))
            cin = 4 * width
    return convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    cases = []
    for name, cin, cout, h, k, s, p in resnet50_convs():
        x = rng.standard_normal((1, cin, h, h)).astype(dtype)
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype) * 0.1
        cases.append((name, x, w, b, Geometry((k, k), (s, s), (p, p), (1, 1))))

    tc = [(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
          for _, x, w, b, _ in cases]

    def ours(i: int) -> None:
        _, x, w, b, g = cases[i]
        conv_forward(x, w, b, g, 1)

    def theirs(i: int) -> None:
        g = cases[i][4]
        with torch.no_grad():
            torch.nn.functional.conv2d(*tc[i], g.stride, g.pad)

    # A shared machine is noisy: alternate whole passes of each and keep every layer's best
    # time. (Alternating per layer would time the other library's spinning worker threads.)
    best_ours = [float("inf")] * len(cases)
    best_ref = [float("inf")] * len(cases)
    for _ in range(args.repeat + 1):
        for best, fn in ((best_ours, ours), (best_ref, theirs)):
            for i in range(len(cases)):
                best[i] = min(best[i], _timed(fn, i))
    mine, ref = defaultdict(float), defaultdict(float)
    for i, (name, *_, g) in enumerate(cases):
        mine[_kind(name, g)] += best_ours[i]
        ref[_kind(name, g)] += best_ref[i]
    err = max(float(np.abs(conv_forward(x, w, b, g, 1) - torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), g.stride, g.pad).numpy())
        .max()) for _, x, w, b, g in cases)
    print(f"{len(cases)} convolutions, {args.dtype}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; max |ours - torch| = {err:.2e}")
    print(f"{'kind':<12}{'ours s':>10}{'torch s':>10}{'ratio':>8}")
    for kind in sorted(ref):
        print(f"{kind:<12}{mine[kind]:>10.4f}{ref[kind]:>10.4f}{mine[kind] / ref[kind]:>8.2f}")
    to, tt = sum(mine.values()), sum(ref.values())
    print(f"{'total':<12}{to:>10.4f}{tt:>10.4f}{to / tt:>8.2f}")


def _kind(name: str, g: Geometry) -> str:
    if name == "conv1":
        return "7x7 stem"
    if g.kernel == (1, 1):
        return "1x1" if g.stride == (1, 1) else "1x1 s2"
    return "3x3"


def _timed(fn, i: int) -> float:
    t0 = time.perf_counter()
    fn(i)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

"""Alignment cost on ResNet-50: the demo's torchvision-style port against the Caffe model as it is
and with every BatchNorm + Scale folded into its conv (tests/fold_ports.py).

    .venv/bin/python benchmarks/bench_align.py [--rounds 9]

Both traces are captured once; each round then times ``align()`` (names, weight fingerprints,
order, groups) for the two references, interleaved so machine load hits both alike. The port's
layer names differ from Caffe's, so nearly every weighted layer pairs by fingerprint: exact
weights in the first case, kernels scaled per output channel in the second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fold_ports import load_folded  # noqa: E402
from golden import GOLDEN, load_golden  # noqa: E402
from ports import load_resnet50_from_caffe  # noqa: E402

import layerdiff  # noqa: E402
from layerdiff.align import align  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    net = load_golden(GOLDEN / "nets" / "resnet50_seed_ones").net
    port = load_resnet50_from_caffe(net)
    with tempfile.TemporaryDirectory() as tmp:
        folded = load_folded(net, Path(tmp) / "folded")
        cases = {}
        for label, ref in (("as is", net), ("BN folded", folded)):
            rep = layerdiff.compare(ref, port, "ones:0.5", diagnose=False)
            cases[label] = (rep.reference, rep.candidate, "PASS" if rep else "FAIL")
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(args.rounds):
        for label, (ref, cand, _) in cases.items():
            t = time.perf_counter()
            al = align(ref, cand)
            times[label].append(time.perf_counter() - t)
    print(f"{'reference':<10} {'records':>9} {'pairs':>6} {'fingerprint':>11} "
          f"{'verdict':>7} {'align median':>13}")
    for label, (ref, cand, verdict) in cases.items():
        al = align(ref, cand)
        print(f"{label:<10} {len(ref):>4}/{len(cand):<4} {len(al.pairs):>6} "
              f"{al.methods().get('fingerprint', 0):>11} {verdict:>7} "
              f"{1e3 * statistics.median(times[label]):>10.1f} ms")


if __name__ == "__main__":
    main()

"""What the graph probes (issue 12: ops with no twin, conv geometry) add to a diagnosis.

    python benchmarks/bench_graph_probes.py [--repeat 5]

For three planted ports (the built-in example with an extra ReLU before the residual add, with
``amax`` for its global AVE pooling, and the golden ResNet-50 with torchvision's v1.5 strides),
compares once without diagnosis, then times ``diagnose(report)`` with every probe and with the
graph probes left out, alternating. Prints medians side by side and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import layerdiff  # noqa: E402
from layerdiff.diagnose import diagnose  # noqa: E402
from layerdiff.diagnose import probes as registry  # noqa: E402
from layerdiff.examples import write_example  # noqa: E402

GRAPH = {"activation_inserted", "activation_missing", "global_pool_kind", "conv_geometry",
         "permute_inserted"}


def _cases() -> list[tuple[str, object, object]]:
    from golden import GOLDEN, load_golden
    from graph_ports import ExamplePort
    from ports import load_resnet50_from_caffe

    path = Path(tempfile.mkdtemp()) / "example"
    write_example(path)
    example = layerdiff.load_caffe(path)
    r50 = load_golden(GOLDEN / "nets" / "resnet50_seed_ones").net
    v15 = load_resnet50_from_caffe(r50)
    for layer in (v15.layer2, v15.layer3, v15.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (1, 1), (2, 2)
    return [("extra ReLU", example, ExamplePort(extra_relu=True).eval()),
            ("amax pooling", example, ExamplePort(global_pool="amax").eval()),
            ("ResNet-50 v1.5", r50, v15)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    every = registry.all_probes()
    without = [p for p in every if p.name not in GRAPH]
    for name, ref, port in _cases():
        report = layerdiff.compare(ref, port, "ones:0.5", diagnose=False)
        times: dict[str, list[float]] = {"with": [], "without": []}
        found: dict[str, list[str]] = {}
        for _ in range(args.repeat):
            for label, probes in (("with", every), ("without", without)):
                registry.PROBES[:] = probes
                t = time.perf_counter()
                found[label] = [f.kind for f in diagnose(report)]
                times[label].append(time.perf_counter() - t)
        registry.PROBES[:] = every
        a, b = (statistics.median(times[k]) for k in ("with", "without"))
        print(f"{name:15s} diagnose with graph probes {a:.3f} s, without {b:.3f} s, "
              f"ratio {a / b:.2f}; findings {found['with']} vs {found['without']}")


if __name__ == "__main__":
    main()

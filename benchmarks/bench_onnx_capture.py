"""ONNX capture overhead and ``layerdiff compare caffe/ model.onnx`` end to end, side by side.

    .venv/bin/python benchmarks/bench_onnx_capture.py [--rounds 15] [--e2e-rounds 3] [--fold]

Builds the demo's Caffe ResNet-50 and its (fixed) torch port in a temporary folder and exports
the port with ``torch.onnx.export(dynamo=False)`` (BatchNorm nodes kept; ``--fold`` exports
with constant folding, BN merged into the convs), input 1x3x224x224 float32.

Table 1, rounds interleaved so machine load hits all alike, medians and the ratio of medians
("paired": median of per-round ratios, steadier on a loaded machine):
- ``plain run``: ``InferenceSession.run`` with the graph's own outputs (optimizations off, as
  layerdiff runs it), session reused;
- ``every value run``: the same with every node output added as a graph output (what
  ``capture_onnx`` runs), session reused;
- ``plain session+run``: what a user's one-off run costs: load the bytes, session, run;
- ``capture_onnx``: layerdiff's whole capture (graph copy, session, run, one record per node).

Table 2, end to end in fresh processes: ``layerdiff compare CAFFE_DIR model.onnx`` against a
baseline process doing the least such a comparison needs: import layerdiff and onnxruntime,
load the Caffe model, one onnxruntime session + run, one float32 NumPy-engine forward.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from timing import interleaved

BASELINE = """
import sys, numpy as np, onnxruntime as ort
import layerdiff
from layerdiff.engine import run_caffe
from layerdiff.adapters.onnx_capture import session_options
net = layerdiff.load_caffe(sys.argv[1])
x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
s = ort.InferenceSession(open(sys.argv[2], "rb").read(), session_options(ort),
                         providers=["CPUExecutionProvider"])
s.run(None, {s.get_inputs()[0].name: x})
run_caffe(net, {"data": x})
"""


def _table(title: str, times: dict[str, list[float]], base_of: dict[str, str]) -> None:
    print(title)
    print(f"  {'':22}{'median ms':>10}{'min ms':>9}{'vs':>20}{'ratio':>8}{'paired':>8}")
    for name, ts in times.items():
        base = base_of.get(name)
        med = statistics.median(ts)
        if base is None:
            print(f"  {name:22}{med * 1e3:10.1f}{min(ts) * 1e3:9.1f}")
            continue
        bs = times[base]
        paired = statistics.median(t / b for t, b in zip(ts, bs, strict=True))
        print(f"  {name:22}{med * 1e3:10.1f}{min(ts) * 1e3:9.1f}{base:>20}"
              f"{med / statistics.median(bs):7.2f}x{paired:7.2f}x")


def _build(root: Path, fold: bool) -> tuple[Path, Path]:
    import torch
    from layerdiff.adapters.torch import load_torch

    from layerdiff.demo import build_scenario, write_correct_port

    sc = build_scenario(root / "scenario")
    write_correct_port(sc, sc.fixed)  # the hand-made correct port
    model = root / "resnet50.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(load_torch(sc.fixed), torch.zeros(1, 3, 224, 224), str(model),
                          dynamo=False, input_names=["data"], do_constant_folding=fold)
    return sc.caffe, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--e2e-rounds", type=int, default=3)
    ap.add_argument("--fold", action="store_true", help="export with BN folded into the convs")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    from layerdiff.adapters.onnx import capture_onnx, load_onnx
    from layerdiff.adapters.onnx_capture import session_options

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        caffe_dir, path = _build(Path(tmp), args.fold)
        model = load_onnx(path)
        x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
        raw = path.read_bytes()
        plain = ort.InferenceSession(raw, session_options(ort), providers=["CPUExecutionProvider"])
        every = onnx.ModelProto()
        every.CopyFrom(model.proto)
        known = {o.name for o in every.graph.output}
        every.graph.output.extend(onnx.ValueInfoProto(name=o) for n in every.graph.node
                                  for o in n.output if o and o not in known)
        full = ort.InferenceSession(every.SerializeToString(), session_options(ort),
                                    providers=["CPUExecutionProvider"])

        def cold_plain() -> None:
            s = ort.InferenceSession(path.read_bytes(), session_options(ort),
                                     providers=["CPUExecutionProvider"])
            s.run(None, {"data": x})

        nodes = len(model.proto.graph.node)
        print(f"ResNet-50 ONNX ({nodes} nodes, {'BN folded' if args.fold else 'BN kept'}), "
              f"onnxruntime {ort.__version__}, {args.rounds} rounds")
        times = interleaved({
            "plain run": lambda: plain.run(None, {"data": x}),
            "every value run": lambda: full.run(None, {"data": x}),
            "plain session+run": cold_plain,
            "capture_onnx": lambda: capture_onnx(model, {"data": x}),
        }, args.rounds)
        _table("capture of every value vs a plain onnxruntime run", times,
               {"every value run": "plain run", "capture_onnx": "plain session+run"})

        e2e = {
            "baseline": [sys.executable, "-c", BASELINE, str(caffe_dir), str(path)],
            "layerdiff compare": [sys.executable, "-m", "layerdiff", "compare", str(caffe_dir),
                                  str(path), "--input", "uniform:-1,1:0", "--summary-only"],
        }
        runs = {k: (lambda cmd=cmd: subprocess.run(cmd, check=False, capture_output=True))
                for k, cmd in e2e.items()}
        t_e2e = interleaved(runs, args.e2e_rounds)
        _table("\nend to end, fresh processes: compare CAFFE_DIR model.onnx vs the baseline "
               "(import + load + one ORT run + one NumPy forward)", t_e2e,
               {"layerdiff compare": "baseline"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

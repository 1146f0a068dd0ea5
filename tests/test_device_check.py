"""benchmarks/device_check.py without a GPU: its results table and its refusals. (The whole run
takes minutes on a CPU: docs/gpu.md gives the rehearsal command.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("device_check",
                                                  ROOT / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("device_check", mod)
    spec.loader.exec_module(mod)
    return mod


dc = _load()


def _results() -> dict:
    return {
        "env": {"device_name": "NVIDIA H200", "torch": "2.11.0"}, "batch": 1, "ok": False,
        "seconds": 312.0,
        "compares": [
            {"precision": "fp32-tf32", "port": "fixed", "verdict": "precision (tf32), not a bug",
             "first_divergence": "conv1 <-> conv1", "ok": True, "why": "",
             "error_vs_float64": {"layers": 174, "median_rel": 4e-3, "max_rel": 0.22,
                                  "worst_layer": "res5c"}},
            {"precision": "bf16", "port": "buggy", "verdict": "error", "ok": False,
             "why": "timed out after 150s"},
        ],
        "bench": [{"batch": 8, "plain_ms": 10.0, "capture_ms": 12.0, "ratio": 1.2,
                   "paired": 1.19, "target_met": True, "output_gib": 1.0},
                  {"batch": 32, "error": "out of memory"}],
        "memory": [{"batch": 64, "stream": False, "records": 175, "device_peak_bytes": 2 ** 33,
                    "host_max_rss_bytes": 2 ** 34, "bytes_kept": 2 ** 33,
                    "stream_used": False}],
    }


def test_results_table():
    md = dc.markdown(_results())
    assert "# layerdiff device check (NVIDIA H200, torch 2.11.0, batch 1)" in md
    assert ("| fp32-tf32 | fixed | precision (tf32), not a bug | conv1 <-> conv1 | "
            "0.004 / 0.22 (res5c) | ok |") in md
    assert "| bf16 | buggy | error | - | - | FAILED: timed out after 150s |" in md
    assert "| 8 | 10.0 | 12.0 | 1.20x | 1.19x | yes | 1.00 GiB |" in md
    assert "| 32 | error: out of memory |" in md
    assert "| in memory | 64 | 8.00 GiB | 16.00 GiB | 8.00 GiB | no |" in md
    assert md.rstrip().endswith("all checks held: NO; wall time 312s")


def test_per_layer_error_skips_all_zero_references():
    pairs = [{"reference": "a", "max_abs": 1e-3, "ref_max_abs": 1.0, "passed": True},
             {"reference": "b", "max_abs": 0.0, "ref_max_abs": 0.0, "passed": True},
             {"reference": "c", "max_abs": 3e-3, "ref_max_abs": 0.1, "passed": False}]
    e = dc.per_layer_error(pairs)
    assert e["layers"] == 2 and e["worst_layer"] == "c" and e["failing"] == 1
    assert abs(e["max_rel"] - 0.03) < 1e-12 and abs(e["median_rel"] - 0.0155) < 1e-12


def test_refusals(capsys):
    assert dc.main(["--precisions", "fp8"]) == 2
    assert "unknown precision/port fp8" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert dc.main(["--device", "cuda"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err

"""The golden-net checks hold on every OpenBLAS kernel this CPU can run, with 1 or 2 threads.

Each kernel is forced with OPENBLAS_CORETYPE in a subprocess of its own (the rest of the suite
keeps the machine's setting: some machines set it on purpose), and the subprocess reports the
kernel OpenBLAS actually runs before it runs the checks, on two small nets (lenet_mnist, full
trace; mobilenet_v2_shicai, sampled) and one deep net (resnet50_seed_ones, where Caffe's own
float32 noise, not the 1e-4 floor, decides the bound).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from golden import require_shared
from openblas import corename, cpu_flags, runnable_kernels

TESTS = Path(__file__).parent
CHECKS = [
    "test_golden_nets.py::test_net_end_to_end[lenet_mnist]",
    "test_golden_nets.py::test_net_end_to_end[mobilenet_v2_shicai]",
    "test_golden_nets.py::test_net_end_to_end[resnet50_seed_ones]",
    "test_golden_nets.py::test_net_teacher_forced[lenet_mnist]",
    "test_golden_nets.py::test_float32_engine_rounds_like_caffe",
]
# Report the kernel from inside the process that runs the checks, then run them.
RUNNER = ("import sys; sys.path.insert(0, sys.argv[1]); import openblas, pytest; "
          "print('openblas kernel:', openblas.corename(), flush=True); "
          "sys.exit(pytest.main(sys.argv[2:]))")
KERNELS = runnable_kernels(cpu_flags())


def test_kernels_are_chosen_from_cpu_flags():
    avx2 = frozenset({"avx2", "fma", "avx", "ssse3", "sse2"})
    assert runnable_kernels(avx2) == ["Haswell", "Sandybridge", "Nehalem"]
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    assert runnable_kernels(avx512) == ["SkylakeX", "Haswell", "Sandybridge", "Nehalem"]
    assert runnable_kernels(frozenset({"avx512f", "sse2"})) == []  # never a kernel it lacks
    if "avx2" in cpu_flags():  # this CPU: at least three to force
        assert len(KERNELS) >= 3, KERNELS
    assert corename() if KERNELS else True  # the query works in this process too


# Both thread counts: with 2 threads OpenBLAS sums some GEMMs in another order (Haswell: ResNet-50
# on a constant input moves from 4.5e-7 to 1.3e-3 off Caffe, measured), so each is its own case.
CASES = [pytest.param(k, n, id=f"{k}-{n}thread") for k in KERNELS for n in (1, 2)]


@pytest.mark.parametrize(("kernel", "threads"), CASES or [("<none for this CPU>", 1)])
def test_golden_nets_under_forced_kernel(kernel, threads):
    if not KERNELS:
        pytest.skip("hardware: no x86-64 CPU flags in /proc/cpuinfo, no OpenBLAS kernel to force")
    require_shared()
    env = dict(os.environ, OPENBLAS_CORETYPE=kernel, OPENBLAS_NUM_THREADS=str(threads))
    args = [sys.executable, "-c", RUNNER, str(TESTS), "-q", "-p", "no:cacheprovider",
            "--rootdir", str(TESTS.parent), *(str(TESTS / c) for c in CHECKS)]
    res = subprocess.run(args, cwd=TESTS.parent, env=env, capture_output=True, text=True,
                         timeout=600)
    out = res.stdout + res.stderr
    ran = re.search(r"openblas kernel: (\S+)", out)
    assert ran and ran.group(1).lower() == kernel.lower(), f"asked {kernel}, ran {ran}:\n{out}"
    assert res.returncode == 0, out
    assert re.search(rf"\b{len(CHECKS)} passed\b", out) and "skipped" not in out, out

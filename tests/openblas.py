"""Which OpenBLAS kernel numpy's BLAS is running, and which kernels this CPU could run.

numpy's wheels bundle OpenBLAS built with DYNAMIC_ARCH: it picks a GEMM kernel for the CPU at
load time, unless ``OPENBLAS_CORETYPE`` forces one. Forcing a kernel whose instructions the CPU
lacks kills the process with SIGILL, so kernels are chosen from the CPU's flags.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

# Kernel name as OPENBLAS_CORETYPE spells it (and openblas_get_corename reports it), with the
# /proc/cpuinfo flags its code needs. Zen, Cooperlake and Prescott are left out: some builds
# alias them to Haswell, SkylakeX and Katmai, so forcing them may not run what they name.
KERNELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("SkylakeX", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})),
    ("Haswell", frozenset({"avx2", "fma"})),
    ("Sandybridge", frozenset({"avx"})),
    ("Nehalem", frozenset({"ssse3"})),
)
_CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty when /proc/cpuinfo has none, e.g. not x86)."""
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def runnable_kernels(flags: frozenset[str]) -> list[str]:
    return [name for name, needs in KERNELS if needs <= flags]


def _loaded_openblas() -> str:
    """Path of the OpenBLAS library numpy has loaded (numpy must be imported first)."""
    maps = Path("/proc/self/maps")
    if maps.is_file():
        for line in maps.read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if "openblas" in Path(path).name.lower() and ".so" in path:
                return path
    import numpy

    libs = Path(numpy.__file__).parent.parent / "numpy.libs"
    found = glob.glob(str(libs / "*openblas*.so*"))
    if not found:
        raise RuntimeError("numpy is not using a bundled OpenBLAS")
    return found[0]


def corename() -> str:
    """The kernel OpenBLAS is running in this process, as it names it (e.g. "Haswell")."""
    import numpy

    numpy.ones((2, 2)) @ numpy.ones((2, 2))  # the BLAS is loaded and initialised
    lib = ctypes.CDLL(_loaded_openblas())
    for symbol in _CORENAME_SYMBOLS:
        fn = getattr(lib, symbol, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return fn().decode()
    raise RuntimeError(f"no openblas_get_corename in {os.path.basename(_loaded_openblas())}")

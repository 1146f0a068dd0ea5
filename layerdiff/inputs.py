"""Input specs shared by ``run`` and ``compare``: ``ones:0.5``, ``randn:3``, ``npy:x.npy``, ...

Grammar (one spec for every input, or ``name=SPEC`` per input, comma-free between specs since
they are given as separate ``--input`` flags):

- ``ones[:V]`` / ``const:V``: every element V (``ones`` alone is 1.0);
- ``zeros``;
- ``randn[:SEED]``: standard normal, NumPy ``default_rng(SEED)`` (seed 0 by default);
- ``uniform:LO,HI[:SEED]``: uniform in [LO, HI);
- ``npy:PATH``: a saved array (``allow_pickle=False``); its batch and spatial size win over
  the model's, its rank (and for N,C,H,W inputs its channel count) must match.

Random inputs are drawn in float64 and then cast, so float32 and float64 runs see the same
values up to rounding. A constant input is the same in every channel: it cannot reveal a
BGR/RGB channel swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerdiff.errors import InputSpecError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    kind: str  # const | randn | uniform | npy
    value: float = 0.0
    low: float = 0.0
    high: float = 1.0
    seed: int = 0
    path: str = ""
    text: str = ""

    @property
    def channel_symmetric(self) -> bool:
        """True when every channel gets the same values (a BGR/RGB swap stays invisible)."""
        return self.kind == "const"

    def make(self, shape: Shape, name: str = "input") -> np.ndarray:
        if self.kind == "npy":
            return load_npy(self.path, name)
        if self.kind == "const":
            return np.full(shape, self.value, dtype=np.float64)
        rng = np.random.default_rng(self.seed)
        if self.kind == "randn":
            return rng.standard_normal(shape)
        return rng.uniform(self.low, self.high, size=shape)


def parse_spec(text: str) -> InputSpec:
    """Parse one spec (without a ``name=`` prefix)."""
    s = text.strip()
    kind, _, rest = s.partition(":")
    try:
        if kind == "ones":
            return InputSpec("const", value=_finite(rest) if rest else 1.0, text=s)
        if kind == "const":
            return InputSpec("const", value=_finite(rest), text=s)
        if kind == "zeros" and not rest:
            return InputSpec("const", value=0.0, text=s)
        if kind == "randn":
            return InputSpec("randn", seed=_seed(rest) if rest else 0, text=s)
        if kind == "uniform":
            rng, _, seed = rest.partition(":")
            lo, hi = (_finite(x) for x in rng.split(","))
            if not lo < hi or not np.isfinite(hi - lo):
                raise InputSpecError(f"--input {text!r}: uniform needs LO < HI (and a finite "
                                     "HI - LO)")
            return InputSpec("uniform", low=lo, high=hi, seed=_seed(seed) if seed else 0, text=s)
        if kind == "npy" and rest:
            return InputSpec("npy", path=rest, text=s)
    except ValueError:
        pass
    except _Invalid as e:
        raise InputSpecError(f"--input {text!r}: {e}") from None
    raise InputSpecError(
        f"--input {text!r} does not parse; use ones[:V], const:V, zeros, randn[:SEED], "
        "uniform:LO,HI[:SEED], npy:PATH, or NAME=SPEC")


class _Invalid(Exception):
    pass


def _finite(text: str) -> float:
    v = float(text)
    if not np.isfinite(v):
        raise _Invalid(f"{text.strip()} is not a finite number")
    return v


def _seed(text: str) -> int:
    v = int(text)
    if v < 0:
        raise _Invalid(f"seed {v} is negative; seeds are integers >= 0")
    return v


def parse_specs(texts: list[str] | str | None) -> dict[str | None, InputSpec]:
    """``["ones:0.5"]`` -> {None: spec}; ``["data=randn", "im_info=npy:x.npy"]`` -> by name."""
    if texts is None:
        texts = ["uniform:-1,1"]
    if isinstance(texts, str):
        texts = [texts]
    out: dict[str | None, InputSpec] = {}
    for t in texts:
        name, eq, spec = t.partition("=")
        key = name.strip() if eq and ":" not in name else None
        out[key] = parse_spec(spec if key is not None else t)
    return out


def make_inputs(specs: dict[str | None, InputSpec], shapes: dict[str, Shape],
                dtype: type = np.float32) -> dict[str, np.ndarray]:
    """One array per model input, from its spec (or the unnamed default spec)."""
    unknown = [k for k in specs if k is not None and k not in shapes]
    if unknown:
        raise InputSpecError(f"--input names unknown input(s) {unknown}; the model's inputs are "
                             f"{list(shapes)}")
    from layerdiff.engine.plan import MAX_ELEMENTS

    out = {}
    for name, shape in shapes.items():
        spec = specs.get(name) or specs.get(None)
        if spec is None:
            raise InputSpecError(f"no --input given for model input '{name}'")
        if spec.kind == "npy":
            arr = load_npy(spec.path, name)
            _check_npy_shape(spec.path, name, tuple(arr.shape), tuple(shape))
            out[name] = arr.astype(dtype)
            continue
        if any(int(d) <= 0 for d in shape):
            raise InputSpecError(f"input '{name}' has shape {list(shape)}; every dim must be > 0 "
                                 "(pass --shape N,C,H,W)")
        if math.prod(int(d) for d in shape) > MAX_ELEMENTS:
            raise InputSpecError(f"input '{name}' of shape {list(shape)} is absurdly large "
                                 f"(over {MAX_ELEMENTS} elements); refusing to allocate it")
        out[name] = spec.make(shape, name).astype(dtype)
    return out


def _check_npy_shape(path: str, name: str, got: Shape, want: Shape) -> None:
    """An array may change the batch and spatial size, not the rank or (N,C,H,W) channels."""
    if not want:
        return
    if len(got) != len(want):
        raise InputSpecError(f"--input npy:{path}: array of shape {list(got)} has {len(got)} "
                             f"dims, model input '{name}' has {len(want)} ({list(want)})")
    if len(want) == 4 and want[1] > 0 and got[1] != want[1]:
        raise InputSpecError(f"--input npy:{path}: array of shape {list(got)} has {got[1]} "
                             f"channels (axis 1), model input '{name}' has {want[1]} "
                             f"({list(want)})")


def load_npy(path: str | Path, name: str = "input") -> np.ndarray:
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise InputSpecError(f"--input npy:{p}: no such file") from None
    except (OSError, ValueError) as e:
        raise InputSpecError(f"--input npy:{p}: not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise InputSpecError(f"--input npy:{p}: input '{name}' must be a numeric array")
    return arr


def parse_shape(text: str) -> dict[str | None, Shape]:
    """``1,3,224,224`` or ``data=1,3,32,32`` (several joined by ``;``)."""
    out: dict[str | None, Shape] = {}
    for part in text.split(";"):
        name, eq, dims = part.partition("=")
        key, dims = (name.strip(), dims) if eq else (None, part)
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise InputSpecError(f"--shape {text!r}: expected positive integers like 1,3,224,224")
        out[key] = shape
    return out

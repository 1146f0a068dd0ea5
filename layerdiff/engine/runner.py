"""Run a planned Caffe net forward and record every layer's output in a :class:`Trace`."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerdiff.caffe.net import CaffeLayer, CaffeNet
from layerdiff.engine.plan import Plan, make_plan
from layerdiff.engine.registry import LayerImpl
from layerdiff.errors import InputSpecError, ModelFormatError, layer_error
from layerdiff.trace import Trace

DTYPES = {"float32": np.float32, "float64": np.float64}


def run_caffe(
    net: CaffeNet | Plan,
    inputs: dict[str, np.ndarray],
    dtype: str | type = "float32",
    stream_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Trace:
    """Forward ``inputs`` through the net and return the trace of every layer.

    ``dtype`` float32 reproduces Caffe; float64 gives a high-precision reference. Every layer,
    in-place ones included, gets its own record holding its own output array.
    """
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise InputSpecError(f"--dtype {dtype}: the Caffe engine runs float32 or float64")
    np_dtype = np.dtype(DTYPES[dtype] if isinstance(dtype, str) else dtype)
    if np_dtype not in (np.float32, np.float64):
        raise InputSpecError(f"--dtype {np_dtype}: the Caffe engine runs float32 or float64")
    if isinstance(net, Plan):
        plan, net = net, net.net
    else:
        plan = None
    missing = [name for name in net.inputs if name not in inputs]
    if missing:
        raise InputSpecError(
            f"no value given for input(s) {missing}; inputs are {list(net.inputs)}")
    # A private copy: the caller keeps a writable array, the trace a read-only one.
    fed = {k: np.array(v, dtype=np_dtype, order="C", copy=True) for k, v in inputs.items()}
    shapes = {k: tuple(v.shape) for k, v in fed.items() if k in net.inputs}
    if plan is None or plan.input_shapes != shapes:
        plan = make_plan(net, shapes)

    trace = Trace(meta={
        "framework": "caffe", "engine": "layerdiff-numpy", "dtype": np_dtype.name,
        "model": str(net.prototxt), "weights": str(net.weights) if net.weights else None,
        "notes": list(net.notes),
    }, inputs=fed, stream_dir=stream_dir)
    for v in fed.values():
        v.flags.writeable = False
    values: dict[str, np.ndarray] = {}
    dynamic: set[str] = set()  # blobs whose shape depends on data, so plans cannot be held to
    last_use = {b: i for i, p in enumerate(plan.layers) for b in p.layer.bottoms}
    n = len(plan.layers)
    for i, p in enumerate(plan.layers):
        lay = p.layer
        if progress is not None:
            progress(i, n, lay.name)
        if lay.type == "Input":
            outs = [fed[t] for t in lay.tops]
        else:
            if p.blobs is None:
                raise layer_error(ModelFormatError, lay.name, lay.type,
                                  "no weights: the model has no caffemodel blobs for this layer")
            blobs = [b if b.dtype == np_dtype else b.astype(np_dtype) for b in p.blobs]
            outs = p.impl.forward([values[b] for b in lay.bottoms], blobs)
            outs = [_finish(o, np_dtype) for o in outs]
            got = [tuple(o.shape) for o in outs]
            if p.impl.dynamic_shape or dynamic.intersection(lay.bottoms):
                dynamic.update(lay.tops)
            elif got != [tuple(s) for s in p.top_shapes]:
                raise RuntimeError(f"engine bug: layer '{lay.name}' ({lay.type}) produced "
                                   f"{got}, its shape function said {p.top_shapes}")
        rec = trace.add(lay.name, lay.type, lay.tops, lay.bottoms, outs,
                        attrs={"source_index": lay.source_index},
                        handle=CaffeCall(lay, p.impl, p.blobs or [], np_dtype),
                        params={str(k): b for k, b in enumerate(p.blobs or [])})
        for t, o in zip(lay.tops, rec.outputs, strict=True):
            values[t] = o
        for b in lay.bottoms:  # nobody reads it again: let go (streamed traces keep it on disk)
            if last_use.get(b) == i and b not in lay.tops:
                values.pop(b, None)
    if progress is not None:
        progress(n, n, "")
    return trace


@dataclass
class CaffeCall:
    """A record's live handle: re-runs that one layer, e.g. on another side's inputs."""

    layer: CaffeLayer
    impl: LayerImpl | None
    blobs: list[np.ndarray]  # as stored (float32); cast to ``dtype`` per run
    dtype: np.dtype

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        if self.impl is None or self.layer.type == "Input":
            raise ModelFormatError(f"layer '{self.layer.name}' ({self.layer.type}) cannot be "
                                   "re-run on its own")
        bottoms = [np.ascontiguousarray(x, dtype=self.dtype) for x in inputs]
        # Cast here, not at capture: a float64 trace must not keep a float64 copy of the model.
        blobs = [b if b.dtype == self.dtype else b.astype(self.dtype) for b in self.blobs]
        return [np.asarray(o) for o in self.impl.forward(bottoms, blobs)]


def _finish(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.asarray(out)
    if out.dtype != dtype:
        out = out.astype(dtype)
    # Read-only from here on: a layer that tries to write its input fails loudly instead of
    # corrupting an earlier record (the pycaffe in-place trap).
    out.flags.writeable = False
    return out


_tuned = False


def tune_allocator() -> None:
    """Keep freed activation memory inside the process (glibc only; a no-op elsewhere).

    A traced forward allocates every output anew; by default glibc hands large blocks back to
    the OS and the next forward pays page faults to get them again, which measured as about
    half of a ResNet-50 forward here. Called by the CLI, which owns its process; library users
    may call it.
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return
    _tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)
    libc.mallopt(m_top_pad, 1 << 26)


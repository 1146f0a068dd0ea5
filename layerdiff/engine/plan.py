"""Shape inference and weight validation: everything checked before a forward runs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from layerdiff.caffe.net import CaffeLayer, CaffeNet
from layerdiff.engine.registry import LayerImpl, Shape, lookup
from layerdiff.errors import ModelFormatError, UnsupportedError

# Refuse before allocating: a blob past this many elements is a typo, not a model.
MAX_ELEMENTS = 1 << 34


@dataclass
class PlannedLayer:
    layer: CaffeLayer
    impl: LayerImpl | None
    bottom_shapes: list[Shape] | None
    top_shapes: list[Shape] | None
    #: weights reshaped to what the layer expects (float32 views), or None when absent
    blobs: list[np.ndarray] | None
    expected_blobs: list[Shape] = field(default_factory=list)


@dataclass
class Plan:
    net: CaffeNet
    layers: list[PlannedLayer]
    input_shapes: dict[str, Shape]
    #: unknown type -> layer names using it (only filled when not strict)
    unknown_types: dict[str, list[str]] = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        return all(p.blobs is not None or not p.expected_blobs for p in self.layers)


def make_plan(net: CaffeNet, input_shapes: dict[str, Shape] | None = None,
              strict: bool = True, phase: str = "TEST") -> Plan:
    """Instantiate each layer's implementation, infer every shape and check every blob.

    With ``strict`` an unknown layer type is an error (all unknown types listed at once);
    without it the plan keeps going and shapes past such a layer are None.
    """
    shapes: dict[str, Shape | None] = dict(input_shapes or net.inputs)
    unknown: dict[str, list[str]] = defaultdict(list)
    for lay in net.layers:
        if lay.type != "Input" and lookup(lay.type) is None:
            unknown[lay.type].append(lay.name)
    if unknown and strict:
        listed = "; ".join(f"{t} (layer {', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
                           for t, n in unknown.items())
        raise UnsupportedError(
            f"{net.prototxt}: unsupported layer type(s): {listed}. Register an implementation "
            "with layerdiff.engine.registry.register (see docs/engine.md)")

    planned: list[PlannedLayer] = []
    for lay in net.layers:
        cls = lookup(lay.type)
        bshapes = [shapes.get(b) for b in lay.bottoms]
        impl = cls(lay, phase) if cls is not None else None
        if impl is None or any(s is None for s in bshapes):
            for t in lay.tops:
                shapes[t] = None
            planned.append(PlannedLayer(lay, impl, None, None, None))
            continue
        if lay.type == "Input":  # the fed (or --shape) shapes win over the prototxt's
            tshapes = [shapes.get(t) or s for t, s in zip(lay.tops, impl.top_shapes([]),
                                                          strict=True)]
        else:
            tshapes = impl.top_shapes(bshapes)
        tshapes = [tuple(int(d) for d in s) for s in tshapes]
        for s in tshapes:
            if any(d < 0 for d in s):
                raise impl.invalid(f"negative output shape {list(s)} for inputs {bshapes}")
            if int(np.prod(s, dtype=np.float64)) > MAX_ELEMENTS:
                raise impl.invalid(f"output shape {list(s)} is absurdly large; refusing")
        expected = [tuple(s) for s in impl.blob_shapes(bshapes)]
        for s in expected:
            if int(np.prod(s, dtype=np.float64)) > MAX_ELEMENTS:
                raise impl.invalid(f"weight blob shape {list(s)} is absurdly large; refusing")
        blobs = _checked_blobs(lay, expected, net.weights)
        for t, s in zip(lay.tops, tshapes, strict=True):
            shapes[t] = s
        planned.append(PlannedLayer(lay, impl, bshapes, tshapes, blobs, expected))
    return Plan(net, planned, dict(input_shapes or net.inputs), dict(unknown))


def _checked_blobs(lay: CaffeLayer, expected: list[Shape],
                   weights: object = None) -> list[np.ndarray] | None:
    if not lay.blobs:
        return None if expected else []
    where = f"{weights}: " if weights else ""  # name the caffemodel at fault
    if len(lay.blobs) != len(expected):
        want = ", ".join(str(list(s)) for s in expected) or "none"
        raise ModelFormatError(f"{where}layer '{lay.name}' ({lay.type}): the caffemodel has "
                               f"{len(lay.blobs)} blob(s), the definition needs "
                               f"{len(expected)} ({want})")
    out = []
    for i, (raw, want) in enumerate(zip(lay.blobs, expected, strict=True)):
        if raw.shape != want and not (raw.legacy and _legacy4(want) == raw.shape):
            raise ModelFormatError(f"{where}layer '{lay.name}' ({lay.type}): blob {i} has "
                                   f"shape {list(raw.shape)} in the caffemodel, the definition "
                                   f"needs {list(want)}")
        out.append(raw.data.reshape(want))
    return out


def _legacy4(shape: Shape) -> Shape | None:
    # Caffe's legacy blob check: the expected shape, left-padded with 1s to 4 axes.
    if len(shape) > 4:
        return None
    return (1,) * (4 - len(shape)) + tuple(shape)

"""Layers that produce blobs from nothing: Input, Parameter, DummyData."""

from __future__ import annotations

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register


@register("Input")
class Input(LayerImpl):
    """Fed by the runner; only its shapes are needed here."""

    num_bottoms = (0, 0)
    num_tops = (1, None)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shapes = list(self.param.input_param.shape)
        return [tuple(shapes[i if len(shapes) > 1 else 0].dim) for i in range(len(self.layer.tops))]

    def forward(self, bottoms, blobs):  # pragma: no cover - the runner feeds inputs directly
        raise RuntimeError("Input layers are fed by the runner")


@register("Parameter")
class Parameter(LayerImpl):
    """Outputs its one learnable blob (shape from parameter_param.shape)."""

    num_bottoms = (0, 0)

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(self.param.parameter_param.shape.dim)]

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(self.param.parameter_param.shape.dim)]

    def forward(self, bottoms, blobs):
        return [blobs[0].copy()]


@register("DummyData")
class DummyData(LayerImpl):
    """Constant-filled tops; only the constant filler is deterministic, so only it is run."""

    num_bottoms = (0, 0)
    num_tops = (1, None)

    def setup(self) -> None:
        p = self.param.dummy_data_param
        n = len(self.layer.tops)
        if len(p.shape) > 0:
            shapes = [tuple(s.dim) for s in p.shape]
        else:  # legacy num/channels/height/width lists
            shapes = [tuple(int(f[i if len(f) > 1 else 0]) for f in
                            (p.num, p.channels, p.height, p.width)) for i in range(n)]
        if len(shapes) not in (1, n):
            raise self.unsupported("shape", f"{len(shapes)} shapes for {n} tops")
        self.shapes = [shapes[i if len(shapes) > 1 else 0] for i in range(n)]
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, n):
            raise self.unsupported("data_filler", f"{len(fillers)} fillers for {n} tops")
        self.values = []
        for i in range(n):
            f = fillers[i if len(fillers) > 1 else 0] if fillers else None
            if f is not None and f.type != "constant":
                raise self.unsupported("data_filler.type",
                                       f"'{f.type}' is random; only 'constant' is reproducible")
            self.values.append(f.value if f is not None else 0.0)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return self.shapes

    def forward(self, bottoms, blobs):
        return [np.full(s, v, np.float32) for s, v in zip(self.shapes, self.values, strict=True)]

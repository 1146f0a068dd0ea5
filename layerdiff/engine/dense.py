"""Fully connected layers: InnerProduct and Embed."""

from __future__ import annotations

from math import prod

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register
from layerdiff.errors import InputSpecError, layer_error


@register("InnerProduct")
class InnerProduct(LayerImpl):
    """y = x W^T + b over the axes from ``axis`` on, flattened in C order (one GEMM).

    Weights are (num_output, K), or (K, num_output) with ``transpose``; the top keeps the axes
    before ``axis`` and replaces the rest by num_output (inner_product_layer.cpp).
    """

    def setup(self) -> None:
        p = self.param.inner_product_param
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose

    def _split(self, shape: Shape) -> tuple[int, int, int]:
        axis = self.canonical_axis(self.param.inner_product_param.axis, len(shape))
        return axis, prod(shape[:axis]), prod(shape[axis:])

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, _, k = self._split(bottom_shapes[0])
        w = (k, self.num_output) if self.transpose else (self.num_output, k)
        return [w] + ([(self.num_output,)] if self.bias_term else [])

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        axis, _, _ = self._split(shape)
        return [shape[:axis] + (self.num_output,)]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        axis, m, k = self._split(x.shape)
        w = blobs[0].astype(x.dtype, copy=False)
        y = np.matmul(x.reshape(m, k), w if self.transpose else w.T)
        if self.bias_term:
            # A second GEMM in Caffe: added after the product is rounded.
            y += blobs[1].astype(x.dtype, copy=False)
        return [y.reshape(x.shape[:axis] + (self.num_output,))]


@register("Embed")
class Embed(LayerImpl):
    """Row lookup: each bottom value is an index into the (input_dim, num_output) weights.

    Caffe casts the float to int and only debug builds check it; here a value that is not an
    integer in [0, input_dim) is an error rather than a read out of bounds.
    """

    def setup(self) -> None:
        p = self.param.embed_param
        if p.num_output <= 0:
            raise self.unsupported("num_output", "must be > 0")
        if p.input_dim <= 0:
            raise self.unsupported("input_dim", "must be > 0")
        self.num_output = p.num_output
        self.input_dim = p.input_dim
        self.bias_term = p.bias_term

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(self.input_dim, self.num_output)] + (
            [(self.num_output,)] if self.bias_term else [])

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0]) + (self.num_output,)]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        bad = ~np.isfinite(x) | (x != np.trunc(x)) | (x < 0) | (x >= self.input_dim)
        if bad.any():
            v = x[bad].flat[0]
            raise layer_error(InputSpecError, self.name, self.type,
                              f"index {v!r} at {np.argwhere(bad)[0].tolist()} is not an integer "
                              f"in [0, {self.input_dim}) (input_dim)")
        y = blobs[0].astype(x.dtype, copy=False)[x.astype(np.int64)]
        if self.bias_term:
            y += blobs[1].astype(x.dtype, copy=False)
        return [y]

"""Element-wise and reducing layers: Eltwise, Axpy (SENet fork), Reduction, ArgMax."""

from __future__ import annotations

import math

import numpy as np

from layerdiff.caffe import caffe_pb2
from layerdiff.engine.registry import LayerImpl, Shape, register

_ELT = caffe_pb2.EltwiseParameter
_RED = caffe_pb2.ReductionParameter


def _exact_scale(k: float) -> bool:
    """True when multiplying by ``k`` is exact (0 or a power of two, ignoring underflow)."""
    return k == 0 or abs(math.frexp(k)[0]) == 0.5


def _keep_unless_greater(keep: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``other > keep ? other : keep`` elementwise (Caffe's MAX step), at np.maximum's speed.

    np.maximum agrees except where ``other`` is NaN (Caffe keeps ``keep``) or on a tie of
    differently signed zeros (Caffe keeps ``keep``'s); those few elements are patched.
    """
    out = np.maximum(keep, other)
    bits = f"i{keep.itemsize}"
    fix = np.isnan(other)
    fix |= (keep == other) & (keep.view(bits) != other.view(bits))
    idx = np.flatnonzero(fix)
    if idx.size:
        out.reshape(-1)[idx] = keep.reshape(-1)[idx]
    return out


@register("Eltwise")
class Eltwise(LayerImpl):
    """SUM (with per-bottom ``coeff``), PROD or MAX over 2+ equally shaped bottoms."""

    num_bottoms = (2, None)

    def setup(self) -> None:
        p = self.param.eltwise_param
        self.op = p.operation
        if self.op not in (_ELT.SUM, _ELT.PROD, _ELT.MAX):
            raise self.unsupported("operation", f"unknown operation {self.op}")
        n = len(self.layer.bottoms)
        if len(p.coeff) not in (0, n):
            raise self.unsupported("coeff", f"{len(p.coeff)} coefficients for {n} bottoms "
                                   "(one per bottom)")
        if len(p.coeff) and self.op == _ELT.PROD:
            raise self.unsupported("coeff", "coefficients only apply to SUM")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * n

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        for s in bottom_shapes[1:]:
            if tuple(s) != tuple(bottom_shapes[0]):
                raise self.invalid(f"bottom shapes differ: {[list(b) for b in bottom_shapes]}")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms, blobs):
        dt = bottoms[0].dtype
        if self.op == _ELT.PROD:
            out = bottoms[0] * bottoms[1]
            for b in bottoms[2:]:
                out *= b
        elif self.op == _ELT.MAX:
            # Caffe: a > b ? a : b, then b > top ? b : top.
            out = _keep_unless_greater(bottoms[1], bottoms[0])
            for b in bottoms[2:]:
                out = _keep_unless_greater(out, b)
        else:
            # Caffe zeroes the top, then adds coeff*b per bottom in order with saxpy, which
            # OpenBLAS fuses (FMA: one rounding). Onto the zero top, or with a power-of-two
            # coeff, the product is exact and plain float ops give the same bits; any other
            # coeff is fused in float64 (exact product, one rounding to float32, barring a
            # rare double rounding).
            c = [dt.type(v) for v in self.coeffs]
            out = bottoms[0] * c[0] if c[0] != 1 else bottoms[0].copy()
            tmp = None
            for b, k in zip(bottoms[1:], c[1:], strict=True):
                if k == 1:
                    out += b
                elif dt == np.float32 and not _exact_scale(float(k)):
                    out = (out.astype(np.float64) + np.float64(k) * b).astype(dt)
                else:
                    tmp = np.multiply(b, k, out=tmp)
                    out += tmp
        return [out]


@register("Axpy")
class Axpy(LayerImpl):
    """SENet fork: top = a * X + Y, a [N, C] or [N, C, 1, 1] broadcast over X's spatial axes
    (bottoms a, X, Y in that order; see axpy_layer.cpp)."""

    num_bottoms = (3, 3)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        a, x, y = (tuple(s) for s in bottom_shapes)
        if len(a) < 2 or len(x) < 2 or a[:2] != x[:2] or int(np.prod(a[2:])) != 1:
            raise self.invalid(f"scale {list(a)} must be [N, C] or [N, C, 1, 1] of X {list(x)}")
        if x != y:
            raise self.invalid(f"X {list(x)} and Y {list(y)} differ")
        return [x]

    def forward(self, bottoms, blobs):
        a, x, y = bottoms
        n, c = x.shape[:2]
        scale = a.reshape(n, c, *([1] * (x.ndim - 2)))
        # Unfused multiply-add: bit-equal to the OpenCV-recorded goldens (the fork's saxpy
        # may fuse it, a difference of at most 1 ulp).
        return [scale * x + y]


#: blocks of 32 up to which :func:`_sdot_rows` emulates the FMA exactly
_FMA_LOOP_MAX = 2048


def _sdot_rows(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """Row-wise dot products of float32 (num, dim) arrays (``y`` None: all ones), rounded
    the way the goldens' OpenBLAS (Haswell kernel, kernel/x86_64/sdot.c) rounds them.

    The first dim & ~31 values go to 4x8 float32 lanes (one FMA per element, block after
    block), which are folded pairwise into one float; the remaining < 32 products (each
    rounded to float) are summed in double, the float part added last, the total rounded.
    The FMA is emulated in float64 (exact for the product; a double rounding is possible in
    rare cases) one block at a time; past _FMA_LOOP_MAX blocks (a long row: the loop would be
    slow) the products are rounded to float first, which costs at most 1 ulp per product.
    """
    num, dim = x.shape
    n1 = dim & -32
    if n1 == 0:
        acc = np.zeros((num, 4, 8), np.float32)
    elif y is None:  # a product by 1 is exact, so plain float32 adds are the FMA
        acc = np.add.reduce(x[:, :n1].reshape(num, n1 // 32, 4, 8), axis=1)
    elif n1 // 32 > _FMA_LOOP_MAX:  # too many blocks to loop over: products rounded first
        acc = np.add.reduce((x[:, :n1] * y[:, :n1]).reshape(num, n1 // 32, 4, 8), axis=1)
    else:
        xb = x[:, :n1].reshape(num, n1 // 32, 32).astype(np.float64)
        yb = y[:, :n1].reshape(num, n1 // 32, 32).astype(np.float64)
        lanes = np.zeros((num, 32), np.float32)
        for k in range(n1 // 32):
            lanes = (lanes + xb[:, k] * yb[:, k]).astype(np.float32)
        acc = lanes.reshape(num, 4, 8)
    h = acc[:, :, :4] + acc[:, :, 4:]
    h = (h[:, 0] + h[:, 1]) + (h[:, 2] + h[:, 3])
    part = (h[:, 0] + h[:, 1]) + (h[:, 2] + h[:, 3])
    tail = np.zeros(num)
    for i in range(n1, dim):
        tail += x[:, i] if y is None else x[:, i] * y[:, i]
    return (tail + part).astype(np.float32)


def _sasum_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise sums of |x| for a float32 (num, dim) array, rounded the way the goldens'
    OpenBLAS rounds them (kernel/x86_64/asum_sse.S).

    That kernel peels 1-3 values until the row is 16-byte aligned, which depends on where the
    row starts: Caffe's blob memory is malloc'ed (16-byte aligned), so row i starts i*dim
    floats in and the peel is set by (i*dim) mod 4. It then adds 4-wide blocks round-robin
    into 4 float32 accumulators, folds them pairwise and reduces the 4 lanes pairwise.
    """
    num, dim = x.shape
    a = np.abs(x)
    out = np.empty(num, np.float32)
    for phase in range(4):
        rows = np.flatnonzero((np.arange(num) * dim) % 4 == phase)
        if rows.size:
            out[rows] = _sasum_phase(a[rows], phase)
    return out


def _sasum_phase(a: np.ndarray, phase: int) -> np.ndarray:
    r, m = a.shape
    acc = np.zeros((r, 4, 4), np.float32)  # (row, accumulator, lane)
    p = 0
    if m > 3:
        if phase % 2:  # one float to reach 8-byte alignment
            acc[:, 0, 0] = a[:, 0]
            p, m, phase = 1, m - 1, phase + 1
        if phase % 4 == 2:  # two floats to reach 16-byte alignment
            acc[:, 1, :2] = a[:, p:p + 2]
            p, m = p + 2, m - 2
        nb = m >> 5
        if nb:  # 32-float blocks: 4-float slice k goes to accumulator k % 4, in order
            blocks = a[:, p:p + 32 * nb].reshape(r, 2 * nb, 4, 4)
            if p:  # start from the peeled values (adding to zeros is exact otherwise)
                blocks = np.concatenate([acc[:, None], blocks], axis=1)
            acc = np.add.reduce(blocks, axis=1)
            p += 32 * nb
        for bit, slots in ((16, (0, 1, 0, 1)), (8, (0, 1)), (4, (2,))):
            if m & bit:
                for k, j in enumerate(slots):
                    acc[:, j] += a[:, p + 4 * k:p + 4 * k + 4]
                p += 4 * len(slots)
    if m & 2:
        acc[:, 3, :2] += a[:, p:p + 2]
        p += 2
    if m & 1:
        acc[:, 2, 0] += a[:, p]
    c = (acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])
    return (c[:, 0] + c[:, 1]) + (c[:, 2] + c[:, 3])


@register("Reduction")
class Reduction(LayerImpl):
    """SUM, ASUM, SUMSQ or MEAN over ``axis`` and every axis after it, times ``coeff``.

    Caffe sums with BLAS (sdot for SUM/MEAN/SUMSQ, sasum for ASUM); in float32 the sums follow
    the goldens' OpenBLAS kernels (:func:`_sdot_rows`, :func:`_sasum_rows`) bit for bit.
    """

    def setup(self) -> None:
        p = self.param.reduction_param
        if p.operation not in (_RED.SUM, _RED.ASUM, _RED.SUMSQ, _RED.MEAN):
            raise self.unsupported("operation", f"unknown operation {p.operation}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        return [tuple(s[:self.canonical_axis(self.param.reduction_param.axis, len(s))])]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        p = self.param.reduction_param
        (top,) = self.top_shapes([x.shape])
        num = int(np.prod(top, dtype=np.int64))
        flat = x.reshape(num, int(np.prod(x.shape[len(top):], dtype=np.int64)))
        f32 = x.dtype == np.float32
        if p.operation == _RED.ASUM:
            out = _sasum_rows(flat) if f32 else np.abs(flat).sum(axis=1)
        elif p.operation == _RED.SUMSQ:
            out = _sdot_rows(flat, flat) if f32 else np.einsum("ij,ij->i", flat, flat)
        else:
            out = _sdot_rows(flat, None) if f32 else flat.sum(axis=1)
        # Caffe folds MEAN's 1/dim into the coefficient, in Dtype: sum * (coeff / dim).
        coeff = x.dtype.type(p.coeff)
        if p.operation == _RED.MEAN:
            coeff = coeff / x.dtype.type(flat.shape[1])
        if coeff != 1:
            out = out * coeff
        return [out.reshape(top)]


@register("ArgMax")
class ArgMax(LayerImpl):
    """Top-k indices (as floats) and/or values per item (no ``axis``) or along ``axis``.

    Caffe sorts (value, index) pairs descending, so ties go to the larger index first.
    """

    def setup(self) -> None:
        p = self.param.argmax_param
        self.k = int(p.top_k)
        if self.k < 1:
            raise self.unsupported("top_k", f"{self.k}: must be at least 1")
        self.has_axis = p.HasField("axis")

    def _axis_dim(self, shape: Shape) -> tuple[int | None, int]:
        if self.has_axis:
            axis = self.canonical_axis(self.param.argmax_param.axis, len(shape))
            dim = shape[axis]
        else:
            axis, dim = None, int(np.prod(shape[1:], dtype=np.int64))
        if self.k > dim:
            where = f"axis {axis}" if axis is not None else "the item"
            raise self.unsupported("top_k", f"{self.k} is more than the {dim} values of {where}")
        return axis, dim

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = tuple(bottom_shapes[0])
        axis, _ = self._axis_dim(s)
        if axis is not None:
            return [s[:axis] + (self.k,) + s[axis + 1:]]
        out = [1] * max(len(s), 3)
        out[0], out[2] = s[0], self.k
        if self.param.argmax_param.out_max_val:
            out[1] = 2
        return [tuple(out)]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        axis, dim = self._axis_dim(x.shape)
        v = np.moveaxis(x, axis, -1) if axis is not None else x.reshape(x.shape[0], dim)
        rev = v[..., ::-1]  # reversed, so the first maximum found is the largest index
        if self.k == 1:
            pos = np.argmax(rev, axis=-1)[..., None]
        else:
            pos = np.argsort(-rev, axis=-1, kind="stable")[..., :self.k]
        idx = dim - 1 - pos
        vals = np.take_along_axis(v, idx, axis=-1)
        (top,) = self.top_shapes([x.shape])
        if axis is not None:
            res = vals if self.param.argmax_param.out_max_val else idx.astype(x.dtype)
            return [np.ascontiguousarray(np.moveaxis(res, -1, axis))]
        parts = [idx.astype(x.dtype)]
        if self.param.argmax_param.out_max_val:
            parts.append(vals)
        return [np.stack(parts, axis=1).reshape(top)]

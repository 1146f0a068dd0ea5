"""Convolution-like layers: Convolution, Deconvolution, Im2col and the depthwise forks.

All of them share Caffe's geometry: an output axis has ``(in + 2*pad - extent) / stride + 1``
cells with C++ division (truncating toward zero), where ``extent = dilation*(kernel-1) + 1``.
A window may therefore hang past the padded input; Caffe's im2col reads zeros there.

Speed: a convolution is im2col (one strided copy of the zero-padded input, built with
``as_strided``) followed by one float32/float64 ``np.matmul`` per group, as Caffe's sgemm does.
A 1x1 stride-1 unpadded convolution skips im2col (Caffe's ``is_1x1_`` shortcut) and a
depthwise one (one input channel per group) accumulates tap by tap instead of running
thousands of tiny GEMMs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import prod

import numpy as np
from numpy.lib.stride_tricks import as_strided

from layerdiff.engine.registry import LayerImpl, Shape, register


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (rounds toward zero, unlike Python's ``//``)."""
    q = abs(a) // b
    return q if a >= 0 else -q


@dataclass(frozen=True)
class Geometry:
    """Per-spatial-axis kernel, stride, pad and dilation."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation, strict=True))

    def conv_out(self, spatial: Shape) -> tuple[int, ...]:
        """Caffe's convolution output size (base_conv_layer / conv_layer.cpp), truncating."""
        return tuple(_trunc_div(n + 2 * p - e, s) + 1 for n, p, e, s in
                     zip(spatial, self.pad, self.extent, self.stride, strict=True))

    def deconv_out(self, spatial: Shape) -> tuple[int, ...]:
        """Caffe's transposed output size (deconv_layer.cpp)."""
        return tuple(s * (n - 1) + e - 2 * p for n, p, e, s in
                     zip(spatial, self.pad, self.extent, self.stride, strict=True))

    @property
    def is_1x1(self) -> bool:
        # Caffe's is_1x1_: im2col is the identity (dilation does not matter for kernel 1).
        return all(k == 1 and s == 1 and p == 0
                   for k, s, p in zip(self.kernel, self.stride, self.pad, strict=True))


def parse_geometry(layer: LayerImpl, nsp: int) -> Geometry:
    """Read ``convolution_param`` for ``nsp`` spatial axes with BVLC's rules and CHECKs.

    kernel_h/w, stride_h/w and pad_h/w are 2-D only and exclude their repeated forms; a
    repeated field is given 0 times (default), once (all axes) or once per axis.
    """
    cp = layer.param.convolution_param

    def pick(name: str, h: str, w: str, default: int | None) -> tuple[int, ...]:
        values = list(getattr(cp, name))
        if cp.HasField(h) or cp.HasField(w):
            if nsp != 2:
                raise layer.unsupported(f"{h}/{w}", f"only for 2-D convolution, the input has "
                                        f"{nsp} spatial axes")
            if values:
                raise layer.unsupported(name, f"give either {name} or {h}/{w}, not both")
            return getattr(cp, h), getattr(cp, w)
        allowed = (1, nsp) if default is None else (0, 1, nsp)
        if len(values) not in allowed:
            raise layer.unsupported(name, f"given {len(values)} times for {nsp} spatial axes; "
                                    "give it once or once per spatial axis")
        if not values:
            return (default,) * nsp if default is not None else ()
        return tuple(values) * nsp if len(values) == 1 else tuple(values)

    kernel = pick("kernel_size", "kernel_h", "kernel_w", None)
    stride = pick("stride", "stride_h", "stride_w", 1)
    pad = pick("pad", "pad_h", "pad_w", 0)
    dil = list(cp.dilation)
    if len(dil) not in (0, 1, nsp):
        raise layer.unsupported("dilation", f"given {len(dil)} times for {nsp} spatial axes")
    dilation = tuple(dil) * nsp if len(dil) == 1 else tuple(dil) or (1,) * nsp
    if any(k <= 0 for k in kernel):
        raise layer.unsupported("kernel_size", f"kernel {list(kernel)}: dimensions must be > 0")
    if any(s <= 0 for s in stride):
        raise layer.unsupported("stride", f"stride {list(stride)}: dimensions must be > 0")
    return Geometry(kernel, stride, pad, dilation)


def _padded(x: np.ndarray, geom: Geometry, out: tuple[int, ...]) -> np.ndarray:
    """Zero-pad the spatial axes of ``x`` (N, C, *sp) so every window of ``out`` fits.

    Beyond Caffe's ``pad`` the high side is extended when a truncated output size lets the last
    window overhang the padded input: those taps read zeros, as in Caffe's im2col.
    """
    spatial = x.shape[2:]
    need = [(o - 1) * s + e for o, s, e in zip(out, geom.stride, geom.extent, strict=True)]
    hi = [max(0, n - p - size) for n, p, size in zip(need, geom.pad, spatial, strict=True)]
    if not any(geom.pad) and not any(hi):
        return x
    shape = x.shape[:2] + tuple(p + size + h for p, size, h in zip(geom.pad, spatial, hi,
                                                                     strict=True))
    xp = np.zeros(shape, x.dtype)
    xp[(slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(geom.pad, spatial,
                                                                         strict=True))] = x
    return xp


def im2col(x: np.ndarray, geom: Geometry, out: tuple[int, ...]) -> np.ndarray:
    """Caffe's column buffer for a batch: (N, C, *kernel, *out), C-contiguous.

    Reshaped to (N, C*prod(kernel), prod(out)) it is exactly Caffe's per-image col buffer
    (rows ordered channel, then kernel taps; columns ordered output positions).
    """
    xp = _padded(x, geom, out)
    st = xp.strides
    view = as_strided(
        xp,
        shape=xp.shape[:2] + geom.kernel + out,
        strides=st[:2] + tuple(d * s for d, s in zip(geom.dilation, st[2:], strict=True))
        + tuple(k * s for k, s in zip(geom.stride, st[2:], strict=True)),
        writeable=False,
    )
    return np.ascontiguousarray(view)


def _taps(geom: Geometry, out: tuple[int, ...]):
    """(tap index, slices into the padded input) for every kernel tap."""
    for tap in itertools.product(*(range(k) for k in geom.kernel)):
        yield tap, tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in
                         zip(tap, geom.dilation, out, geom.stride, strict=True))


#: Bytes of im2col/col2im buffer per GEMM call: big batches are cut into chunks of images so
#: memory stays near Caffe's own one-image col buffer.
COL_BUDGET = 1 << 28


def _chunks(n: int, per_image: int) -> list[slice]:
    step = max(1, COL_BUDGET // max(1, per_image))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def conv_forward(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, geom: Geometry,
                 group: int) -> np.ndarray:
    """Caffe's convolution of ``x`` (N, C, *sp) with ``w`` (O, C/group, *kernel)."""
    n, c = x.shape[:2]
    o = w.shape[0]
    out = geom.conv_out(x.shape[2:])
    cg, og = c // group, o // group
    npos = prod(out)
    if n == 0 or npos == 0 or o == 0:
        y = np.zeros((n, o) + out, x.dtype)
    elif cg == 1 and group > 1:
        y = _depthwise(x, w, geom, out, group)
    else:
        kdim = cg * prod(geom.kernel)
        wg = w.reshape(group, og, kdim)
        y = np.empty((n, group, og, npos), x.dtype)
        for sl in _chunks(n, c * prod(geom.kernel) * npos * x.itemsize):
            if geom.is_1x1:
                cols = np.ascontiguousarray(x[sl])
            else:
                cols = im2col(x[sl], geom, out)
            np.matmul(wg, cols.reshape(-1, group, kdim, npos), out=y[sl])
        y = y.reshape((n, o) + out)
    if bias is not None:
        # Caffe adds the bias in a second GEMM, after the weights' sum is rounded.
        y += bias.reshape((1, o) + (1,) * len(out))
    return y


def _depthwise(x: np.ndarray, w: np.ndarray, geom: Geometry, out: tuple[int, ...],
               group: int) -> np.ndarray:
    """One input channel per group: multiply-accumulate per kernel tap, in tap order."""
    n, c = x.shape[:2]
    mult = w.shape[0] // group  # output channels per input channel
    xp = _padded(x, geom, out)
    wk = w.reshape((c, mult, prod(geom.kernel)) + (1,) * len(out))
    y = np.zeros((n, c, mult) + out, x.dtype)
    tmp = np.empty_like(y)
    for i, (_, sl) in enumerate(_taps(geom, out)):
        src = xp[(slice(None), slice(None), None) + sl]
        np.multiply(src, wk[:, :, i], out=tmp)
        y += tmp
    return y.reshape((n, c * mult) + out)


def deconv_forward(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, geom: Geometry,
                   group: int) -> np.ndarray:
    """Caffe's Deconvolution: ``w`` (C, O/group, *kernel) applied as conv's backward pass.

    Per group, cols = W^T x (one GEMM), then col2im scatters each tap's plane into the full
    output s*(in-1)+extent; Caffe's col2im drops what falls in the padding, i.e. the full
    output is cropped by ``pad`` on both sides.
    """
    n, c = x.shape[:2]
    sp = x.shape[2:]
    cg = c // group
    og = w.shape[1]
    o = og * group
    out = geom.deconv_out(sp)
    kprod, npos = prod(geom.kernel), prod(sp)
    full = tuple(s * (i - 1) + e for i, s, e in zip(sp, geom.stride, geom.extent, strict=True))
    y = np.zeros((n, o) + full, x.dtype)
    if n and c and npos and o:
        wt = np.ascontiguousarray(w.reshape(group, cg, og * kprod).transpose(0, 2, 1))
        for chunk in _chunks(n, o * kprod * npos * x.itemsize):
            cols = np.matmul(wt, np.ascontiguousarray(x[chunk]).reshape(-1, group, cg, npos))
            cols = cols.reshape((-1, o) + geom.kernel + sp)
            yc = y[chunk]
            for tap, sl in _taps(geom, sp):
                yc[(slice(None), slice(None)) + sl] += cols[(slice(None), slice(None)) + tap]
    y = y[(slice(None), slice(None)) + tuple(slice(p, p + m) for p, m in zip(geom.pad, out,
                                                                           strict=True))]
    y = np.ascontiguousarray(y)
    if bias is not None:
        y += bias.reshape((1, o) + (1,) * len(out))
    return y


class _ConvBase(LayerImpl):
    """Shared parameter handling of BVLC Convolution and Deconvolution (base_conv_layer)."""

    num_bottoms = (1, None)
    num_tops = (1, None)

    def setup(self) -> None:
        cp = self.param.convolution_param
        if len(self.layer.bottoms) != len(self.layer.tops):
            raise self.invalid(f"has {len(self.layer.bottoms)} bottoms and "
                               f"{len(self.layer.tops)} tops; each bottom needs its own top")
        if cp.num_output <= 0:
            raise self.unsupported("num_output", "must be > 0")
        if cp.group <= 0:
            raise self.unsupported("group", "must be > 0")
        if cp.num_output % cp.group:
            raise self.unsupported("group", f"num_output {cp.num_output} is not a multiple of "
                                   f"group {cp.group}")
        self.num_output = cp.num_output
        self.group = cp.group
        self.bias_term = cp.bias_term

    def _layout(self, shape: Shape) -> tuple[int, Geometry]:
        """(channel axis, geometry) for a bottom shape, with Caffe's shape CHECKs."""
        axis = self.canonical_axis(self.param.convolution_param.axis, len(shape))
        geom = parse_geometry(self, len(shape) - axis - 1)
        if shape[axis] % self.group:
            raise self.unsupported("group", f"{shape[axis]} input channels are not divisible "
                                   f"by group {self.group}")
        return axis, geom

    def _check_bottoms(self, bottom_shapes: list[Shape]) -> None:
        if any(tuple(s) != tuple(bottom_shapes[0]) for s in bottom_shapes[1:]):
            raise self.invalid(f"all bottoms must have the same shape, got {bottom_shapes}")

    def _bias_shapes(self) -> list[Shape]:
        return [(self.num_output,)] if self.bias_term else []

    def forward(self, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
        dtype = bottoms[0].dtype
        w = blobs[0].astype(dtype, copy=False)
        b = blobs[1].astype(dtype, copy=False) if self.bias_term else None
        axis, geom = self._layout(bottoms[0].shape)
        tops = []
        for x in bottoms:  # several bottoms share the weights, one top each
            lead, rest = x.shape[:axis], x.shape[axis:]
            y = self._compute(x.reshape((prod(lead),) + rest), w, b, geom)
            tops.append(y.reshape(lead + y.shape[1:]))
        return tops

    def _compute(self, x, w, b, geom):  # pragma: no cover - overridden
        raise NotImplementedError


@register("Convolution")
class Convolution(_ConvBase):
    """BVLC Convolution, N-D, grouped, dilated; several bottoms share one set of weights."""

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        axis, geom = self._layout(bottom_shapes[0])
        cin = bottom_shapes[0][axis] // self.group
        return [(self.num_output, cin) + geom.kernel] + self._bias_shapes()

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._check_bottoms(bottom_shapes)
        shape = tuple(bottom_shapes[0])
        axis, geom = self._layout(shape)
        out = geom.conv_out(shape[axis + 1:])
        if any(d < 0 for d in out):
            raise self.invalid(
                f"kernel extent {list(geom.extent)} exceeds input {list(shape[axis + 1:])} + "
                f"2*pad {list(geom.pad)}: output size {list(out)} is negative")
        return [shape[:axis] + (self.num_output,) + out] * len(bottom_shapes)

    def _compute(self, x, w, b, geom):
        return conv_forward(x, w, b, geom, self.group)


@register("DepthwiseConvolution")
class DepthwiseConvolution(Convolution):
    """yonghenglh6/DepthwiseConvolution: a faster kernel for grouped Convolution, same result
    and parameters (it follows ``group``; see FORK_LAYERS.md)."""


@register("Deconvolution")
class Deconvolution(_ConvBase):
    """BVLC Deconvolution (transposed convolution); weights (C, num_output/group, *kernel)."""

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        axis, geom = self._layout(bottom_shapes[0])
        cin = bottom_shapes[0][axis]
        return [(cin, self.num_output // self.group) + geom.kernel] + self._bias_shapes()

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._check_bottoms(bottom_shapes)
        shape = tuple(bottom_shapes[0])
        axis, geom = self._layout(shape)
        out = geom.deconv_out(shape[axis + 1:])
        if any(d < 0 for d in out):
            raise self.invalid(f"2*pad {list(geom.pad)} exceeds the full output: output size "
                               f"{list(out)} is negative")
        return [shape[:axis] + (self.num_output,) + out] * len(bottom_shapes)

    def _compute(self, x, w, b, geom):
        return deconv_forward(x, w, b, geom, self.group)


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(LayerImpl):
    """farmingyard/caffe-mobilenet depthwise conv: 4-D only, ignores num_output and group.

    Weights (C, 1, kh, kw), bias (C,). Parameters use the fork's 2-D reading of
    convolution_param; absent stride/pad/dilation take BVLC's defaults (1, 0, 1), as OpenCV does.
    """

    def setup(self) -> None:
        cp = self.param.convolution_param
        self.bias_term = cp.bias_term

        def two(name: str, h: str, w: str, default: int | None) -> tuple[int, int]:
            if cp.HasField(h) and cp.HasField(w):  # the fork wants both, else the list
                return getattr(cp, h), getattr(cp, w)
            values = list(getattr(cp, name))
            if not values and default is not None:
                return default, default
            if len(values) not in (1, 2):
                raise self.unsupported(name, f"given {len(values)} times; the fork reads one "
                                       f"value or two (h, w)")
            return values[0], values[-1]

        kernel = two("kernel_size", "kernel_h", "kernel_w", None)
        stride = two("stride", "stride_h", "stride_w", 1)
        pad = two("pad", "pad_h", "pad_w", 0)
        dilation = self._dilation(cp)
        if min(kernel) <= 0 or min(stride) <= 0:
            raise self.unsupported("kernel_size/stride", "must be > 0")
        self.geom = Geometry(kernel, stride, pad, dilation)

    def _dilation(self, cp) -> tuple[int, int]:
        d = list(cp.dilation)
        if len(d) > 2:
            raise self.unsupported("dilation", f"given {len(d)} times; the fork reads 1 or 2")
        return (d[0], d[-1]) if d else (1, 1)

    def _check(self, shape: Shape) -> None:
        if len(shape) != 4:
            raise self.unsupported("bottom", f"the fork is 4-D (NCHW) only, got {list(shape)}")

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        c = bottom_shapes[0][1]
        return [(c, 1) + self.geom.kernel] + ([(c,)] if self.bias_term else [])

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        self._check(shape)
        out = self.geom.conv_out(shape[2:])
        if any(d < 0 for d in out):
            raise self.invalid(f"kernel extent {list(self.geom.extent)} exceeds input "
                               f"{list(shape[2:])} + 2*pad: output size {list(out)}")
        return [shape[:2] + out]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        w = blobs[0].astype(x.dtype, copy=False)
        b = blobs[1].astype(x.dtype, copy=False) if self.bias_term else None
        return [conv_forward(x, w, b, self.geom, x.shape[1])]


@register("Im2col")
class Im2col(LayerImpl):
    """Caffe's Im2col layer: (..., C, *sp) -> (..., C*prod(kernel), *out), zero padded."""

    def _layout(self, shape: Shape) -> tuple[int, Geometry]:
        axis = self.canonical_axis(self.param.convolution_param.axis, len(shape))
        if len(shape) - axis - 1 < 1:
            raise self.unsupported("axis", "Im2col needs at least one spatial axis after it")
        return axis, parse_geometry(self, len(shape) - axis - 1)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        axis, geom = self._layout(shape)
        out = geom.conv_out(shape[axis + 1:])
        if any(d < 0 for d in out):
            raise self.invalid(f"kernel extent {list(geom.extent)} exceeds input "
                               f"{list(shape[axis + 1:])} + 2*pad: output size {list(out)}")
        return [shape[:axis] + (shape[axis] * prod(geom.kernel),) + out]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        axis, geom = self._layout(x.shape)
        lead, rest = x.shape[:axis], x.shape[axis:]
        out = geom.conv_out(rest[1:])
        x = x.reshape((prod(lead),) + rest)
        if 0 in x.shape or 0 in out:
            cols = np.zeros((x.shape[0], rest[0] * prod(geom.kernel)) + out, x.dtype)
        else:
            cols = im2col(x, geom, out).reshape((x.shape[0], -1) + out)
        return [cols.reshape(lead + cols.shape[1:])]

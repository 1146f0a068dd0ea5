"""Normalization and affine layers: BatchNorm, Scale, Bias, LRN, MVN, Normalize (SSD), BN (forks).

Arithmetic follows Caffe's float32 order where it is cheap to do so (e.g. BatchNorm divides by
the per-channel standard deviation rather than multiplying by its reciprocal), so float32 runs
stay within an ulp or two of the oracle. Per-channel factors are computed once on the small
parameter vectors and broadcast; the big tensor sees one temporary and in-place updates.
"""

from __future__ import annotations

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register


def _channel_view(v: np.ndarray, ndim: int, dtype: np.dtype) -> np.ndarray:
    """A per-channel vector shaped to broadcast over axis 1 of an ``ndim``-D blob."""
    return np.asarray(v, dtype=dtype).reshape((1, -1) + (1,) * (ndim - 2))


def _legacy_dims(impl: LayerImpl, shape: Shape) -> Shape:
    """Caffe's legacy num/channels/height/width: at most 4 axes, missing ones read as 1."""
    if len(shape) > 4:
        raise impl.invalid(f"input {list(shape)} has more than 4 axes; this layer uses Caffe's "
                           "legacy (num, channels, height, width) accessors")
    return tuple(shape) + (1,) * (4 - len(shape))


def _stat_axes(ndim: int) -> tuple[int, ...]:
    """Every axis but the channel axis 1: what batch statistics reduce over."""
    return (0,) + tuple(range(2, ndim))


# -- BatchNorm ---------------------------------------------------------------------------------


@register("BatchNorm")
class BatchNorm(LayerImpl):
    """BVLC BatchNorm: blobs mean·s, var·s and s; ``(x - m/s) / sqrt(v/s + eps)``.

    Caffe scales the stored statistics by ``1/s`` (0 when s == 0, so the statistics vanish and
    the output is ``x / sqrt(eps)``), adds eps, takes the square root and divides, see
    batch_norm_layer.cpp; that order is kept so float32 rounding matches.
    """

    def setup(self) -> None:
        bp = self.param.batch_norm_param
        # Unset use_global_stats means "TEST phase uses the stored statistics".
        self.use_global = (bp.use_global_stats if bp.HasField("use_global_stats")
                           else self.phase == "TEST")
        self.eps = float(bp.eps)
        # Caffe pins the three statistics blobs at lr_mult 0 and CHECK-fails on anything else.
        for i, spec in enumerate(list(self.param.param)[:3]):
            if spec.lr_mult != 0:
                raise self.unsupported(f"param[{i}].lr_mult",
                                       f"{spec.lr_mult:g}: Caffe refuses a nonzero lr_mult on "
                                       "BatchNorm statistics")

    def _channels(self, shape: Shape) -> int:
        # Caffe reads shape(1) unconditionally, so 0-D and 1-D bottoms fail its axis check.
        if len(shape) < 2:
            raise self.invalid(f"input {list(shape)} needs at least 2 axes (N, C, ...)")
        return shape[1]

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        c = self._channels(bottom_shapes[0])
        return [(c,), (c,), (1,)]

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._channels(bottom_shapes[0])
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        dt = x.dtype
        if self.use_global:
            s = np.asarray(blobs[2], dtype=dt).reshape(-1)[0]
            factor = dt.type(0) if s == 0 else dt.type(1) / s
            mean = factor * np.asarray(blobs[0], dtype=dt)
            var = factor * np.asarray(blobs[1], dtype=dt)
        else:
            # This batch's mean and biased variance over N and every spatial axis.
            axes = _stat_axes(x.ndim)
            mean = x.mean(axis=axes, dtype=dt)
            d = x - _channel_view(mean, x.ndim, dt)
            np.square(d, out=d)
            var = d.mean(axis=axes, dtype=dt)
        std = np.sqrt(var + dt.type(self.eps))
        out = np.subtract(x, _channel_view(mean, x.ndim, dt))
        np.divide(out, _channel_view(std, x.ndim, dt), out=out)
        return [out]


# -- Scale / Bias ------------------------------------------------------------------------------


def _learned_param_shape(impl: LayerImpl, xshape: Shape, axis: int, num_axes: int) -> Shape:
    """The shape of a learned Scale/Bias blob: ``num_axes`` axes of x from ``axis`` on."""
    ax = impl.canonical_axis(axis, len(xshape))
    if num_axes < -1:
        raise impl.unsupported("num_axes", f"{num_axes}: must be >= 0, or -1 for all remaining")
    if num_axes >= 0 and len(xshape) < ax + num_axes:
        raise impl.unsupported("num_axes", f"axis {ax} + num_axes {num_axes} extends past the "
                                           f"{len(xshape)}-D input")
    return tuple(xshape[ax:] if num_axes == -1 else xshape[ax:ax + num_axes])


def _param_axis(impl: LayerImpl, xshape: Shape, pshape: Shape, axis: int) -> int:
    """Where a parameter of shape ``pshape`` lines up with x (Caffe's Scale/Bias Reshape).

    A scalar parameter always uses axis 0 (any axis is equivalent); otherwise its dims must
    equal x's from ``axis`` on.
    """
    if len(pshape) == 0:
        return 0
    ax = impl.canonical_axis(axis, len(xshape))
    if len(xshape) < ax + len(pshape) or tuple(xshape[ax:ax + len(pshape)]) != tuple(pshape):
        raise impl.invalid(f"parameter shape {list(pshape)} does not match input "
                           f"{list(xshape)} from axis {ax}")
    return ax


def _broadcastable(p: np.ndarray, ndim: int, axis: int, dtype: np.dtype) -> np.ndarray:
    """``p`` reshaped so that it broadcasts against x starting at ``axis``."""
    p = np.asarray(p, dtype=dtype)
    return p.reshape(p.shape + (1,) * (ndim - axis - p.ndim))


@register("Scale")
class Scale(LayerImpl):
    """``x · s (+ b)``; s is a learned blob or bottom[1], b a learned blob when bias_term.

    With one bottom the blobs are [scale, bias?], shaped ``num_axes`` axes of x from ``axis``
    on (num_axes 0: a scalar; -1: every remaining axis). With two bottoms the scale is
    bottom[1] (its own shape; num_axes is ignored) and the only blob is the bias, shaped like
    bottom[1] (scale_layer.cpp builds its Bias with num_axes = bottom[1]'s axis count).
    """

    num_bottoms = (1, 2)

    def setup(self) -> None:
        sp = self.param.scale_param
        self.axis, self.num_axes, self.bias_term = sp.axis, sp.num_axes, sp.bias_term

    def _scale_shape(self, bottom_shapes: list[Shape]) -> Shape:
        x = bottom_shapes[0]
        if len(bottom_shapes) > 1:
            return tuple(bottom_shapes[1])
        return _learned_param_shape(self, x, self.axis, self.num_axes)

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        x = bottom_shapes[0]
        sshape = self._scale_shape(bottom_shapes)
        blobs = [] if len(bottom_shapes) > 1 else [sshape]
        if self.bias_term:
            blobs.append(_learned_param_shape(self, x, self.axis, len(sshape)))
        return blobs

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        x = tuple(bottom_shapes[0])
        _param_axis(self, x, self._scale_shape(bottom_shapes), self.axis)
        if self.bias_term:
            self.blob_shapes(bottom_shapes)
        return [x]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        if len(bottoms) > 1:
            s, rest = bottoms[1], blobs
        else:
            s, rest = blobs[0], blobs[1:]
        s = np.asarray(s)
        ax = _param_axis(self, x.shape, s.shape, self.axis)
        out = np.multiply(x, _broadcastable(s, x.ndim, ax, x.dtype))
        if self.bias_term:
            b = np.asarray(rest[0])
            np.add(out, _broadcastable(b, x.ndim, _param_axis(self, x.shape, b.shape, self.axis),
                                       x.dtype), out=out)
        return [out]


@register("Bias")
class Bias(LayerImpl):
    """``x + b``; b is the learned blob (axis/num_axes as in Scale) or bottom[1]."""

    num_bottoms = (1, 2)

    def setup(self) -> None:
        bp = self.param.bias_param
        self.axis, self.num_axes = bp.axis, bp.num_axes

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        if len(bottom_shapes) > 1:
            return []
        return [_learned_param_shape(self, bottom_shapes[0], self.axis, self.num_axes)]

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        x = tuple(bottom_shapes[0])
        pshape = (tuple(bottom_shapes[1]) if len(bottom_shapes) > 1
                  else self.blob_shapes(bottom_shapes)[0])
        _param_axis(self, x, pshape, self.axis)
        return [x]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        b = np.asarray(bottoms[1] if len(bottoms) > 1 else blobs[0])
        ax = _param_axis(self, x.shape, b.shape, self.axis)
        return [np.add(x, _broadcastable(b, x.ndim, ax, x.dtype))]


# -- LRN ---------------------------------------------------------------------------------------


@register("LRN")
class LRN(LayerImpl):
    """Local response normalization (lrn_layer.cpp).

    ACROSS_CHANNELS: ``x · (k + alpha/n · Σ x²)^-beta`` over a window of n channels, zero
    padded at both ends. WITHIN_CHANNEL: Caffe builds it from Power, AVE Pooling (kernel n,
    pad (n-1)/2, stride 1: every window counts n² including the padding) and Eltwise, giving
    ``x · (1 + alpha · avgpool(x²))^-beta``; ``k`` is not used there.
    """

    def setup(self) -> None:
        lp = self.param.lrn_param
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise self.unsupported("local_size", f"{self.size}: Caffe's LRN supports only odd "
                                                 "window sizes")
        self.alpha, self.beta, self.k = float(lp.alpha), float(lp.beta), float(lp.k)
        self.within = lp.norm_region == lp.WITHIN_CHANNEL

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        x = tuple(bottom_shapes[0])
        if len(x) != 4:
            raise self.invalid(f"input {list(x)} must have 4 axes (N, C, H, W)")
        return [x]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        dt = x.dtype
        sq = np.square(x)
        pad = (self.size - 1) // 2
        if self.within:
            if self.alpha == 0 or self.beta == 0:  # Caffe's Power layer: constant 1
                return [x.copy()]
            n, c, h, w = x.shape
            p = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dt)
            p[:, :, pad:pad + h, pad:pad + w] = sq
            rows = p[:, :, 0:h, :].copy()
            for i in range(1, self.size):
                rows += p[:, :, i:i + h, :]
            acc = rows[:, :, :, 0:w].copy()
            for j in range(1, self.size):
                acc += rows[:, :, :, j:j + w]
            acc /= dt.type(self.size * self.size)
            acc *= dt.type(self.alpha)
            acc += dt.type(1)
        else:
            # Window sum over channels with zero padding: the tensor plus its shifts.
            acc = sq.copy()
            for d in range(1, pad + 1):
                acc[:, d:] += sq[:, :-d]
                acc[:, :-d] += sq[:, d:]
            acc *= dt.type(self.alpha) / dt.type(self.size)
            acc += dt.type(self.k)
        np.power(acc, dt.type(-self.beta), out=acc)
        acc *= x
        return [acc]


# -- MVN ---------------------------------------------------------------------------------------


@register("MVN")
class MVN(LayerImpl):
    """Mean-variance normalization (mvn_layer.cpp), per (n, c) or per n when across_channels.

    The biased standard deviation gets eps added *after* the square root:
    ``(x - mean) / (std + eps)``. Caffe reshapes the top with the legacy 4-axis accessors, so a
    2-D (N, C) input gives an (N, C, 1, 1) output.
    """

    def setup(self) -> None:
        mp = self.param.mvn_param
        self.normalize_variance = mp.normalize_variance
        self.across_channels = mp.across_channels
        self.eps = float(mp.eps)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [_legacy_dims(self, bottom_shapes[0])]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        dt = x.dtype
        shape4 = _legacy_dims(self, x.shape)
        rows = shape4[0] if self.across_channels else shape4[0] * shape4[1]
        x2 = x.reshape(rows, -1)
        out = x2 - x2.mean(axis=1, dtype=dt, keepdims=True)
        if self.normalize_variance:
            std = np.sqrt(np.square(out).mean(axis=1, dtype=dt, keepdims=True))
            std += dt.type(self.eps)
            out /= std
        return [out.reshape(shape4)]


# -- Normalize (SSD) ---------------------------------------------------------------------------


@register("Normalize")
class Normalize(LayerImpl):
    """SSD's L2 normalization (weiliu89/caffe ssd, normalize_layer.cpp), then a learned scale.

    eps goes inside the square root: ``x / sqrt(Σx² + eps)``, the sum over C·H·W per sample
    (across_spatial) or over C per pixel. Blob 0 is a 0-axis scalar when channel_shared, else
    (C,).
    """

    def setup(self) -> None:
        npar = self.param.norm_param
        self.across_spatial = npar.across_spatial
        self.channel_shared = npar.channel_shared
        self.eps = float(npar.eps)

    def _check(self, shape: Shape) -> None:
        if len(shape) < 2:
            raise self.invalid(f"input {list(shape)} needs at least 2 axes")
        _legacy_dims(self, shape)

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._check(bottom_shapes[0])
        return [()] if self.channel_shared else [(bottom_shapes[0][1],)]

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._check(bottom_shapes[0])
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        dt = x.dtype
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        if self.across_spatial:
            norm = np.sqrt(np.square(x3).sum(axis=(1, 2), dtype=dt) + dt.type(self.eps))
            # The fork multiplies by 1.0/norm, computed in double and stored in Dtype.
            inv = (1.0 / norm.astype(np.float64)).astype(dt)
            out = x3 * inv[:, None, None]
        else:
            norm = np.sqrt(np.square(x3).sum(axis=1, dtype=dt, keepdims=True)
                           + dt.type(self.eps))
            out = x3 / norm
        scale = np.asarray(blobs[0], dtype=dt)
        out *= scale.reshape(()) if self.channel_shared else scale.reshape(1, c, 1)
        return [out.reshape(x.shape)]


# -- BN (PSPNet / ENet forks) ------------------------------------------------------------------

_PSP_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")
_ENET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")


@register("BN")
class BN(LayerImpl):
    """The fork type "BN", which two incompatible forks define (see FORK_LAYERS.md).

    - PSPNet (hszhao/PSPNet): 4 blobs [1,C,1,1] slope, bias, mean, var;
      ``slope · (x - mean) · (var + eps)^-0.5 + bias`` in TEST or when frozen, batch
      statistics (biased variance) otherwise.
    - ENet/SegNet (TimoSaemann/caffe-enet): 2 blobs [1,C,1,1] scale, shift; INFERENCE is
      ``scale · x + shift``; LEARN (its default, also at test time) normalizes with this
      batch's mean and ``E[x²] - E[x]²`` plus a hard-coded 1e-9, and may output the batch mean
      and variance as tops 2 and 3.

    The fork is picked from the caffemodel's blob count (4 or 2), the bn_param fields that are
    set and the top count; a contradiction is an error. With nothing to go on (no weights, no
    fork-specific field, one top) the PSPNet form is assumed.
    """

    num_tops = (1, 3)
    EPS_ENET = 1e-9

    def setup(self) -> None:
        bp = self.param.bn_param
        psp = [f for f in _PSP_FIELDS if bp.HasField(f)]
        enet = [f for f in _ENET_FIELDS if bp.HasField(f)]
        if psp and enet:
            raise self.unsupported("bn_param", f"mixes PSPNet fields {psp} with ENet fields "
                                               f"{enet}; a BN layer is one fork or the other")
        votes = set()
        if psp:
            votes.add("pspnet")
        if enet:
            votes.add("enet")
        nblobs = len(self.layer.blobs)
        if nblobs:
            if nblobs not in (2, 4):
                raise self.invalid(f"the caffemodel has {nblobs} blobs; BN has 4 (PSPNet) or "
                                   "2 (ENet/SegNet)")
            votes.add("pspnet" if nblobs == 4 else "enet")
        if len(self.layer.tops) > 1:
            votes.add("enet")
        if len(votes) > 1:
            raise self.unsupported("bn_param", f"fields {psp or enet}, {nblobs} blobs and "
                                               f"{len(self.layer.tops)} tops disagree on the fork")
        self.fork = votes.pop() if votes else "pspnet"
        if self.fork == "pspnet":
            self.eps = float(bp.eps)
            # PSPNet's factory registers only the plain BNLayer (its cuDNN class is never
            # created), so `engine` changes nothing.
            self.use_stored = bp.frozen or self.phase == "TEST"
        else:
            self.learn = bp.bn_mode == bp.LEARN
            if not self.learn and len(self.layer.tops) > 1:
                raise self.invalid("bn_mode INFERENCE has exactly one top")

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        c = _legacy_dims(self, bottom_shapes[0])[1]
        return [(1, c, 1, 1)] * (4 if self.fork == "pspnet" else 2)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape4 = _legacy_dims(self, bottom_shapes[0])
        if self.fork == "pspnet":
            return [tuple(bottom_shapes[0])]
        # ENet reshapes its top with the legacy 4-axis accessors.
        return [shape4] + [(1, shape4[1], 1, 1)] * (len(self.layer.tops) - 1)

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        dt = x.dtype
        shape4 = _legacy_dims(self, x.shape)
        x4 = x.reshape(shape4)
        scale, shift = (_channel_view(b, 4, dt) for b in blobs[:2])
        if self.fork == "pspnet":
            if self.use_stored:
                mean, var = (_channel_view(b, 4, dt) for b in blobs[2:4])
                out = x4 - mean
            else:
                mean = x4.mean(axis=(0, 2, 3), dtype=dt, keepdims=True)
                out = x4 - mean
                var = np.square(out).mean(axis=(0, 2, 3), dtype=dt, keepdims=True)
            out *= np.power(var + dt.type(self.eps), dt.type(-0.5))
            out *= scale
            out += shift
            return [out.reshape(x.shape)]
        if not self.learn:
            out = x4 * scale
            out += shift
            return [out]
        mean = x4.mean(axis=(0, 2, 3), dtype=dt, keepdims=True)
        var = np.square(x4).mean(axis=(0, 2, 3), dtype=dt, keepdims=True) - np.square(mean)
        out = x4 - mean
        out /= np.sqrt(var + dt.type(self.EPS_ENET))
        out *= scale
        out += shift
        extra = [mean.reshape(1, -1, 1, 1), var.reshape(1, -1, 1, 1)]
        return [out] + extra[:len(self.layer.tops) - 1]

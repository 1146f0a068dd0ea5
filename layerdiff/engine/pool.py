"""Spatial pooling: Pooling (MAX, AVE, with the optional argmax top) and SPP.

Caffe's geometry (pooling_layer.cpp), which differs from the convolution one:

- an output axis has ``ceil((in + 2*pad - kernel) / stride) + 1`` cells (``floor`` with
  ``round_mode: FLOOR`` or the fork spelling ``ceil_mode: false``);
- when any pad is non-zero, a last window that would start at or past ``in + pad`` is dropped
  (on both axes), so every window starts inside the input or its leading padding;
- without padding there is no such rule, so a ceil window may lie wholly past the input.

Speed: each output is reduced tap by tap over ``kernel_h * kernel_w`` strided views of one
padded copy of the input (no Python loop over pixels). Reducing taps in window order
(row-major) keeps Caffe's summation order and its first-maximum tie rule.
"""

from __future__ import annotations

import numpy as np

from layerdiff.caffe import caffe_pb2
from layerdiff.engine.registry import LayerImpl, Shape, register

FLT_MAX = float(np.finfo(np.float32).max)
_PP = caffe_pb2.PoolingParameter
MAX, AVE, STOCHASTIC = _PP.MAX, _PP.AVE, _PP.STOCHASTIC


def pooled_size(size: int, kernel: int, pad: int, stride: int, floor: bool, clip: bool) -> int:
    """Caffe's pooled extent of one axis; ``clip`` (any pad non-zero) drops a window that
    would start in the trailing padding."""
    span = size + 2 * pad - kernel
    out = (span // stride if floor else -(-span // stride)) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool2d(x: np.ndarray, method: int, kernel: tuple[int, int], stride: tuple[int, int],
           pad: tuple[int, int], out: tuple[int, int], want_mask: bool = False
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Caffe's CPU pooling forward of an NCHW array, plus the argmax mask when asked.

    MAX starts every output at -FLT_MAX and takes a tap only when strictly greater (so
    padding, NaN and values <= -FLT_MAX never win, ties keep the first tap, and an empty
    window stays -FLT_MAX with mask -1). AVE sums the real pixels and divides by the window
    clipped to ``in + pad``: padding counts, overhang does not. That size is 0 (NaN result)
    or negative (-0.0) for a window wholly past the input.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out
    dt = x.dtype
    if oh <= 0 or ow <= 0:
        empty = np.zeros((n, c, max(oh, 0), max(ow, 0)), dt)
        return empty, (empty.copy() if want_mask else None)
    if oh == 1 and ow == 1 and ph == 0 and pw == 0 and kh >= h and kw >= w:
        return _pool_whole(x, method, want_mask)

    # One padded copy holding every window; MAX pads with -inf, which never beats -FLT_MAX.
    need_h, need_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    if ph == 0 and pw == 0 and need_h <= h and need_w <= w:
        xp = x
    else:
        fill = -np.inf if method == MAX else 0.0
        xp = np.full((n, c, max(need_h, ph + h), max(need_w, pw + w)), fill, dt)
        xp[:, :, ph:ph + h, pw:pw + w] = x

    def tap(i: int, j: int) -> np.ndarray:
        return xp[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]

    if method == MAX:
        acc = np.full((n, c, oh, ow), -FLT_MAX, dt)
        if not want_mask:
            for i in range(kh):
                for j in range(kw):
                    np.fmax(acc, tap(i, j), out=acc)  # fmax skips NaN, as Caffe's `>` does
            return acc, None
        # Max first, then the mask as the first tap equal to it: Caffe's strict `>` updates
        # stop at the first occurrence of the final maximum. The taps are visited last to
        # first with a branch-free select, much faster than masked writes per tap.
        taps = [tap(i, j) for i in range(kh) for j in range(kw)]
        for v in taps:
            np.fmax(acc, v, out=acc)
        won = np.zeros((n, c, oh, ow), np.int32)
        eq = np.empty(acc.shape, bool)
        for k in range(len(taps) - 1, -1, -1):
            np.equal(taps[k], acc, out=eq)
            won -= eq * (won - np.int32(k))
        ti, tj = np.divmod(won, np.int32(kw))
        y = np.arange(oh, dtype=np.int64)[:, None] * sh - ph + ti
        x_ = np.arange(ow, dtype=np.int64) * sw - pw + tj
        # acc still -FLT_MAX: nothing beat it (empty window, all NaN or <= -FLT_MAX).
        mask = np.where(acc > -FLT_MAX, y * w + x_, -1).astype(dt)
        return acc, mask

    acc = np.zeros((n, c, oh, ow), dt)
    for i in range(kh):
        for j in range(kw):
            np.add(acc, tap(i, j), out=acc)
    hs, ws = np.arange(oh) * sh - ph, np.arange(ow) * sw - pw
    size_h = np.minimum(hs + kh, h + ph) - hs
    size_w = np.minimum(ws + kw, w + pw) - ws
    size = (size_h[:, None] * size_w[None, :]).astype(dt)
    with np.errstate(divide="ignore", invalid="ignore"):
        return acc / size, None


def _pool_whole(x: np.ndarray, method: int, want_mask: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
    # One window covering the whole plane (global pooling): reduce the flattened plane.
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    if method == AVE:
        # add.accumulate sums left to right, Caffe's order, so the result is bit-equal.
        total = np.add.accumulate(flat, axis=2)[:, :, -1]
        return (total / x.dtype.type(h * w)).reshape(n, c, 1, 1), None
    best = np.fmax.reduce(flat, axis=2, initial=-FLT_MAX)
    mask = None
    if want_mask:
        first = np.argmax(flat == best[:, :, None], axis=2)
        mask = np.where(best > -FLT_MAX, first, -1).astype(x.dtype).reshape(n, c, 1, 1)
    return best.reshape(n, c, 1, 1), mask


@register("Pooling")
class Pooling(LayerImpl):
    """Caffe's Pooling; a MAX layer with two tops also outputs the argmax as float ``y*W+x``
    within the input plane (what ENet's Upsample consumes)."""

    num_tops = (1, 2)

    def setup(self) -> None:
        p = self.param.pooling_param
        self.method = p.pool
        if p.pool == STOCHASTIC:
            raise self.unsupported("pool", "STOCHASTIC pooling: Caffe's CPU forward is not "
                                   "implemented")
        if len(self.layer.tops) == 2 and p.pool != MAX:
            raise self.invalid("only MAX pooling has a second (argmax mask) top")
        has = p.HasField
        self.global_pooling = p.global_pooling
        if self.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise self.unsupported("kernel_size", "global_pooling takes the kernel from "
                                       "the input; a kernel size may not be given")
            self.kernel = (0, 0)  # the input's H, W, known in top_shapes
        else:
            if has("kernel_size") == (has("kernel_h") and has("kernel_w")):
                raise self.unsupported("kernel_size", "give kernel_size or kernel_h and "
                                       "kernel_w (both), not both forms and not neither")
            self.kernel = ((p.kernel_size, p.kernel_size) if has("kernel_size")
                           else (p.kernel_h, p.kernel_w))
            if min(self.kernel) <= 0:
                raise self.unsupported("kernel_size", "kernel dimensions must be positive")
        self.pad = self._pair("pad", p.pad, p.pad_h, p.pad_w)
        self.stride = self._pair("stride", p.stride, p.stride_h, p.stride_w)
        if min(self.stride) <= 0:
            raise self.unsupported("stride", "stride must be positive")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.unsupported("global_pooling", "with global_pooling only pad 0 and "
                                   "stride 1 are allowed (Caffe CHECK)")
        if any(self.pad) and (self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]):
            raise self.unsupported("pad", f"pad {list(self.pad)} must be smaller than the "
                                   f"kernel {list(self.kernel)} (Caffe CHECK)")
        floor_round = p.round_mode == _PP.FLOOR
        if has("ceil_mode"):
            if has("round_mode") and floor_round == p.ceil_mode:
                raise self.unsupported("ceil_mode", "contradicts round_mode")
            floor_round = not p.ceil_mode
        self.floor = floor_round

    def _pair(self, name: str, both: int, h: int, w: int) -> tuple[int, int]:
        # Caffe: `name` alone, or `name_h` and `name_w` together.
        p = self.param.pooling_param
        has_h, has_w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        if not ((not p.HasField(name) and has_h and has_w) or (not has_h and not has_w)):
            raise self.unsupported(name, f"give {name} or {name}_h and {name}_w (both), not "
                                   "both forms")
        return (h, w) if has_h else (both, both)

    def geometry(self, shape: Shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """(kernel, output size) for a bottom shape, with Caffe's shape CHECKs."""
        if len(shape) != 4:
            raise self.invalid(f"input must have 4 axes (N, C, H, W), got {list(shape)}")
        h, w = shape[2], shape[3]
        kernel = (h, w) if self.global_pooling else self.kernel
        clip = any(self.pad)
        out = tuple(pooled_size(s, k, p, st, self.floor, clip)
                    for s, k, p, st in zip((h, w), kernel, self.pad, self.stride, strict=True))
        if clip and any((o - 1) * st >= s + p for o, st, s, p in
                        zip(out, self.stride, (h, w), self.pad, strict=True)):
            raise self.invalid(f"the last pooling window of output {list(out)} starts past "
                               f"the padded input {h}x{w} (Caffe CHECK)")
        return kernel, out

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        _, (oh, ow) = self.geometry(s)
        return [(s[0], s[1], oh, ow)] * len(self.layer.tops)

    def forward(self, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
        x = bottoms[0]
        kernel, out = self.geometry(x.shape)
        two = len(self.layer.tops) == 2
        top, mask = pool2d(x, self.method, kernel, self.stride, self.pad, out, two)
        return [top, mask] if two else [top]


@register("SPP")
class SPP(LayerImpl):
    """Spatial pyramid pooling (spp_layer.cpp): level l pools into about 2^l x 2^l bins with
    kernel = stride = ceil(in / bins) and pad = (kernel*bins - in + 1) // 2, as a plain
    Pooling (ceil rounding, clip rule). Levels are flattened per sample and concatenated
    coarse to fine; a one-level pyramid outputs the unflattened (N, C, 1, 1) pooling."""

    def setup(self) -> None:
        p = self.param.spp_param
        if p.pool == caffe_pb2.SPPParameter.STOCHASTIC:
            raise self.unsupported("pool", "STOCHASTIC pooling: Caffe's CPU forward is not "
                                   "implemented")
        self.method = MAX if p.pool == caffe_pb2.SPPParameter.MAX else AVE
        self.height = p.pyramid_height
        if self.height < 1:
            raise self.unsupported("pyramid_height", "must be at least 1")

    def levels(self, shape: Shape) -> list[tuple[tuple[int, int], tuple[int, int],
                                                 tuple[int, int]]]:
        """(kernel, pad, output size) per pyramid level, with Pooling's CHECKs."""
        if len(shape) != 4:
            raise self.invalid(f"input must have 4 axes (N, C, H, W), got {list(shape)}")
        h, w = shape[2], shape[3]
        if h <= 0 or w <= 0:
            raise self.invalid("input dimensions cannot be zero")
        out = []
        for level in range(self.height):
            bins = 2 ** level
            kernel = (-(-h // bins), -(-w // bins))
            pad = tuple((k * bins - s + 1) // 2 for k, s in zip(kernel, (h, w), strict=True))
            if any(pad) and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
                raise self.unsupported("pyramid_height", f"level {level} needs pad {list(pad)} "
                                       f">= kernel {list(kernel)} on a {h}x{w} input "
                                       "(Caffe CHECK)")
            size = tuple(pooled_size(s, k, p, k, False, any(pad))
                         for s, k, p in zip((h, w), kernel, pad, strict=True))
            out.append((kernel, pad, size))
        return out

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        n, c = bottom_shapes[0][:2]
        levels = self.levels(bottom_shapes[0])
        if self.height == 1:
            return [(n, c, *levels[0][2])]
        return [(n, sum(c * oh * ow for _, _, (oh, ow) in levels))]

    def forward(self, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
        x = bottoms[0]
        pooled = [pool2d(x, self.method, k, k, p, o)[0] for k, p, o in self.levels(x.shape)]
        if self.height == 1:
            return pooled
        return [np.concatenate([t.reshape(x.shape[0], -1) for t in pooled], axis=1)]

"""Resampling layers of Caffe forks: Interp (PSPNet/DeepLab v2) and Upsample (ENet
max-unpooling with 2 bottoms, YOLO-style nearest neighbour with 1 bottom).

See ``shared/golden/FORK_LAYERS.md`` for the fork sources these follow.
"""

from __future__ import annotations

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register


def _interp_axis(n_in: int, n_out: int, dtype: np.dtype
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of one axis of align-corners bilinear resampling.

    Like the fork's interp.cpp, the ratio and source coordinate are float32 whatever the data
    type; the next index is the same one on the last row; the weights become ``dtype``.
    """
    ratio = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = ratio * np.arange(n_out, dtype=np.float32)
    i0 = src.astype(np.int64)  # truncation; src >= 0
    i1 = i0 + (i0 < n_in - 1)
    lam1 = (src - i0.astype(np.float32)).astype(dtype)
    lam0 = dtype.type(1) - lam1
    return i0, i1, lam0, lam1


@register("Interp")
class Interp(LayerImpl):
    """Bilinear align-corners resize (PSPNet's interp_layer.cpp): non-positive pad_beg/pad_end
    crop the input first; the output size comes from shrink/zoom factors or height/width."""

    def setup(self) -> None:
        p = self.param.interp_param
        if p.pad_beg > 0 or p.pad_end > 0:
            raise self.unsupported("pad_beg", "only non-positive padding (cropping) is "
                                   "supported by the fork")
        has = p.HasField
        if not (has("shrink_factor") or has("zoom_factor") or (has("height") and has("width"))):
            raise self.unsupported("interp_param", "give zoom_factor, shrink_factor or height "
                                   "and width")
        if has("shrink_factor") and p.shrink_factor < 1:
            raise self.unsupported("shrink_factor", "must be positive")
        if has("zoom_factor") and p.zoom_factor < 1:
            raise self.unsupported("zoom_factor", "must be positive")

    def _sizes(self, shape: Shape) -> tuple[int, int, int, int]:
        """(h_in_eff, w_in_eff, h_out, w_out) per the fork's Reshape, first rule wins."""
        if len(shape) != 4:
            raise self.invalid(f"input must have 4 axes (N, C, H, W), got {list(shape)}")
        p = self.param.interp_param
        has = p.HasField
        crop = p.pad_beg + p.pad_end
        hi, wi = shape[2] + crop, shape[3] + crop
        shrink = has("shrink_factor")
        zoom = has("zoom_factor")
        if shrink and not zoom:
            ho, wo = (hi - 1) // p.shrink_factor + 1, (wi - 1) // p.shrink_factor + 1
        elif zoom and not shrink:
            ho, wo = hi + (hi - 1) * (p.zoom_factor - 1), wi + (wi - 1) * (p.zoom_factor - 1)
        elif has("height") and has("width"):
            ho, wo = p.height, p.width
        else:  # both factors: shrink, then zoom
            ho, wo = (hi - 1) // p.shrink_factor + 1, (wi - 1) // p.shrink_factor + 1
            ho, wo = ho + (ho - 1) * (p.zoom_factor - 1), wo + (wo - 1) * (p.zoom_factor - 1)
        if hi <= 0 or wi <= 0:
            raise self.invalid(f"cropping by pad_beg/pad_end leaves an empty {hi}x{wi} input")
        if ho <= 0 or wo <= 0:
            raise self.invalid(f"output size {ho}x{wo} must be positive")
        return hi, wi, ho, wo

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        _, _, ho, wo = self._sizes(s)
        return [(s[0], s[1], ho, wo)]

    def forward(self, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
        x = bottoms[0]
        hi, wi, ho, wo = self._sizes(x.shape)
        off = -self.param.interp_param.pad_beg  # the fork offsets both axes by -pad_beg
        x = x[:, :, off:off + hi, off:off + wi]
        if (hi, wi) == (ho, wo):
            return [x.copy()]
        hy0, hy1, h0, h1 = _interp_axis(hi, ho, x.dtype)
        wx0, wx1, w0, w1 = _interp_axis(wi, wo, x.dtype)
        # Blend along W once per input row, then along H: the fork's per-pixel expression
        # h0*(w0*a + w1*b) + h1*(w0*c + w1*d) with the same operations.
        rows = w0 * x[..., wx0] + w1 * x[..., wx1]
        out = h0[:, None] * rows[:, :, hy0] + h1[:, None] * rows[:, :, hy1]
        return [out]


@register("Upsample")
class Upsample(LayerImpl):
    """Two fork layers share this type name, told apart by the bottom count.

    2 bottoms (ENet/SegNet upsample_layer.cpp): max-unpooling. Each value goes to the flat
    position its mask entry (float ``y*W+x`` from a 2-top MAX Pooling) names in an all-zero
    output plane; a later input position wins on a repeated index. Size: upsample_h x
    upsample_w when both are set, else ``in*scale - pad_out`` with scale 2 by default.

    1 bottom (YOLO forks): nearest neighbour, ``out[y, x] = in[y // s, x // s]``, scale 1 by
    default. The merged proto has no default for ``scale``, so presence is tested.
    """

    num_bottoms = (1, 2)

    def setup(self) -> None:
        p = self.param.upsample_param
        has = p.HasField
        self.unpool = len(self.layer.bottoms) == 2
        if not self.unpool:
            for f in ("scale_h", "scale_w", "pad_out_h", "pad_out_w", "upsample_h",
                      "upsample_w"):
                if has(f):
                    raise self.unsupported(f, "only max-unpooling (2 bottoms) has this field; "
                                           "nearest-neighbour Upsample takes only scale")
            self.scale = p.scale if has("scale") else 1
            if self.scale < 1:
                raise self.unsupported("scale", "must be at least 1")
            return
        # The checks of the ENet fork's LayerSetUp.
        if not ((has("upsample_h") and has("upsample_w"))
                or (not has("scale") and has("scale_h") and has("scale_w"))
                or (not has("scale_h") and not has("scale_w"))):
            raise self.unsupported("scale", "give upsample_h and upsample_w, or scale, or "
                                   "scale_h and scale_w")
        self.size: tuple[int, int] | None = None
        if has("upsample_h") and has("upsample_w"):
            self.size = (p.upsample_h, p.upsample_w)
            if min(self.size) <= 1:
                raise self.unsupported("upsample_h", "upsample_h and upsample_w must be > 1")
            return
        self.scales = ((p.scale_h, p.scale_w) if has("scale_h")
                       else (p.scale, p.scale) if has("scale") else (2, 2))
        if min(self.scales) <= 1:
            raise self.unsupported("scale", "the max-unpooling scale must be > 1")
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for axis, (s, po) in zip("hw", zip(self.scales, self.pad_out, strict=True), strict=True):
            if po and s != 2:
                raise self.unsupported(f"pad_out_{axis}", f"requires scale_{axis} == 2")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        if len(s) != 4:
            raise self.invalid(f"input must have 4 axes (N, C, H, W), got {list(s)}")
        if not self.unpool:
            return [(s[0], s[1], s[2] * self.scale, s[3] * self.scale)]
        if tuple(bottom_shapes[1]) != tuple(s):
            raise self.invalid(f"mask shape {list(bottom_shapes[1])} differs from the values' "
                               f"{list(s)}")
        if self.size is not None:
            return [(s[0], s[1], *self.size)]
        return [(s[0], s[1], s[2] * self.scales[0] - self.pad_out[0],
                 s[3] * self.scales[1] - self.pad_out[1])]

    def forward(self, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
        x = bottoms[0]
        n, c, h, w = x.shape
        if not self.unpool:
            s = self.scale
            out = np.empty((n, c, h * s, w * s), x.dtype)
            out.reshape(n, c, h, s, w, s)[...] = x[:, :, :, None, :, None]
            return [out]
        oh, ow = self.top_shapes([x.shape, bottoms[1].shape])[0][2:]
        plane = oh * ow
        mask = bottoms[1].reshape(n * c, h * w)
        if not np.isfinite(mask).all():
            raise self.invalid("the mask holds non-finite indices")
        idx = mask.astype(np.int64)  # truncation toward zero, as the fork's static_cast<int>
        if idx.size and (idx.min() < 0 or idx.max() >= plane):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise self.invalid(f"mask index {bad} is outside the {oh}x{ow} output plane "
                               "(the fork aborts: scale must match the pooling that made it)")
        dest = (idx + (np.arange(n * c, dtype=np.int64) * plane)[:, None]).ravel()
        vals = x.reshape(-1)
        out = np.zeros(n * c * plane, x.dtype)
        if dest.size and np.bincount(dest, minlength=out.size).max() > 1:
            # Repeated indices: keep the last input position, as the fork's loop does.
            last = np.full(out.size, -1, np.int64)
            np.maximum.at(last, dest, np.arange(dest.size))
            keep = last[dest] == np.arange(dest.size)
            dest, vals = dest[keep], vals[keep]
        out[dest] = vals
        return [out.reshape(n, c, oh, ow)]

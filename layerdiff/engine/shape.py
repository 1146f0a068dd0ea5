"""Data-movement layers: Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Permute,
ShuffleChannel, Silence, BatchReindex, Filter.

None of these does arithmetic, so each output is bit-equal to Caffe's. Layers that Caffe runs
by sharing memory (Reshape, Flatten, identity Permute) return read-only views here; the others
return new arrays.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register


def _count(shape: Shape, start: int = 0, end: int | None = None) -> int:
    return int(np.prod(shape[start:end], dtype=np.int64))


@register("Concat")
class Concat(LayerImpl):
    """Joins its bottoms along one axis (``axis``, or the legacy non-negative ``concat_dim``)."""

    num_bottoms = (1, None)

    def setup(self) -> None:
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.unsupported("axis", "give either axis or concat_dim, not both")

    def _axis(self, ndim: int) -> int:
        p = self.param.concat_param
        if p.HasField("concat_dim"):  # legacy: no negative indexing (concat_layer.cpp)
            if p.concat_dim >= ndim:
                raise self.unsupported("concat_dim", f"{p.concat_dim} out of range for {ndim}-D")
            return p.concat_dim
        return self.canonical_axis(p.axis, ndim)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        first = bottom_shapes[0]
        self.axis = self._axis(len(first))
        total = 0
        for s in bottom_shapes:
            off_axis = [d for i, d in enumerate(s) if i != self.axis]
            if len(s) != len(first) or off_axis != [d for i, d in enumerate(first)
                                                    if i != self.axis]:
                raise self.invalid(f"bottoms {[list(b) for b in bottom_shapes]} differ off the "
                                   f"concat axis {self.axis}")
            total += s[self.axis]
        return [first[:self.axis] + (total,) + first[self.axis + 1:]]

    def forward(self, bottoms, blobs):
        if len(bottoms) == 1:
            return [bottoms[0]]
        return [np.concatenate(bottoms, axis=self._axis(bottoms[0].ndim))]


@register("Slice")
class Slice(LayerImpl):
    """Cuts its bottom along one axis at ``slice_point``s, or into equal parts without them."""

    num_tops = (1, None)

    def setup(self) -> None:
        p = self.param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.unsupported("axis", "give either axis or slice_dim, not both")
        self.points = [int(v) for v in p.slice_point]
        ntop = len(self.layer.tops)
        if self.points and len(self.points) != ntop - 1:
            raise self.unsupported("slice_point", f"{len(self.points)} points for {ntop} tops "
                                   "(needs one fewer than the tops)")
        if any(b <= a for a, b in pairwise([0] + self.points)):
            raise self.unsupported("slice_point", f"{self.points} must be positive and increasing")

    def _axis(self, ndim: int) -> int:
        p = self.param.slice_param
        if p.HasField("slice_dim"):  # legacy: no negative indexing (slice_layer.cpp)
            if p.slice_dim >= ndim:
                raise self.unsupported("slice_dim", f"{p.slice_dim} out of range for {ndim}-D")
            return p.slice_dim
        return self.canonical_axis(p.axis, ndim)

    def _bounds(self, shape: Shape) -> tuple[int, list[int]]:
        axis = self._axis(len(shape))
        size, ntop = shape[axis], len(self.layer.tops)
        if self.points:
            if ntop > size:
                raise self.invalid(f"{ntop} tops cannot slice axis {axis} of size {size}")
            if self.points[-1] > size:
                raise self.invalid(f"slice_point {self.points[-1]} beyond axis {axis} size {size}")
            return axis, [0] + self.points + [size]
        if size % ntop:
            raise self.unsupported("slice_point", f"none given, and {ntop} tops do not evenly "
                                   f"divide axis {axis} of size {size}")
        return axis, [i * (size // ntop) for i in range(ntop + 1)]

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        axis, b = self._bounds(s)
        return [s[:axis] + (hi - lo,) + s[axis + 1:] for lo, hi in pairwise(b)]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        axis, b = self._bounds(x.shape)
        index = [slice(None)] * x.ndim
        outs = []
        for lo, hi in pairwise(b):
            index[axis] = slice(lo, hi)
            outs.append(np.ascontiguousarray(x[tuple(index)]))
        return outs


@register("Split")
class Split(LayerImpl):
    """Each top is a copy of the bottom."""

    num_tops = (1, None)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]] * len(self.layer.tops)

    def forward(self, bottoms, blobs):
        return [bottoms[0].copy() for _ in self.layer.tops]


@register("Flatten")
class Flatten(LayerImpl):
    """Merges axes ``axis`` .. ``end_axis`` (both inclusive, negatives from the end) into one."""

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        p = self.param.flatten_param
        a = self.canonical_axis(p.axis, len(s))
        e = self.canonical_axis(p.end_axis, len(s), "end_axis")
        # end_axis == axis - 1 is legal in Caffe and inserts a unit axis (count() of nothing).
        if e + 1 < a:
            raise self.unsupported("end_axis", f"{p.end_axis} is before axis {p.axis}")
        return [s[:a] + (_count(s, a, e + 1),) + s[e + 1:]]

    def forward(self, bottoms, blobs):
        return [bottoms[0].reshape(self.top_shapes([bottoms[0].shape])[0])]


@register("Reshape")
class Reshape(LayerImpl):
    """Caffe's Reshape: 0 copies the bottom dim, one -1 is inferred; ``axis``/``num_axes``
    pick the replaced range, and a negative ``axis`` counts from *after* the last axis
    (-1 appends), see reshape_layer.cpp."""

    def setup(self) -> None:
        p = self.param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        if self.dims.count(-1) > 1:
            raise self.unsupported("shape", f"{self.dims} has more than one -1")
        if any(d < -1 for d in self.dims):
            raise self.unsupported("shape", f"{self.dims}: dims must be >= -1")
        if p.num_axes < -1:
            raise self.unsupported("num_axes", f"{p.num_axes}: must be >= 0, or -1 for all")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        p = self.param.reshape_param
        ndim = len(s)
        start = p.axis if p.axis >= 0 else ndim + p.axis + 1
        if not 0 <= start <= ndim:
            raise self.unsupported("axis", f"{p.axis} out of range for a {ndim}-D blob")
        end = ndim if p.num_axes == -1 else start + p.num_axes
        if end > ndim:
            raise self.unsupported("num_axes", f"axis {p.axis} + num_axes {p.num_axes} is past "
                                   f"the {ndim} axes of the bottom")
        new = list(self.dims)
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= ndim:
                    raise self.unsupported("shape", f"dim {i} is 0 but the bottom has no axis "
                                           f"{start + i} to copy")
                new[i] = s[start + i]
        if -1 in new:
            known = _count(s, 0, start) * _count(s, end) * int(np.prod(
                [d for d in new if d != -1], dtype=np.int64))
            if known == 0 or _count(s) % known:
                raise self.invalid(f"bottom count {_count(s)} is not divisible by the given "
                                   f"dims' product {known} (shape {self.dims})")
            new[new.index(-1)] = _count(s) // known
        top = s[:start] + tuple(new) + s[end:]
        if _count(top) != _count(s):
            raise self.invalid(f"output shape {list(top)} has {_count(top)} elements, the "
                               f"bottom {list(s)} has {_count(s)}")
        return [top]

    def forward(self, bottoms, blobs):
        return [bottoms[0].reshape(self.top_shapes([bottoms[0].shape])[0])]


@register("Crop")
class Crop(LayerImpl):
    """Crops bottom[0] to bottom[1]'s shape on the axes from ``axis`` on, at ``offset``."""

    num_bottoms = (2, 2)

    def _offsets(self, s: Shape, ref: Shape) -> list[int]:
        p = self.param.crop_param
        ndim = len(s)
        start = self.canonical_axis(p.axis, ndim)
        offs = [int(o) for o in p.offset]
        if len(offs) > 1 and start + len(offs) != ndim:
            raise self.unsupported("offset", f"{len(offs)} offsets, but axes {start}.."
                                   f"{ndim - 1} are cropped (one value, or one per axis)")
        if len(ref) < ndim:
            raise self.invalid(f"reference bottom {list(ref)} has fewer axes than {list(s)}")
        out = [0] * ndim
        for i in range(start, ndim):
            out[i] = offs[0] if len(offs) == 1 else offs[i - start] if offs else 0
            if s[i] - out[i] < ref[i]:
                raise self.invalid(f"crop of axis {i} out of bounds: size {ref[i]} at offset "
                                   f"{out[i]} in {s[i]}")
        return out

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s, ref = bottom_shapes
        start = self.canonical_axis(self.param.crop_param.axis, len(s))
        self._offsets(s, ref)
        return [s[:start] + tuple(ref[start:len(s)])]

    def forward(self, bottoms, blobs):
        x, ref = bottoms
        offs = self._offsets(x.shape, ref.shape)
        (top,) = self.top_shapes([x.shape, ref.shape])
        return [x[tuple(slice(o, o + n) for o, n in zip(offs, top, strict=True))].copy()]


@register("Tile")
class Tile(LayerImpl):
    """Repeats the block from ``axis`` on ``tiles`` times (whole blocks, like np.tile)."""

    def setup(self) -> None:
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise self.unsupported("tiles", "must be given")
        if p.tiles <= 0:
            raise self.unsupported("tiles", f"{p.tiles}: must be positive")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        a = self.canonical_axis(self.param.tile_param.axis, len(s))
        return [s[:a] + (s[a] * self.param.tile_param.tiles,) + s[a + 1:]]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        a = self.canonical_axis(self.param.tile_param.axis, x.ndim)
        t = self.param.tile_param.tiles
        outer, inner = _count(x.shape, 0, a), _count(x.shape, a)
        out = np.broadcast_to(x.reshape(outer, 1, inner), (outer, t, inner))
        return [np.ascontiguousarray(out).reshape(self.top_shapes([x.shape])[0])]


@register("Permute")
class Permute(LayerImpl):
    """SSD fork: transpose to ``order``, the unlisted axes appended in increasing order."""

    def setup(self) -> None:
        self.order = [int(o) for o in self.param.permute_param.order]
        if len(set(self.order)) != len(self.order):
            raise self.unsupported("order", f"{self.order} repeats an axis")

    def _axes(self, ndim: int) -> list[int]:
        bad = [o for o in self.order if o >= ndim]
        if bad:
            raise self.unsupported("order", f"{bad} not below the {ndim} axes of the bottom")
        return self.order + [i for i in range(ndim) if i not in self.order]

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        return [tuple(s[i] for i in self._axes(len(s)))]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        axes = self._axes(x.ndim)
        if axes == sorted(axes):  # the fork shares the data
            return [x]
        return [np.ascontiguousarray(x.transpose(axes))]


@register("ShuffleChannel")
class ShuffleChannel(LayerImpl):
    """ShuffleNet fork: output channel j*g + i = input channel i*(C/g) + j."""

    def setup(self) -> None:
        self.group = int(self.param.shuffle_channel_param.group)
        if self.group <= 0:
            raise self.unsupported("group", f"{self.group}: must be positive")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        if len(s) < 2 or s[1] % self.group:
            raise self.invalid(f"channels of {list(s)} not divisible by group {self.group}")
        return [s]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        n, c = x.shape[:2]
        g = self.group
        y = x.reshape(n, g, c // g, -1).transpose(0, 2, 1, 3)
        return [np.ascontiguousarray(y).reshape(x.shape)]


@register("Silence")
class Silence(LayerImpl):
    """Consumes its bottoms, produces nothing."""

    num_bottoms = (1, None)
    num_tops = (0, 0)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return []

    def forward(self, bottoms, blobs):
        return []


@register("BatchReindex")
class BatchReindex(LayerImpl):
    """top[i] = bottom[0][int(bottom[1][i])]; bottom[1] is a 1-D blob of (float) indices."""

    num_bottoms = (2, 2)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s, idx = bottom_shapes
        if len(idx) != 1:
            raise self.invalid(f"the index bottom must be 1-D, it is {list(idx)}")
        return [idx + s[1:]]

    def forward(self, bottoms, blobs):
        x, idx = bottoms
        # Caffe checks 0 <= index < N on the float values, then truncates them to int.
        ok = (idx >= 0) & (idx < x.shape[0])
        if not ok.all():
            raise self.invalid(f"index {idx[~ok][0]} outside the batch of {x.shape[0]}")
        return [x[idx.astype(np.int64)]]


@register("Filter")
class Filter(LayerImpl):
    """Keeps the items (axis 0) of bottoms[:-1] whose selector (the last bottom) is non-zero.

    The kept count depends on the selector's values, so it cannot be known at plan time:
    :meth:`top_shapes` reports the full batch (as Caffe's own first Reshape does, see
    filter_layer.cpp) and :meth:`forward` returns only the kept items.
    """

    num_bottoms = (2, None)
    num_tops = (1, None)
    dynamic_shape = True

    def setup(self) -> None:
        if len(self.layer.tops) != len(self.layer.bottoms) - 1:
            raise self.invalid(f"needs one top per filtered bottom ({len(self.layer.bottoms) - 1}"
                               f"), has {len(self.layer.tops)}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        sel = bottom_shapes[-1]
        if len(sel) < 1 or any(d != 1 for d in sel[1:]):
            raise self.invalid(f"selector {list(sel)} must be (N, 1, ...): singletons after "
                               "the first axis")
        for s in bottom_shapes[:-1]:
            if len(s) < 1 or s[0] != sel[0]:
                raise self.invalid(f"bottom {list(s)} and selector {list(sel)} differ on axis 0")
        return [tuple(s) for s in bottom_shapes[:-1]]

    def forward(self, bottoms, blobs):
        keep = np.flatnonzero(bottoms[-1].reshape(-1) != 0)
        return [b[keep] for b in bottoms[:-1]]

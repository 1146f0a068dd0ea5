"""Read the blobs of a binary ``.caffemodel`` straight from its bytes.

A caffemodel is a serialized ``NetParameter``. Decoding it with protobuf would turn every weight
into a Python float first; instead this walks the wire format by hand down to
``layer.blobs.data`` and hands each packed float run to ``np.frombuffer`` (zero copy). Only the
layer name, type and blobs are read: the prototxt defines everything else, and fork layer params
that no schema knows are skipped rather than failing.

Field numbers used (all from BVLC ``caffe.proto``): NetParameter ``layer`` 100 (LayerParameter:
name 1, type 2, blobs 7) and the V1 ``layers`` 2 (V1LayerParameter: name 4, type 5 as an enum,
blobs 6); BlobProto: num 1, channels 2, height 3, width 4, data 5, diff 6, shape 7 (BlobShape:
dim 1), double_data 8, double_diff 9.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerdiff.errors import ModelFormatError

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# NetParameter fields and the wire type each must have; anything else means "not a caffemodel".
_NET_FIELDS = {1: _LEN, 2: _LEN, 3: _LEN, 4: _VARINT, 5: _VARINT, 6: _LEN, 7: _VARINT,
               8: _LEN, 100: _LEN}


@dataclass
class RawBlob:
    """One stored blob: its values (float32 or float64, flat) and the shape it was saved with."""

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool  # shape came from the old num/channels/height/width fields (always 4-D)


@dataclass
class WeightLayer:
    name: str
    type: str  # V2 type string, or the V1 enum number as a string (upgraded by the reader)
    blobs: list[RawBlob]
    v1: bool


class _Reader:
    """Minimal protobuf wire reader over a bytes-like buffer."""

    def __init__(self, buf: bytes | mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path

    def fail(self, pos: int, msg: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {msg} (at byte {pos} of {len(self.buf)})")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf = self.buf
        result = shift = 0
        while True:
            if pos >= end:
                raise self.fail(pos, "truncated or corrupt caffemodel: varint runs past its end")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise self.fail(pos, "corrupt caffemodel: varint longer than 10 bytes")

    def fields(self, pos: int, end: int):
        """Yield (field number, wire type, value or (start, stop)) for one message."""
        while pos < end:
            key, pos = self.varint(pos, end)
            num, wt = key >> 3, key & 7
            if num == 0:
                raise self.fail(pos, "corrupt caffemodel: field number 0")
            if wt == _VARINT:
                val, pos = self.varint(pos, end)
                yield num, wt, val
            elif wt == _LEN:
                n, pos = self.varint(pos, end)
                if pos + n > end:
                    raise self.fail(pos, "truncated caffemodel: a field runs past the end")
                yield num, wt, (pos, pos + n)
                pos += n
            elif wt in (_FIXED32, _FIXED64):
                width = 4 if wt == _FIXED32 else 8
                if pos + width > end:
                    raise self.fail(pos, "truncated caffemodel: a field runs past the end")
                yield num, wt, (pos, pos + width)
                pos += width
            else:
                raise self.fail(pos, f"not a Caffe model: invalid wire type {wt}")

    def text(self, span: tuple[int, int]) -> str:
        return bytes(self.buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def read_caffemodel(path: str | Path) -> list[WeightLayer]:
    """All layers of a caffemodel that carry a name, in file order, with their blobs."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            buf = fh.read()
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read caffemodel ({e.strerror})") from None
    if not buf:
        raise ModelFormatError(f"{path}: empty file, not a caffemodel")
    r = _Reader(buf, path)
    layers: list[WeightLayer] = []
    for num, wt, val in r.fields(0, len(buf)):
        want = _NET_FIELDS.get(num)
        if want is None or want != wt:
            raise r.fail(0, f"not a Caffe model: unexpected field {num} (wire type {wt}) "
                            "in NetParameter")
        if num == 100:
            layers.append(_layer(r, val, v1=False))
        elif num == 2:
            layers.append(_layer(r, val, v1=True))
    if not layers:
        raise ModelFormatError(f"{path}: no layers found; not a Caffe model")
    return layers


def _layer(r: _Reader, span: tuple[int, int], v1: bool) -> WeightLayer:
    name_no, type_no, blobs_no = (4, 5, 6) if v1 else (1, 2, 7)
    name, type_, blobs = "", "", []
    for num, wt, val in r.fields(*span):
        if num == name_no and wt == _LEN:
            name = r.text(val)
        elif num == type_no:
            type_ = str(val) if wt == _VARINT else r.text(val)
        elif num == blobs_no and wt == _LEN:
            blobs.append(_blob(r, val, name))
        elif v1 and num == 1 and wt == _LEN:
            raise r.fail(val[0], "V0 layer definitions (pre-2014 caffemodels) are not supported")
    return WeightLayer(name, type_, blobs, v1)


def _blob(r: _Reader, span: tuple[int, int], layer: str) -> RawBlob:
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    has_legacy = False
    shape: tuple[int, ...] | None = None
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    for num, wt, val in r.fields(*span):
        if num in legacy and wt == _VARINT:
            legacy[num] = _int32(val)
            has_legacy = True
        elif num == 7 and wt == _LEN:
            shape = _shape(r, val)
        elif num == 5:
            floats.append(_numbers(r, wt, val, "<f4", _FIXED32, layer, span[0]))
        elif num == 8:
            doubles.append(_numbers(r, wt, val, "<f8", _FIXED64, layer, span[0]))
    if has_legacy:
        dims = tuple(legacy[k] for k in (1, 2, 3, 4))
        is_legacy = True
    else:
        dims = shape if shape is not None else (0,)
        is_legacy = False
    if doubles and not floats:
        data = doubles[0] if len(doubles) == 1 else np.concatenate(doubles)
    elif floats:
        data = floats[0] if len(floats) == 1 else np.concatenate(floats)
    else:
        data = np.zeros(0, np.float32)
    if any(d < 0 for d in dims):
        raise r.fail(span[0], f"layer '{layer}': blob has a negative dimension {dims}")
    count = math.prod(dims)  # exact: np.prod would wrap around on absurd dims
    if data.size != count:
        raise r.fail(span[0], f"layer '{layer}': blob shape {list(dims)} needs {count} values "
                              f"but {data.size} are stored")
    return RawBlob(data, dims, is_legacy)


def _shape(r: _Reader, span: tuple[int, int]) -> tuple[int, ...]:
    dims: list[int] = []
    for num, wt, val in r.fields(*span):
        if num != 1:
            continue
        if wt == _VARINT:
            dims.append(_int64(val))
        elif wt == _LEN:  # packed
            pos, end = val
            while pos < end:
                d, pos = r.varint(pos, end)
                dims.append(_int64(d))
    return tuple(dims)


def _numbers(r: _Reader, wt: int, val, dtype: str, scalar_wt: int, layer: str,
             at: int) -> np.ndarray:
    if wt not in (_LEN, scalar_wt):  # e.g. a varint, whose val is a number, not a span
        raise r.fail(at, f"layer '{layer}': blob data has wire type {wt}")
    start, stop = val
    width = np.dtype(dtype).itemsize
    if wt == _LEN:  # packed run: zero-copy view on the file bytes
        if (stop - start) % width:
            raise r.fail(start, f"layer '{layer}': packed blob data is not a whole number of "
                                f"{width}-byte values")
        return np.frombuffer(r.buf, dtype=dtype, count=(stop - start) // width, offset=start)
    return np.frombuffer(r.buf, dtype=dtype, count=1, offset=start)  # one unpacked value


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _int64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF  # a 10-byte varint can carry more than 64 bits
    return v - (1 << 64) if v >= 1 << 63 else v

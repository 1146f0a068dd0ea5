"""Property-based fuzzing of the Caffe readers: bad bytes end in a LayerdiffError, nothing else.

``layerdiff.caffe.reader.parse_prototxt``/``load_caffe`` and
``layerdiff.caffe.weights.read_caffemodel`` (plus ``make_plan``, which checks the blobs a
caffemodel declares) see random bytes, truncations, bit flips and structural mutations of real
caffemodels from ``../shared/corpus``, and token soup and mutations of real prototxts. The only
exception allowed out is :class:`layerdiff.errors.LayerdiffError`.

Bounded for CI: derandomized (the same examples every run, no example database) and sized so the
whole file takes about two minutes on a 2-core machine. ``LAYERDIFF_FUZZ_SCALE=10`` multiplies
every example budget and ``LAYERDIFF_FUZZ_RANDOM=1`` draws new examples, for a longer local hunt.
Every crash found became an ``@example`` below (or a
plain test) and was fixed in the product code.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from golden import CORPUS, require_shared
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from layerdiff.caffe import load_caffe, parse_prototxt
from layerdiff.caffe.weights import _Reader, read_caffemodel
from layerdiff.engine import make_plan
from layerdiff.errors import LayerdiffError

SCALE = float(os.environ.get("LAYERDIFF_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("LAYERDIFF_FUZZ_RANDOM") == "1"  # new examples each run (local hunts)


def _fuzz(n: int):
    """Derandomized settings with an example budget of ``n`` (times LAYERDIFF_FUZZ_SCALE)."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=not RANDOM,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# Small real models (a V2 and a V1 caffemodel, one with PReLU).
WEIGHTS = {
    "lenet": ("lenet_mnist", "deploy.prototxt", "lenet_iter_10000.caffemodel"),
    "det1": ("mtcnn_det1", "deploy.prototxt", "det1.caffemodel"),
    "quick_v1": ("cifar10_quick_v1", "deploy.prototxt", "cifar10_quick_iter_5000.caffemodel"),
}
PROTOTXTS = ["lenet_mnist/deploy.prototxt", "mtcnn_det1/deploy.prototxt",
             "cifar10_quick_v1/deploy.prototxt", "cifar10_full/deploy.prototxt",
             "cifar10_resnet20_junyuseu/train_test.prototxt",
             "opencv_res10_ssd_face/deploy.prototxt"]

_cache: dict[str, bytes] = {}


def _corpus_bytes(rel: str) -> bytes:
    if rel not in _cache:
        require_shared()
        _cache[rel] = (CORPUS / rel).read_bytes()
    return _cache[rel]


def _structure_offsets(buf: bytes) -> list[int]:
    """Byte offsets of every protobuf key and length prefix in ``buf`` (outside float runs).

    Random flips in a caffemodel mostly land in weight values, which are just numbers; aiming
    at keys and lengths reaches the parser's structural checks.
    """
    r = _Reader(buf, Path("x"))
    out: list[int] = []

    def walk(start: int, end: int, depth: int) -> None:
        pos = start
        while pos < end:
            out.append(pos)
            try:
                key, after_key = r.varint(pos, end)
            except LayerdiffError:
                return
            wt = key & 7
            if wt == 2:
                out.append(after_key)
                n, body = r.varint(after_key, end)
                # layer (100), V1 layers (2), blobs (7 / 6), blob shape (7): nested messages
                if depth < 4 and (key >> 3) in (2, 6, 7, 100) and n < 1 << 20:
                    walk(body, body + n, depth + 1)
                pos = body + n
            elif wt == 0:
                pos = r.varint(after_key, end)[1]
            elif wt in (1, 5):
                pos = after_key + (8 if wt == 1 else 4)
            else:
                return

    walk(0, len(buf), 0)
    return out


_offsets: dict[str, list[int]] = {}


def _offsets_of(name: str) -> list[int]:
    if name not in _offsets:
        _offsets[name] = _structure_offsets(_corpus_bytes("/".join(WEIGHTS[name][::2])))
    return _offsets[name]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _read_weights(scratch: Path, data: bytes) -> None:
    """read_caffemodel must return consistent blobs or raise a LayerdiffError."""
    path = scratch / "w.caffemodel"
    path.write_bytes(data)
    try:
        layers = read_caffemodel(path)
    except LayerdiffError:
        return
    for lay in layers:
        for b in lay.blobs:
            assert b.data.ndim == 1 and b.data.size == math.prod(b.shape)
            assert b.data.dtype in (np.float32, np.float64)


def _load(scratch: Path, proto: bytes | None, weights: bytes | None, plan: bool = True,
          shape=None) -> None:
    """load_caffe (+ make_plan) must succeed or raise a LayerdiffError."""
    ppath = scratch / "deploy.prototxt"
    wpath = scratch / "w.caffemodel"
    if proto is not None:
        ppath.write_bytes(proto)
    if weights is not None:
        wpath.write_bytes(weights)
    try:
        parse_prototxt(ppath)
        net = load_caffe(prototxt=ppath, weights=wpath if weights is not None else None,
                         shape=shape)
        if plan:
            make_plan(net)
    except LayerdiffError:
        pass


# -- caffemodel: random bytes ------------------------------------------------------------------
@_fuzz(10000)
@given(st.binary(min_size=1, max_size=300))
@example(b"\xa2\x06\xff\xff\xff\xff\xff\xff\xff\xff\x7f")  # huge length varint
@example(b"\xa2\x06\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # varint > 10 bytes
@example(b"\x00")  # field number 0
@example(b"\xa2\x06\x04\x3a\x02\x3a\x00")  # layer > blob > empty shape
def test_caffemodel_random_bytes(scratch, data):
    _read_weights(scratch, data)


def _blob_msg(dims: list[int], n_floats: int, packed: bool = True) -> bytes:
    """A layer named "ip" with one blob declaring ``dims`` and holding ``n_floats`` floats."""
    def varint(v: int) -> bytes:
        v &= (1 << 70) - 1
        out = bytearray()
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)

    def field(num: int, payload: bytes) -> bytes:
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    shape = field(1, b"".join(varint(d) for d in dims))
    values = struct.pack(f"<{n_floats}f", *([0.5] * n_floats))
    data = field(5, values) if packed else b"".join(b"\x2d" + values[i:i + 4]
                                                     for i in range(0, len(values), 4))
    blob = field(7, shape) + data
    layer = field(1, b"ip") + field(2, b"InnerProduct") + field(7, blob)
    return field(100, layer)


# Hand-built blobs: the declared shape and the stored value count must agree exactly.
@_fuzz(2500)
@given(dims=st.lists(st.one_of(st.integers(-3, 8), st.integers(-(1 << 66), 1 << 70)),
                     max_size=6),
       n=st.integers(0, 64), packed=st.booleans())
@example(dims=[1 << 32, 1 << 32], n=0, packed=True)  # int64 product wraps to 0
@example(dims=[1 << 65], n=0, packed=True)  # more than 64 bits: np.prod overflowed
@example(dims=[-1, -1], n=1, packed=True)
@example(dims=[0, 5], n=0, packed=False)
def test_caffemodel_declared_shapes(scratch, dims, n, packed):
    data = _blob_msg(dims, n, packed)
    _read_weights(scratch, data)
    path = scratch / "w.caffemodel"
    try:
        layers = read_caffemodel(path)
    except LayerdiffError as e:
        assert "w.caffemodel" in str(e)
        return
    (blob,) = layers[0].blobs
    assert blob.data.size == n == math.prod(blob.shape)


# -- caffemodel: mutations of real files -------------------------------------------------------
# A mutation is a list of (op, offset, argument) edits, so a failure prints a few numbers rather
# than a megabyte of bytes, and a regression is an @example of its edits.
OPS = ("flip", "byte", "truncate", "delete", "insert", "varint")


@st.composite
def edits(draw, name: str):
    structural = _offsets_of(name)
    size = len(_corpus_bytes("/".join(WEIGHTS[name][::2])))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(OPS))
        pos = draw(st.one_of(st.sampled_from(structural), st.integers(0, size - 1)))
        if op == "insert":
            arg = draw(st.binary(min_size=1, max_size=12))
        else:
            arg = draw(st.integers(0, 255))
        out.append((op, pos, arg))
    return out


def _apply(name: str, ops) -> bytes:
    buf = bytearray(_corpus_bytes("/".join(WEIGHTS[name][::2])))
    for op, pos, arg in ops:
        if not buf:
            break
        pos %= len(buf)
        if op == "flip":
            buf[pos] ^= 1 << (arg % 8)
        elif op == "byte":
            buf[pos] = arg
        elif op == "truncate":
            del buf[pos:]
        elif op == "delete":
            del buf[pos:pos + 1 + arg % 16]
        elif op == "insert":
            buf[pos:pos] = arg
        else:  # a maximal varint of 1 + arg % 11 bytes
            buf[pos:pos + 1] = b"\xff" * (1 + arg % 11) + b"\x7f"
    return bytes(buf)


# Regressions found by this fuzzer (each crashed before the fix noted):
MUTATION_EXAMPLES = {
    # blob data (field 5) re-typed as a varint: _numbers unpacked an int (TypeError)
    "quick_v1": [[("byte", 162, 0x28)]],
}


@pytest.mark.parametrize("name", ["lenet", "det1", "quick_v1"])
def test_caffemodel_mutations(scratch, name):
    require_shared()

    @_fuzz(4000)
    @given(edits(name))
    def check(ops):
        _read_weights(scratch, _apply(name, ops))

    for ops in MUTATION_EXAMPLES.get(name, []):
        check = example(ops)(check)
    check()


@pytest.mark.parametrize("name", ["det1", "quick_v1"])
def test_mutated_caffemodel_with_its_prototxt(scratch, name):
    """Reader + plan: a damaged caffemodel under the right prototxt (blob shapes checked)."""
    require_shared()
    folder, proto, _ = WEIGHTS[name]
    proto_bytes = _corpus_bytes(f"{folder}/{proto}")

    @_fuzz(2000)
    @given(edits(name))
    def check(ops):
        _load(scratch, proto_bytes, _apply(name, ops))

    check()


@pytest.mark.parametrize("name", ["lenet", "det1"])
@pytest.mark.parametrize("cut", [1, 2, 3, 100, 0.5, -1])
def test_truncated_caffemodel(scratch, name, cut):
    require_shared()
    data = _corpus_bytes("/".join(WEIGHTS[name][::2]))
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path = scratch / "t.caffemodel"
    path.write_bytes(data[:n])
    with pytest.raises(LayerdiffError, match="t.caffemodel"):
        read_caffemodel(path)


# -- prototxt: token soup ----------------------------------------------------------------------
TOKENS = [
    "layer", "layers", "{", "}", "name:", "type:", "bottom:", "top:", '"data"', '"conv"',
    '"c"', '"Convolution"', '"Input"', '"ReLU"', '"Pooling"', '"InnerProduct"', '"Eltwise"',
    '"Concat"', '"Data"', '"Softmax"', '"BatchNorm"', '"Scale"', '"Reshape"', '"Slice"',
    '"Split"', '"Foo"', "CONVOLUTION", "RELU", "POOLING", "input:", "input_dim:",
    "input_shape", "dim:", "input_param", "shape", "convolution_param", "num_output:",
    "kernel_size:", "stride:", "pad:", "group:", "pooling_param", "pool:", "MAX", "AVE",
    "include", "exclude", "phase:", "TEST", "TRAIN", "stage:", "min_level:", "1", "0", "-1",
    "3", "7", "2147483648", "99999999999999999999", "1e400", "-0", "nan", "inf", "0x10",
    "'single'", '"unterminated', '"esc\\x"', '"\\777"', "#comment\n", ";", ":", ",", "<", ">",
    "[", "]", "\x00", "\ufffd", "é", "\n", "\t", "reshape_param", "bias_term:", "true",
    "false", "blobs", "data:", "batch_size:", "memory_data_param", "channels:", "height:",
    "width:", "state", "force_backward:", "debug_info:",
]


@_fuzz(10000)
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=60),
       st.sampled_from([" ", "\n", ""]))
@example(['input:', '"data"', 'input_dim:', '99999999999999999999'], " ")
@example(['layer', '{', 'name:', '"\\777"', '}'], " ")
@example(['layer', '{', 'type:', '"ReLU"', 'bottom:', '"c"', 'top:', '"c"', '}'], " ")
@example(['\x00'], "")
def test_prototxt_token_soup(scratch, tokens, sep):
    _load(scratch, sep.join(tokens).encode("utf-8", "surrogatepass"), None)


# A small valid head the soup can extend, so the reader's later checks are reached too.
HEAD = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 ' \
       'dim: 8 dim: 8 } } }\n'


@_fuzz(5000)
@given(st.lists(st.sampled_from(TOKENS[:80]), max_size=40))
def test_prototxt_soup_after_valid_input(scratch, tokens):
    _load(scratch, (HEAD + " ".join(tokens)).encode(), None)


# -- prototxt: mutations of real files ---------------------------------------------------------
_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:e-?\d+)?|\w+:?|[{}]|\S')


@st.composite
def mutated_prototxt(draw, rels=tuple(PROTOTXTS)):
    rel = draw(st.sampled_from(rels))
    toks = _TOKEN_RE.findall(_corpus_bytes(rel).decode())
    for _ in range(draw(st.integers(1, 5))):
        if not toks:
            break
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(["delete", "dup", "replace", "number", "swap", "insert"]))
        if op == "delete":
            del toks[i:i + draw(st.integers(1, 8))]
        elif op == "dup":
            toks[i:i] = toks[i:i + draw(st.integers(1, 30))]
        elif op == "replace":
            toks[i] = draw(st.sampled_from(TOKENS))
        elif op == "number":
            nums = [k for k, t in enumerate(toks) if re.fullmatch(r"-?\d+", t)]
            if nums:
                k = draw(st.sampled_from(nums))
                toks[k] = str(draw(st.one_of(st.integers(-2, 10), st.integers(-(1 << 70),
                                                                             1 << 70))))
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        else:
            toks.insert(i, draw(st.text(min_size=1, max_size=6)))
    return rel, " ".join(toks).encode("utf-8", "surrogatepass")


def test_prototxt_mutations(scratch):
    require_shared()

    @_fuzz(6000)
    @given(mutated_prototxt())
    def check(case):
        rel, text = case
        shape = (1, 3, 32, 32) if "train_test" in rel else None
        _load(scratch, text, None, shape=shape)

    check()


def test_prototxt_mutations_with_weights(scratch):
    """A damaged lenet prototxt with its real caffemodel: weight matching and blob checks."""
    require_shared()
    weights = _corpus_bytes("lenet_mnist/lenet_iter_10000.caffemodel")

    @_fuzz(1500)
    @given(mutated_prototxt(rels=("lenet_mnist/deploy.prototxt",)))
    def check(case):
        _load(scratch, case[1], weights)

    check()

"""Pooling and SPP: Caffe's loop semantics on cases the goldens leave open, float64, the argmax
top, the fork ``ceil_mode`` spelling and every refusal Caffe CHECKs."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from golden import GOLDEN, require_shared
from nets import caffe_net

from layerdiff.caffe import load_caffe
from layerdiff.engine import make_plan, run_caffe
from layerdiff.errors import LayerdiffError

FLT_MAX = float(np.finfo(np.float32).max)


def _net(tmp_path, body: str, shape=(2, 3, 7, 9)):
    return caffe_net(tmp_path, body, {"data": shape})


def _run(tmp_path, body: str, x: np.ndarray, dtype: str = "float32"):
    net = _net(tmp_path, body, x.shape)
    return run_caffe(net, {"data": x}, dtype=dtype)


def caffe_pool(x, method, k, s, p, floor=False):
    """A literal per-pixel transcription of pooling_layer.cpp's CPU forward (the oracle)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    rnd = math.floor if floor else math.ceil
    oh = int(rnd((h + 2 * ph - kh) / sh)) + 1
    ow = int(rnd((w + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        oh -= (oh - 1) * sh >= h + ph
        ow -= (ow - 1) * sw >= w + pw
    dt = x.dtype.type
    top = np.zeros((n, c, oh, ow), x.dtype)
    mask = np.full((n, c, oh, ow), -1.0, x.dtype)
    for b, ch, y, xx in itertools.product(range(n), range(c), range(oh), range(ow)):
        hs, ws = y * sh - ph, xx * sw - pw
        if method == "MAX":
            he, we = min(hs + kh, h), min(ws + kw, w)
            best = dt(-FLT_MAX)
            for r in range(max(hs, 0), he):
                for q in range(max(ws, 0), we):
                    if x[b, ch, r, q] > best:
                        best = x[b, ch, r, q]
                        mask[b, ch, y, xx] = r * w + q
            top[b, ch, y, xx] = best
        else:
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            size = (he - hs) * (we - ws)
            acc = dt(0)
            for r in range(max(hs, 0), min(he, h)):
                for q in range(max(ws, 0), min(we, w)):
                    acc = dt(acc + x[b, ch, r, q])
            with np.errstate(divide="ignore", invalid="ignore"):
                top[b, ch, y, xx] = dt(acc / dt(size))
    return top, mask


def _param(method, k, s, p, floor):
    return (f"pool: {method} kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} "
            f"stride_w: {s[1]} pad_h: {p[0]} pad_w: {p[1]}"
            + (" round_mode: FLOOR" if floor else ""))


GEOMETRIES = [  # (kernel, stride, pad, floor, input H x W)
    ((3, 3), (2, 2), (0, 0), False, (8, 10)),
    ((3, 3), (2, 2), (1, 1), False, (8, 10)),
    ((2, 2), (3, 3), (0, 0), False, (7, 9)),    # empty last column
    ((2, 2), (4, 4), (0, 0), False, (7, 9)),    # empty last row
    ((2, 3), (1, 2), (1, 0), False, (5, 8)),    # pad_h only: the clip rule hits W too
    ((3, 2), (2, 3), (2, 1), True, (6, 7)),
    ((4, 4), (3, 3), (3, 1), False, (5, 5)),
    ((5, 5), (2, 2), (0, 0), False, (3, 4)),    # kernel > input: one overhanging window
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: str(g))
def test_pooling_matches_caffe_loop(tmp_path, geo, method, dtype):
    k, s, p, floor, (h, w) = geo
    rng = np.random.RandomState(7)
    # Small integers make ties common, so the first-maximum rule is exercised.
    x = rng.randint(-3, 4, (2, 3, h, w)).astype(dtype)
    x[0, 0, 0, 0] = np.nan
    x[0, 1, :2, :2] = -np.inf
    tops = 'top: "pool" top: "mask"' if method == "MAX" else 'top: "pool"'
    tr = _run(tmp_path, f'layer {{ name: "pool" type: "Pooling" bottom: "data" {tops} '
              f"pooling_param {{ {_param(method, k, s, p, floor)} }} }}", x, dtype)
    ref, ref_mask = caffe_pool(x, method, k, s, p, floor)
    got = tr["pool"].outputs
    assert got[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got[0], ref)  # NaN == NaN here, and bit-equal otherwise
    assert np.array_equal(np.signbit(got[0]), np.signbit(ref))  # -0.0 of negative windows
    if method == "MAX":
        np.testing.assert_array_equal(got[1], ref_mask)


def test_global_pooling_bit_equal_and_mask(tmp_path):
    x = np.random.RandomState(1).randint(-5, 5, (2, 4, 6, 5)).astype(np.float32)
    x[1, 2] = np.nan
    x[1, 3] = -np.inf
    tr = _run(tmp_path, 'layer { name: "g" type: "Pooling" bottom: "data" top: "g" top: "m" '
              'pooling_param { pool: MAX global_pooling: true } }\n'
              'layer { name: "a" type: "Pooling" bottom: "data" top: "a" '
              'pooling_param { pool: AVE global_pooling: true } }', x)
    ref, ref_mask = caffe_pool(x, "MAX", (6, 5), (1, 1), (0, 0))
    np.testing.assert_array_equal(tr["g"].outputs[0], ref)
    np.testing.assert_array_equal(tr["g"].outputs[1], ref_mask)
    assert tr["g"].outputs[0][1, 2, 0, 0] == -FLT_MAX and tr["g"].outputs[1][1, 2, 0, 0] == -1
    np.testing.assert_array_equal(tr["a"].outputs[0], caffe_pool(x, "AVE", (6, 5), (1, 1),
                                                                 (0, 0))[0])


def test_ceil_mode_fork_spelling(tmp_path):
    x = np.random.RandomState(2).uniform(-1, 1, (1, 2, 7, 9)).astype(np.float32)
    body = ('layer {{ name: "{n}" type: "Pooling" bottom: "data" top: "{n}" '
            'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 {extra} }} }}\n')
    tr = _run(tmp_path, body.format(n="fork_floor", extra="ceil_mode: false")
              + body.format(n="bvlc_floor", extra="round_mode: FLOOR")
              + body.format(n="fork_ceil", extra="ceil_mode: true")
              + body.format(n="default", extra=""), x)
    assert tr["fork_floor"].output.shape == (1, 2, 3, 4)
    np.testing.assert_array_equal(tr["fork_floor"].output, tr["bvlc_floor"].output)
    assert tr["fork_ceil"].output.shape == tr["default"].output.shape == (1, 2, 4, 5)


def test_bottom_is_not_written(tmp_path):
    x = np.random.RandomState(3).uniform(-1, 1, (1, 2, 7, 9)).astype(np.float32)
    keep = x.copy()
    _run(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" top: "m" '
         'pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }', x)
    np.testing.assert_array_equal(x, keep)


BAD_POOLING = {
    "global_with_kernel": "pool: MAX global_pooling: true kernel_size: 2",
    "global_with_pad": "pool: AVE global_pooling: true pad: 1",
    "kernel_both_forms": "pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2",
    "kernel_h_only": "pool: MAX kernel_h: 2",
    "no_kernel": "pool: MAX stride: 2",
    "zero_kernel": "pool: MAX kernel_size: 0",
    "pad_both_forms": "pool: MAX kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1",
    "pad_h_only": "pool: MAX kernel_size: 3 pad_h: 1",
    "stride_w_only": "pool: MAX kernel_size: 3 stride_w: 2",
    "zero_stride": "pool: MAX kernel_size: 3 stride: 0",
    "pad_w_eq_kernel": "pool: AVE kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2",
    "round_mode_vs_ceil_mode": "pool: MAX kernel_size: 2 round_mode: FLOOR ceil_mode: true",
}


@pytest.mark.parametrize("param", BAD_POOLING.values(), ids=BAD_POOLING.keys())
def test_pooling_refusals(tmp_path, param):
    net = _net(tmp_path, f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" '
               f"pooling_param {{ {param} }} }}")
    with pytest.raises(LayerdiffError, match="layer 'p' \\(Pooling\\)"):
        make_plan(net)


def test_pooling_shape_refusals(tmp_path):
    two_tops_ave = _net(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                        'top: "m" pooling_param { pool: AVE kernel_size: 2 } }')
    with pytest.raises(LayerdiffError, match="mask"):
        make_plan(two_tops_ave)
    three_d = _net(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                   'pooling_param { pool: MAX kernel_size: 2 } }', shape=(2, 3, 7))
    with pytest.raises(LayerdiffError, match="4 axes"):
        make_plan(three_d)
    too_big = _net(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                   'pooling_param { pool: MAX kernel_size: 10 } }')
    with pytest.raises(LayerdiffError, match="negative"):
        make_plan(too_big)


@pytest.mark.parametrize("case", ["pool_global_stride2", "pool_max_pad_eq_kernel",
                                  "pool_stochastic"])
def test_rejected_goldens(tmp_path, case):
    require_shared()
    entry = json.loads((GOLDEN / "unit" / "rejected.json").read_text())[case]
    path = tmp_path / "deploy.prototxt"
    path.write_text(entry["deploy.prototxt"])
    with pytest.raises(LayerdiffError):
        make_plan(load_caffe(prototxt=path))


def caffe_spp(x, height, method):
    """SPP by its definition in spp_layer.cpp, on top of the pooling oracle."""
    n, _, h, w = x.shape
    outs = []
    for level in range(height):
        bins = 2 ** level
        k = (math.ceil(h / bins), math.ceil(w / bins))
        p = ((k[0] * bins - h + 1) // 2, (k[1] * bins - w + 1) // 2)
        outs.append(caffe_pool(x, method, k, k, p)[0])
    if height == 1:
        return outs[0]
    return np.concatenate([o.reshape(n, -1) for o in outs], axis=1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("height,method,hw", [(1, "MAX", (7, 9)), (3, "AVE", (6, 11)),
                                              (3, "MAX", (9, 6)), (2, "AVE", (2, 3))])
def test_spp_matches_definition(tmp_path, dtype, height, method, hw):
    x = np.random.RandomState(4).uniform(-1, 1, (2, 3, *hw)).astype(dtype)
    tr = _run(tmp_path, f'layer {{ name: "spp" type: "SPP" bottom: "data" top: "spp" '
              f"spp_param {{ pyramid_height: {height} pool: {method} }} }}", x, dtype)
    ref = caffe_spp(x, height, method)
    got = tr["spp"].output
    assert got.shape == ref.shape and got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    if height == 1:
        assert got.shape == (2, 3, 1, 1)  # one level is not flattened


def test_spp_refusals(tmp_path):
    stochastic = _net(tmp_path, 'layer { name: "s" type: "SPP" bottom: "data" top: "s" '
                      'spp_param { pyramid_height: 2 pool: STOCHASTIC } }')
    with pytest.raises(LayerdiffError, match="STOCHASTIC"):
        make_plan(stochastic)
    no_height = _net(tmp_path, 'layer { name: "s" type: "SPP" bottom: "data" top: "s" }')
    with pytest.raises(LayerdiffError, match="pyramid_height"):
        make_plan(no_height)
    # 4x4 bins on a 1-row input need pad 2 >= kernel 1: Caffe's Pooling CHECK aborts.
    tiny = _net(tmp_path, 'layer { name: "s" type: "SPP" bottom: "data" top: "s" '
                'spp_param { pyramid_height: 3 } }', shape=(1, 2, 1, 8))
    with pytest.raises(LayerdiffError, match="pad"):
        make_plan(tiny)

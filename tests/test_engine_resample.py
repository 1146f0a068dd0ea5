"""Interp and Upsample (no goldens for Upsample; Interp's golden lacks crops and shrink):
checked against per-pixel transcriptions of the fork formulas in FORK_LAYERS.md and against
hand-computed unpooling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nets import caffe_net

from layerdiff.engine import make_plan, run_caffe
from layerdiff.errors import LayerdiffError


def _net(tmp_path, body: str, shape=(2, 3, 7, 9)):
    return caffe_net(tmp_path, body, {"data": shape})


def _run(tmp_path, body: str, x: np.ndarray, dtype: str = "float32"):
    return run_caffe(_net(tmp_path, body, x.shape), {"data": x}, dtype=dtype)


def fork_interp(x, hi, wi, ho, wo, off):
    """interp.cpp's bilinear loop, pixel by pixel, with its float32 ratio arithmetic."""
    n, c = x.shape[:2]
    src = x[:, :, off:off + hi, off:off + wi]
    if (hi, wi) == (ho, wo):
        return src.copy()
    f32, dt = np.float32, x.dtype.type
    rh = f32(hi - 1) / f32(ho - 1) if ho > 1 else f32(0)
    rw = f32(wi - 1) / f32(wo - 1) if wo > 1 else f32(0)
    out = np.empty((n, c, ho, wo), x.dtype)
    for y, xx in itertools.product(range(ho), range(wo)):
        hr, wr = rh * f32(y), rw * f32(xx)
        h1, w1 = int(hr), int(wr)
        hp, wp = int(h1 < hi - 1), int(w1 < wi - 1)
        hl, wl = dt(hr - f32(h1)), dt(wr - f32(w1))
        h0l, w0l = dt(1) - hl, dt(1) - wl
        out[:, :, y, xx] = (h0l * (w0l * src[:, :, h1, w1] + wl * src[:, :, h1, w1 + wp])
                            + hl * (w0l * src[:, :, h1 + hp, w1]
                                    + wl * src[:, :, h1 + hp, w1 + wp]))
    return out


INTERP = [  # (interp_param, input H x W, (hi, wi, ho, wo, offset))
    ("height: 9 width: 13", (5, 7), (5, 7, 9, 13, 0)),
    ("height: 3 width: 4", (5, 7), (5, 7, 3, 4, 0)),
    ("height: 1 width: 6", (5, 7), (5, 7, 1, 6, 0)),
    ("height: 5 width: 7", (1, 1), (1, 1, 5, 7, 0)),
    ("zoom_factor: 8", (4, 3), (4, 3, 25, 17, 0)),
    ("shrink_factor: 2", (9, 8), (9, 8, 5, 4, 0)),
    ("shrink_factor: 2 zoom_factor: 3", (9, 8), (9, 8, 13, 10, 0)),
    ("zoom_factor: 2 height: 50 width: 50", (4, 5), (4, 5, 7, 9, 0)),  # zoom wins
    ("zoom_factor: 2 pad_beg: -1 pad_end: -2", (8, 9), (5, 6, 9, 11, 1)),
    ("height: 5 width: 6 pad_beg: -1 pad_end: -2", (8, 9), (5, 6, 5, 6, 1)),  # crop only
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("param,hw,geo", INTERP, ids=[p for p, _, _ in INTERP])
def test_interp_matches_fork_loop(tmp_path, param, hw, geo, dtype):
    x = np.random.RandomState(5).uniform(-1, 1, (2, 3, *hw)).astype(dtype)
    tr = _run(tmp_path, f'layer {{ name: "i" type: "Interp" bottom: "data" top: "i" '
              f"interp_param {{ {param} }} }}", x, dtype)
    ref = fork_interp(x, *geo)
    got = tr["i"].output
    assert got.shape == ref.shape and got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, ref, rtol=0, atol=4 * np.finfo(dtype).eps)


BAD_INTERP = {
    "no_size": "pad_beg: 0",
    "height_only": "height: 4",
    "positive_pad": "height: 4 width: 4 pad_beg: 1",
    "zero_zoom": "zoom_factor: 0",
    "zero_shrink": "shrink_factor: 0",
    "crop_everything": "zoom_factor: 2 pad_beg: -4 pad_end: -4",
    "zero_width": "height: 4 width: 0",
}


@pytest.mark.parametrize("param", BAD_INTERP.values(), ids=BAD_INTERP.keys())
def test_interp_refusals(tmp_path, param):
    net = _net(tmp_path, f'layer {{ name: "i" type: "Interp" bottom: "data" top: "i" '
               f"interp_param {{ {param} }} }}")
    with pytest.raises(LayerdiffError, match="layer 'i' \\(Interp\\)"):
        make_plan(net)


def _pool_unpool(upsample: str, pool="kernel_size: 2 stride: 2"):
    return ('layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask" '
            f"pooling_param {{ pool: MAX {pool} }} }}\n"
            'layer { name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up" '
            f"upsample_param {{ {upsample} }} }}\n")


def _expected_unpool(x, k, s):
    """Each k x k / s window's first maximum stays in place; everything else is zero."""
    n, c, h, w = x.shape
    out = np.zeros_like(x)
    for b, ch in itertools.product(range(n), range(c)):
        for y0, x0 in itertools.product(range(0, h, s), range(0, w, s)):
            win = x[b, ch, y0:y0 + k, x0:x0 + k]
            r, q = np.unravel_index(np.argmax(win), win.shape)
            out[b, ch, y0 + r, x0 + q] = win[r, q]
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hw,upsample", [
    ((8, 10), ""),                                   # default scale 2
    ((8, 10), "scale: 2"),
    ((7, 9), "scale: 2 pad_out_h: true pad_out_w: true"),
    ((7, 9), "upsample_h: 7 upsample_w: 9"),
    ((8, 9), "scale_h: 2 scale_w: 2 pad_out_w: true"),
])
def test_unpooling_reconstructs_max_positions(tmp_path, hw, upsample, dtype):
    x = np.random.RandomState(6).uniform(-1, 1, (2, 3, *hw)).astype(dtype)
    tr = _run(tmp_path, _pool_unpool(upsample), x, dtype)
    got = tr["up"].output
    assert got.shape == x.shape and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, _expected_unpool(x, 2, 2))


def test_unpooling_scale3_and_repeated_index(tmp_path):
    x = np.random.RandomState(8).uniform(-1, 1, (1, 2, 9, 12)).astype(np.float32)
    tr = _run(tmp_path, _pool_unpool("scale: 3", "kernel_size: 3 stride: 3"), x)
    np.testing.assert_array_equal(tr["up"].output, _expected_unpool(x, 3, 3))

    # Overlapping windows (k3 s2) give repeated indices: the later input position wins.
    vals = np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4)
    mask = np.zeros_like(vals)
    mask[0, 0, 0, :2] = 5
    mask[0, 0, 2, 3] = 63  # last cell of the 8x8 plane
    net = _net(tmp_path, 'layer { name: "in2" type: "Input" top: "m" '
               'input_param { shape { dim: 1 dim: 1 dim: 3 dim: 4 } } }\n'
               'layer { name: "up" type: "Upsample" bottom: "data" bottom: "m" top: "up" '
               "upsample_param { upsample_h: 8 upsample_w: 8 } }", (1, 1, 3, 4))
    out = run_caffe(net, {"data": vals, "m": mask})["up"].output
    expect = np.zeros((1, 1, 8, 8), np.float32)
    expect.flat[5] = 2    # positions 0 and 1 (values 1, 2) both map to 5
    expect.flat[0] = 11   # positions 2..10 map to 0 (mask left at 0): value 11 is last
    expect.flat[63] = 12
    np.testing.assert_array_equal(out, expect)

    mask = mask.copy()  # run_caffe froze the fed array
    mask[0, 0, 1, 1] = 64  # one past the plane: the fork aborts
    with pytest.raises(LayerdiffError, match="outside"):
        run_caffe(net, {"data": vals, "m": mask})
    mask = mask.copy()
    mask[0, 0, 1, 1] = -1  # the mask of an empty pooling window
    with pytest.raises(LayerdiffError, match="outside"):
        run_caffe(net, {"data": vals, "m": mask})


BAD_UNPOOL = {
    "scale_1": "scale: 1",
    "scale_and_scale_h": "scale: 2 scale_h: 2 scale_w: 2",
    "scale_h_only": "scale_h: 2",
    "pad_out_needs_scale_2": "scale: 3 pad_out_h: true",
    "upsample_1": "upsample_h: 1 upsample_w: 8",
}


@pytest.mark.parametrize("param", BAD_UNPOOL.values(), ids=BAD_UNPOOL.keys())
def test_unpooling_refusals(tmp_path, param):
    with pytest.raises(LayerdiffError, match="layer 'up' \\(Upsample\\)"):
        make_plan(_net(tmp_path, _pool_unpool(param), (2, 3, 8, 10)))


def test_unpooling_mask_shape_mismatch(tmp_path):
    net = _net(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
               "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n"
               'layer { name: "up" type: "Upsample" bottom: "p" bottom: "data" top: "up" }')
    with pytest.raises(LayerdiffError, match="mask shape"):
        make_plan(net)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nearest_upsample(tmp_path, dtype):
    x = np.random.RandomState(9).uniform(-1, 1, (2, 3, 4, 5)).astype(dtype)
    tr = _run(tmp_path, 'layer { name: "u2" type: "Upsample" bottom: "data" top: "u2" '
              "upsample_param { scale: 2 } }\n"
              'layer { name: "u1" type: "Upsample" bottom: "data" top: "u1" }', x, dtype)
    got = tr["u2"].output
    assert got.shape == (2, 3, 8, 10) and got.dtype == np.dtype(dtype)
    for y, xx in itertools.product(range(8), range(10)):
        np.testing.assert_array_equal(got[:, :, y, xx], x[:, :, y // 2, xx // 2])
    np.testing.assert_array_equal(tr["u1"].output, x)  # default scale 1 with one bottom


@pytest.mark.parametrize("param", ["scale: 0", "scale_h: 2 scale_w: 2", "upsample_h: 8 "
                                   "upsample_w: 8", "pad_out_h: true"])
def test_nearest_upsample_refusals(tmp_path, param):
    net = _net(tmp_path, f'layer {{ name: "u" type: "Upsample" bottom: "data" top: "u" '
               f"upsample_param {{ {param} }} }}")
    with pytest.raises(LayerdiffError, match="layer 'u' \\(Upsample\\)"):
        make_plan(net)

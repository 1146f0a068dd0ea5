"""Convolution, Deconvolution, Im2col and the depthwise forks against literal transcriptions of
Caffe's loops (float64 and float32), on geometries the goldens leave open (1-D, 0-D, N-D with
per-axis repeated fields, axis, zero-size outputs, chunked batches), plus every refusal."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from golden import GOLDEN, require_shared
from nets import caffe_net

from layerdiff.caffe import load_caffe
from layerdiff.engine import conv, make_plan, run_caffe
from layerdiff.errors import LayerdiffError


def _net(tmp_path, body: str, shape=(2, 3, 7, 9), weights=None):
    return caffe_net(tmp_path, body, {"data": shape}, weights)


def _layer(name: str, kind: str, param: str, bottoms=("data",), tops=None) -> str:
    tops = tops or (name,)
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" type: "{kind}" {b} {t} convolution_param {{ {param} }} }}\n'


def _geom(k, s=1, p=0, d=1, nsp=2):
    def axes(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nsp
    return axes(k), axes(s), axes(p), axes(d)


def _param(k, s, p, d, o=None, group=1, bias=True) -> str:
    """A convolution_param in the repeated-field spelling, one value per axis."""
    parts = [f"num_output: {o}"] if o is not None else []
    for name, vals in (("kernel_size", k), ("stride", s), ("pad", p), ("dilation", d)):
        parts += [f"{name}: {v}" for v in vals]
    parts += [f"group: {group}", f"bias_term: {'true' if bias else 'false'}"]
    return " ".join(parts)


def caffe_conv(x, w, b, k, s, p, d, group):
    """Convolution as Caffe's im2col defines it: output size with C++ truncating division, and
    every tap outside the input (padding or overhang) reads zero. Accumulates in float64."""
    n, c, *sp = x.shape
    o = w.shape[0]
    out = [int((i + 2 * pp - (dd * (kk - 1) + 1)) / ss) + 1
           for i, kk, ss, pp, dd in zip(sp, k, s, p, d, strict=True)]
    cg, og = c // group, o // group
    y = np.zeros((n, o, *out))
    for pos in itertools.product(*map(range, out)):
        for tap in itertools.product(*map(range, k)):
            src = [q * ss - pp + t * dd for q, t, ss, pp, dd in zip(pos, tap, s, p, d, strict=True)]
            if not all(0 <= i < size for i, size in zip(src, sp, strict=True)):
                continue
            v = x[(slice(None), slice(None), *src)].astype(np.float64)
            for g in range(group):
                wg = w[(slice(g * og, (g + 1) * og), slice(None), *tap)].astype(np.float64)
                y[(slice(None), slice(g * og, (g + 1) * og), *pos)] += \
                    v[:, g * cg:(g + 1) * cg] @ wg.T
    if b is not None:
        y += b.reshape((1, o) + (1,) * len(out))
    return y


def caffe_deconv(x, w, b, k, s, p, d, group):
    """Deconvolution as Caffe's col2im defines it: input pixel q with tap t lands on output
    q*s - p + t*d, dropped when outside the (s*(in-1) + extent - 2p)-sized output."""
    n, c, *sp = x.shape
    og = w.shape[1]
    o, cg = og * group, c // group
    out = [ss * (i - 1) + dd * (kk - 1) + 1 - 2 * pp
           for i, kk, ss, pp, dd in zip(sp, k, s, p, d, strict=True)]
    y = np.zeros((n, o, *out))
    for pos in itertools.product(*map(range, sp)):
        v = x[(slice(None), slice(None), *pos)].astype(np.float64)
        for tap in itertools.product(*map(range, k)):
            dst = [q * ss - pp + t * dd for q, t, ss, pp, dd in zip(pos, tap, s, p, d, strict=True)]
            if not all(0 <= i < size for i, size in zip(dst, out, strict=True)):
                continue
            for g in range(group):
                wg = w[(slice(g * cg, (g + 1) * cg), slice(None), *tap)].astype(np.float64)
                y[(slice(None), slice(g * og, (g + 1) * og), *dst)] += \
                    v[:, g * cg:(g + 1) * cg] @ wg
    if b is not None:
        y += b.reshape((1, o) + (1,) * len(out))
    return y


def _check(got, ref, dtype):
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    tol = 1e-12 if dtype == "float64" else 2e-6
    assert np.abs(got - ref).max(initial=0) <= tol * max(1.0, np.abs(ref).max(initial=0))


CONV_CASES = {  # input shape, (kernel, stride, pad, dilation), num_output, group
    "k3_p1": ((2, 3, 7, 9), _geom(3, 1, 1), 4, 1),
    "asym_k3x2_s2x1_p1x0": ((2, 3, 7, 9), _geom((3, 2), (2, 1), (1, 0)), 5, 1),
    "dil2_p2": ((2, 3, 7, 9), _geom(3, 1, 2, 2), 4, 1),
    "dil_2x1_s2": ((1, 2, 8, 9), _geom((3, 2), 2, (1, 0), (2, 1)), 3, 1),
    "group2": ((2, 4, 7, 9), _geom(3, 1, 1), 6, 2),
    "group3_k2_s2": ((2, 6, 7, 8), _geom(2, 2, 0), 3, 3),
    "depthwise": ((2, 4, 7, 9), _geom(3, 2, 1), 4, 4),
    "depthwise_mult3_dil2": ((2, 3, 7, 9), _geom(3, 1, 2, 2), 9, 3),
    "overhang_k8_s2": ((2, 3, 7, 9), _geom(8, 2, 0), 2, 1),
    "overhang_depthwise": ((1, 2, 7, 9), _geom((8, 4), (2, 3), 0), 2, 2),
    "pad_ge_kernel": ((2, 3, 7, 9), _geom(3, 1, 3), 2, 1),
    "stride_gt_kernel": ((2, 3, 7, 9), _geom(2, 3, 1), 2, 1),
    "1x1": ((2, 3, 7, 9), _geom(1), 5, 1),
    "1x1_group": ((2, 4, 7, 9), _geom(1), 6, 2),
    "1x1_s2": ((2, 3, 7, 9), _geom(1, 2), 5, 1),
    "1x1_p1": ((2, 3, 7, 9), _geom(1, 1, 1), 5, 1),
    "single_channel": ((2, 1, 7, 9), _geom(3), 4, 1),
    "1d_k3_s2_p1": ((2, 3, 11), _geom(3, 2, 1, nsp=1), 4, 1),
    "3d_k3_p1": ((2, 2, 5, 6, 7), _geom(3, 1, 1, nsp=3), 3, 1),
    "3d_per_axis": ((1, 4, 5, 6, 7), ((3, 1, 2), (1, 2, 1), (0, 1, 1), (1, 1, 2)), 4, 2),
    "3d_depthwise": ((1, 3, 4, 5, 6), _geom(2, 1, 1, nsp=3), 3, 3),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_convolution_matches_caffe_loop(tmp_path, case, bias, dtype):
    shape, (k, s, p, d), o, group = case
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, shape).astype(dtype)
    w = rng.normal(0, 0.5, (o, shape[1] // group) + k).astype(dtype)
    b = rng.normal(0, 0.1, o).astype(dtype) if bias else None
    net = _net(tmp_path, _layer("c", "Convolution", _param(k, s, p, d, o, group, bias)), shape,
               {"c": [w] + ([b] if bias else [])})
    got = run_caffe(net, {"data": x}, dtype=dtype)["c"].output
    _check(got, caffe_conv(x, w, b, k, s, p, d, group), dtype)


def test_truncating_output_size(tmp_path):
    # (7 - 8)/2 truncates to 0 in C++ -> 1 row (floor division would give 0 rows);
    # (7 - 9)/2 = -1 -> 0 rows, an empty but valid blob in Caffe.
    net = _net(tmp_path, _layer("a", "Convolution", "num_output: 2 kernel_size: 8 stride: 2")
               + _layer("b", "Convolution", "num_output: 2 kernel_h: 9 kernel_w: 3 stride: 2"))
    plan = make_plan(net)
    assert [p.top_shapes for p in plan.layers[1:]] == [[(2, 2, 1, 1)], [(2, 2, 0, 4)]]
    x = np.ones((2, 3, 7, 9), np.float32)
    out = plan.layers[2].impl.forward([x], [np.ones((2, 3, 9, 3), np.float32),
                                            np.ones(2, np.float32)])
    assert out[0].shape == (2, 2, 0, 4)


def test_axis_and_leading_axes(tmp_path):
    # axis 2: the two leading axes are batch axes (Caffe's num_ = count(0, axis)).
    rng = np.random.RandomState(1)
    x = rng.uniform(-1, 1, (2, 3, 4, 5, 6))
    w, b = rng.normal(size=(6, 2, 3, 2)), rng.normal(size=6)
    ref = caffe_conv(x.reshape(6, 4, 5, 6), w, b, (3, 2), (1, 2), (1, 0), (1, 1), 2)
    for axis in (2, -3):
        net = _net(tmp_path, _layer("c", "Convolution", f"num_output: 6 group: 2 axis: {axis} "
                                    "kernel_h: 3 kernel_w: 2 stride_w: 2 stride_h: 1 pad_h: 1"),
                   x.shape, {"c": [w, b]})
        got = run_caffe(net, {"data": x}, dtype="float64")["c"].output
        _check(got, ref.reshape(2, 3, 6, 5, 3), "float64")


def test_no_spatial_axes_is_a_matrix_product(tmp_path):
    # A 2-D bottom has 0 spatial axes: Caffe accepts no kernel_size and computes W x + b.
    rng = np.random.RandomState(2)
    x, w, b = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=5)
    net = _net(tmp_path, _layer("c", "Convolution", "num_output: 5"), x.shape, {"c": [w, b]})
    got = run_caffe(net, {"data": x}, dtype="float64")["c"].output
    _check(got, x @ w.T + b, "float64")


def test_several_bottoms_share_weights(tmp_path):
    rng = np.random.RandomState(3)
    x = rng.uniform(-1, 1, (2, 3, 7, 9)).astype(np.float32)
    w, b = rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    body = ('layer { name: "neg" type: "Power" bottom: "data" top: "neg" '
            "power_param { scale: -2 } }\n"
            + _layer("c", "Convolution", "num_output: 4 kernel_size: 3 pad: 1",
                     bottoms=("data", "neg"), tops=("c0", "c1")))
    tr = run_caffe(_net(tmp_path, body, weights={"c": [w, b]}), {"data": x})
    for k, xin in enumerate((x, -2 * x)):
        _check(tr["c"].outputs[k], caffe_conv(xin, w, b, (3, 3), (1, 1), (1, 1), (1, 1), 1),
               "float32")


def test_chunked_batches_match(monkeypatch):
    rng = np.random.RandomState(4)
    x = rng.uniform(-1, 1, (5, 4, 6, 7))
    w, b = rng.normal(size=(6, 2, 3, 3)), rng.normal(size=6)
    g = conv.Geometry((3, 3), (2, 1), (1, 1), (1, 2))
    whole = (conv.conv_forward(x, w, b, g, 2), conv.deconv_forward(x, w[:4], b[:4], g, 2))
    monkeypatch.setattr(conv, "COL_BUDGET", 1)  # one image per GEMM
    np.testing.assert_array_equal(conv.conv_forward(x, w, b, g, 2), whole[0])
    np.testing.assert_array_equal(conv.deconv_forward(x, w[:4], b[:4], g, 2), whole[1])


DECONV_CASES = {  # input shape, (kernel, stride, pad, dilation), num_output, group
    "k3": ((2, 3, 5, 6), _geom(3), 4, 1),
    "k3_s2_p1": ((2, 3, 5, 6), _geom(3, 2, 1), 4, 1),
    "k4_s2_fcn": ((1, 3, 4, 5), _geom(4, 2), 3, 1),
    "k2_s3_gaps": ((2, 3, 4, 5), _geom(2, 3), 2, 1),
    "asym": ((2, 3, 4, 5), _geom((3, 2), (2, 1), (1, 0)), 4, 1),
    "dil2": ((2, 3, 4, 5), _geom(3, 1, 1, 2), 2, 1),
    "group2": ((2, 4, 4, 5), _geom(3, 2, 1), 6, 2),
    "per_channel_upsample": ((1, 3, 4, 5), _geom(4, 2, 1), 3, 3),
    "pad_crops_all_but_one": ((1, 2, 2, 3), _geom(3, 1, 1), 2, 1),
    "1x1": ((2, 3, 4, 5), _geom(1), 4, 1),
    "1d": ((2, 3, 6), _geom(3, 2, 0, nsp=1), 2, 1),
    "3d": ((1, 2, 3, 4, 3), ((2, 3, 2), (2, 1, 1), (0, 1, 0), (1, 1, 2)), 3, 1),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", DECONV_CASES.values(), ids=DECONV_CASES.keys())
def test_deconvolution_matches_caffe_loop(tmp_path, case, bias, dtype):
    shape, (k, s, p, d), o, group = case
    rng = np.random.RandomState(5)
    x = rng.uniform(-1, 1, shape).astype(dtype)
    w = rng.normal(0, 0.5, (shape[1], o // group) + k).astype(dtype)
    b = rng.normal(0, 0.1, o).astype(dtype) if bias else None
    net = _net(tmp_path, _layer("d", "Deconvolution", _param(k, s, p, d, o, group, bias)),
               shape, {"d": [w] + ([b] if bias else [])})
    got = run_caffe(net, {"data": x}, dtype=dtype)["d"].output
    _check(got, caffe_deconv(x, w, b, k, s, p, d, group), dtype)


def test_deconvolution_is_the_adjoint_of_convolution():
    # <conv(x), y> == <x, deconv(y)> with the same weight array, when the sizes round-trip.
    rng = np.random.RandomState(6)
    g = conv.Geometry((3, 2), (2, 3), (1, 2), (2, 1))
    x = rng.normal(size=(2, 6, 9, 13))
    w = rng.normal(size=(4, 3, 3, 2))
    y = conv.conv_forward(x, w, None, g, 2)
    v = rng.normal(size=y.shape)
    back = conv.deconv_forward(v, w, None, g, 2)
    assert back.shape == x.shape
    assert np.isclose(np.vdot(y, v), np.vdot(x, back), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_im2col_layer_is_caffes_col_buffer(tmp_path, dtype):
    rng = np.random.RandomState(7)
    x = rng.uniform(-1, 1, (2, 3, 7, 9)).astype(dtype)
    k, s, p, d = (3, 2), (2, 1), (1, 2), (1, 2)
    net = _net(tmp_path, _layer("i", "Im2col", _param(k, s, p, d).split(" group")[0]))
    cols = run_caffe(net, {"data": x}, dtype=dtype)["i"].output
    # Each column is one window, rows ordered (channel, kh, kw): W (O, C*kh*kw) @ cols is the
    # convolution.
    assert cols.dtype == np.dtype(dtype) and cols.shape[:2] == (2, 3 * 6)
    w = rng.normal(size=(4, 3) + k)
    got = np.einsum("ok,nkhw->nohw", w.reshape(4, -1), cols.astype(np.float64))
    _check(got, caffe_conv(x, w, None, k, s, p, d, 1), "float64")
    # and padding/overhang taps are exact zeros, the rest exact copies of the input
    assert set(np.unique(cols)) <= set(np.unique(x)) | {0}


def test_im2col_3d_shape(tmp_path):
    net = _net(tmp_path, _layer("i", "Im2col", "kernel_size: 2 kernel_size: 3 kernel_size: 1 "
                                "stride: 2"), (2, 3, 5, 6, 7))
    assert make_plan(net).layers[1].top_shapes == [(2, 18, 2, 2, 4)]


def test_convolution_depthwise_fork(tmp_path):
    # The fork ignores num_output and group; weights are (C, 1, kh, kw); stride/pad/dilation
    # fall back to BVLC's defaults when absent.
    rng = np.random.RandomState(8)
    x = rng.uniform(-1, 1, (2, 5, 8, 9))
    w, b = rng.normal(size=(5, 1, 5, 3)), rng.normal(size=5)
    body = (_layer("dw", "ConvolutionDepthwise", "num_output: 7 group: 2 kernel_h: 5 "
                   "kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 0")
            + _layer("dd", "ConvolutionDepthwise", "num_output: 5 kernel_size: 5 "
                     "kernel_size: 3 dilation: 2 pad: 1 pad: 2 bias_term: false"))
    net = _net(tmp_path, body, x.shape, {"dw": [w, b], "dd": [w]})
    plan = make_plan(net)
    assert plan.layers[1].expected_blobs == [(5, 1, 5, 3), (5,)]
    assert plan.layers[2].expected_blobs == [(5, 1, 5, 3)]
    tr = run_caffe(plan, {"data": x}, dtype="float64")
    _check(tr["dw"].output, caffe_conv(x, w, b, (5, 3), (2, 1), (2, 0), (1, 1), 5), "float64")
    _check(tr["dd"].output, caffe_conv(x, w, None, (5, 3), (1, 1), (1, 2), (2, 2), 5),
           "float64")


def test_depthwise_convolution_fork_follows_group(tmp_path):
    rng = np.random.RandomState(9)
    x = rng.uniform(-1, 1, (2, 4, 7, 9)).astype(np.float32)
    w, b = rng.normal(size=(6, 2, 3, 3)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    net = _net(tmp_path, _layer("c", "DepthwiseConvolution",
                                "num_output: 6 group: 2 kernel_size: 3 stride: 2 pad: 1"),
               weights={"c": [w, b]})
    got = run_caffe(net, {"data": x})["c"].output
    _check(got, caffe_conv(x, w, b, (3, 3), (2, 2), (1, 1), (1, 1), 2), "float32")


def test_bottom_is_not_written(tmp_path):
    x = np.random.RandomState(10).uniform(-1, 1, (2, 3, 7, 9)).astype(np.float32)
    keep = x.copy()
    w = np.ones((3, 1, 3, 3), np.float32)
    net = _net(tmp_path, _layer("c", "Convolution", "num_output: 3 group: 3 kernel_size: 3 "
                                "pad: 1 bias_term: false")
               + _layer("d", "Deconvolution", "num_output: 3 group: 3 kernel_size: 3 "
                        "stride: 2 bias_term: false"), weights={"c": [w], "d": [w]})
    run_caffe(net, {"data": x})
    np.testing.assert_array_equal(x, keep)


BAD_CONV = {  # (type, convolution_param, input shape)
    "kernel_both_forms": ("Convolution", "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3",
                          None),
    "kernel_h_only": ("Convolution", "num_output: 2 kernel_h: 3", None),
    "kernel_h_on_3d": ("Convolution", "num_output: 2 kernel_h: 3 kernel_w: 3", (1, 2, 4, 5, 6)),
    "no_kernel": ("Convolution", "num_output: 2 stride: 2", None),
    "zero_kernel": ("Convolution", "num_output: 2 kernel_size: 0", None),
    "kernel_3_times_on_2d": ("Convolution", "num_output: 2 kernel_size: 1 kernel_size: 2 "
                             "kernel_size: 3", None),
    "stride_zero": ("Convolution", "num_output: 2 kernel_size: 3 stride: 0", None),
    "stride_w_zero": ("Convolution", "num_output: 2 kernel_size: 3 stride_h: 2", None),
    "pad_both_forms": ("Convolution", "num_output: 2 kernel_size: 3 pad: 1 pad_h: 1", None),
    "pad_3_times": ("Convolution", "num_output: 2 kernel_size: 3 pad: 1 pad: 1 pad: 1", None),
    "dilation_3_times": ("Convolution", "num_output: 2 kernel_size: 3 dilation: 1 dilation: 1 "
                         "dilation: 2", None),
    "no_num_output": ("Convolution", "kernel_size: 3", None),
    "group_zero": ("Convolution", "num_output: 2 kernel_size: 3 group: 0", None),
    "num_output_vs_group": ("Convolution", "num_output: 3 kernel_size: 3 group: 3", (2, 4, 7, 9)),
    "axis_out_of_range": ("Convolution", "num_output: 2 kernel_size: 3 axis: 4", None),
    "deconv_channels_vs_group": ("Deconvolution", "num_output: 4 kernel_size: 3 group: 2", None),
    "deconv_negative_output": ("Deconvolution", "num_output: 2 kernel_size: 2 pad: 5", None),
    "im2col_kernel_too_big": ("Im2col", "kernel_size: 3 kernel_size: 11", None),
    "im2col_no_spatial_axis": ("Im2col", "kernel_size: 1", (2, 3)),
    "depthwise_fork_5d": ("ConvolutionDepthwise", "kernel_size: 3", (1, 2, 4, 5, 6)),
    "depthwise_fork_kernel_too_big": ("ConvolutionDepthwise", "kernel_size: 9", None),
    "depthwise_fork_three_kernels": ("ConvolutionDepthwise", "kernel_size: 3 kernel_size: 3 "
                                     "kernel_size: 3", None),
}


@pytest.mark.parametrize("case", BAD_CONV.values(), ids=BAD_CONV.keys())
def test_refusals(tmp_path, case):
    kind, param, shape = case
    net = _net(tmp_path, _layer("c", kind, param), shape or (2, 3, 7, 9))
    with pytest.raises(LayerdiffError, match=f"layer 'c' \\({kind}\\)"):
        make_plan(net)


def test_bottom_top_count_and_shape_refusals(tmp_path):
    two_one = _net(tmp_path, _layer("c", "Convolution", "num_output: 2 kernel_size: 1",
                                    bottoms=("data", "data"), tops=("c",)))
    with pytest.raises(LayerdiffError, match="bottoms"):
        make_plan(two_one)
    body = ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
            "pooling_param { pool: MAX kernel_size: 2 } }\n"
            + _layer("c", "Convolution", "num_output: 2 kernel_size: 1",
                     bottoms=("data", "p"), tops=("c0", "c1")))
    with pytest.raises(LayerdiffError, match="same shape"):
        make_plan(_net(tmp_path, body))


def test_wrong_weight_shape_is_refused(tmp_path):
    # Deconvolution's weights are (C_in, num_output/group, k): the Convolution layout is wrong.
    net = _net(tmp_path, _layer("d", "Deconvolution", "num_output: 4 kernel_size: 3"),
               weights={"d": [np.zeros((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)]})
    with pytest.raises(LayerdiffError, match="blob 0"):
        make_plan(net)


@pytest.mark.parametrize("case", ["conv_group_mismatch", "conv_kernel_too_big"])
def test_rejected_goldens(tmp_path, case):
    require_shared()
    entry = json.loads((GOLDEN / "unit" / "rejected.json").read_text())[case]
    path = tmp_path / "deploy.prototxt"
    path.write_text(entry["deploy.prototxt"])
    with pytest.raises(LayerdiffError, match="convolution"):
        make_plan(load_caffe(prototxt=path))

"""InnerProduct and Embed: axis handling (negative too), transpose, bias, float64, and the
refusals (bad axis, wrong weight layout, indices outside the vocabulary)."""

from __future__ import annotations

import numpy as np
import pytest
from nets import caffe_net

from layerdiff.engine import make_plan, run_caffe
from layerdiff.errors import LayerdiffError


def _net(tmp_path, body: str, shape, weights=None):
    return caffe_net(tmp_path, body, {"data": shape}, weights)


def _ip(param: str) -> str:
    return (f'layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            f"inner_product_param {{ {param} }} }}\n")


def _embed(param: str) -> str:
    return (f'layer {{ name: "e" type: "Embed" bottom: "data" top: "e" '
            f"embed_param {{ {param} }} }}\n")


IP_CASES = {  # input shape, axis, transpose, bias, expected top shape
    "2d": ((3, 12), 1, False, True, (3, 5)),
    "4d_flatten": ((2, 3, 4, 5), 1, False, True, (2, 5)),
    "axis2": ((2, 3, 4, 5), 2, False, True, (2, 3, 5)),
    "axis_m1": ((2, 3, 4, 6), -1, False, True, (2, 3, 4, 5)),
    "axis_m3_transpose": ((2, 3, 4, 6), -3, True, False, (2, 5)),
    "axis0": ((2, 3, 4), 0, True, True, (5,)),
    "transpose_nobias": ((2, 3, 4), 1, True, False, (2, 5)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", IP_CASES.values(), ids=IP_CASES.keys())
def test_inner_product(tmp_path, case, dtype):
    shape, axis, transpose, bias, top = case
    ax = axis % len(shape)
    m, k = int(np.prod(shape[:ax])), int(np.prod(shape[ax:]))
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, shape).astype(dtype)
    w = rng.normal(size=(k, 5) if transpose else (5, k)).astype(dtype)
    b = rng.normal(size=5).astype(dtype)
    param = (f"num_output: 5 axis: {axis} transpose: {str(transpose).lower()} "
             f"bias_term: {str(bias).lower()}")
    net = _net(tmp_path, _ip(param), shape, {"ip": [w, b] if bias else [w]})
    got = run_caffe(net, {"data": x}, dtype=dtype)["ip"].output
    w64 = w.astype(np.float64)
    ref = x.reshape(m, k).astype(np.float64) @ (w64 if transpose else w64.T) + (b if bias else 0)
    assert got.dtype == np.dtype(dtype) and got.shape == top
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(got.reshape(m, 5), ref, rtol=0, atol=tol * np.abs(ref).max())


def test_inner_product_refusals(tmp_path):
    with pytest.raises(LayerdiffError, match="axis"):
        make_plan(_net(tmp_path, _ip("num_output: 5 axis: 3"), (2, 3, 4)))
    with pytest.raises(LayerdiffError, match="axis"):
        make_plan(_net(tmp_path, _ip("num_output: 5 axis: -4"), (2, 3, 4)))
    # transpose wants (K, N) weights; an untransposed (N, K) blob is refused by shape
    w = np.zeros((5, 12), np.float32)
    net = _net(tmp_path, _ip("num_output: 5 transpose: true bias_term: false"), (2, 12),
               {"ip": [w]})
    with pytest.raises(LayerdiffError, match="blob 0"):
        make_plan(net)


def test_inner_product_does_not_write_bottom(tmp_path):
    x = np.random.RandomState(1).uniform(-1, 1, (2, 6)).astype(np.float32)
    keep = x.copy()
    w, b = np.ones((3, 6), np.float32), np.ones(3, np.float32)
    out = run_caffe(_net(tmp_path, _ip("num_output: 3"), x.shape, {"ip": [w, b]}),
                    {"data": x})["ip"].output
    np.testing.assert_array_equal(x, keep)
    np.testing.assert_allclose(out, x.sum(1, keepdims=True) + 1 + np.zeros((1, 3)), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
def test_embed(tmp_path, bias, dtype):
    rng = np.random.RandomState(2)
    idx = rng.randint(0, 7, (2, 3, 4))
    w, b = rng.normal(size=(7, 5)).astype(dtype), rng.normal(size=5).astype(dtype)
    param = f"num_output: 5 input_dim: 7 bias_term: {str(bias).lower()}"
    net = _net(tmp_path, _embed(param), idx.shape, {"e": [w, b] if bias else [w]})
    got = run_caffe(net, {"data": idx.astype(dtype)}, dtype=dtype)["e"].output
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(got, w[idx] + b if bias else w[idx])


@pytest.mark.parametrize("bad", [7.0, -1.0, 2.5, np.nan, np.inf])
def test_embed_index_outside_vocabulary(tmp_path, bad):
    x = np.array([[0.0, 3.0, bad]], np.float32)
    w = np.zeros((7, 2), np.float32)
    net = _net(tmp_path, _embed("num_output: 2 input_dim: 7 bias_term: false"), x.shape,
               {"e": [w]})
    with pytest.raises(LayerdiffError, match=r"layer 'e' \(Embed\).*\[0, 2\]"):
        run_caffe(net, {"data": x})


@pytest.mark.parametrize("param", ["input_dim: 7", "num_output: 2", "num_output: 0 input_dim: 3"])
def test_embed_refusals(tmp_path, param):
    with pytest.raises(LayerdiffError, match=r"layer 'e' \(Embed\)"):
        make_plan(_net(tmp_path, _embed(param), (2, 3)))

"""Eltwise, Axpy, Reduction and ArgMax (layerdiff/engine/eltwise.py): goldens (bit-equal),
Caffe's error checks, float64 runs and semantics the goldens leave open."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import GOLDEN, golden_dirs, require_shared
from test_engine_shape import _net, _plan_fails, _run, _x, check_layers_exact

from layerdiff.caffe import load_caffe
from layerdiff.engine import lookup, make_plan
from layerdiff.engine.eltwise import _sasum_rows, _sdot_rows
from layerdiff.errors import LayerdiffError

TYPES = {"Eltwise", "Axpy", "Reduction", "ArgMax"}
f32 = np.float32


def _golden_cases():
    dirs = [d for d in golden_dirs("unit") if d.name.startswith(("eltwise_", "reduction_",
                                                                 "argmax_"))]
    dirs += [d for d in golden_dirs("fork") if d.name == "axpy"]
    return [pytest.param(d, id=d.name) for d in dirs] or [pytest.param(None, id="no-shared")]


@pytest.mark.parametrize("case", _golden_cases())
def test_golden_bit_equal(case):
    # Eltwise/Axpy/Reduction are float arithmetic, yet reproduce the goldens bit for bit
    # (Caffe's operation order; OpenBLAS's summation order for Reduction). ArgMax must.
    require_shared()
    assert check_layers_exact(case, TYPES) > 0


# -- rejected.json ----------------------------------------------------------------------------
def _rejected(name: str) -> str:
    require_shared()
    return json.loads((GOLDEN / "unit" / "rejected.json").read_text())[name]["deploy.prototxt"]


def test_rejected_argmax_topk(tmp_path):
    path = tmp_path / "x.prototxt"
    path.write_text(_rejected("argmax_topk_too_big"))
    with pytest.raises(LayerdiffError, match="layer 'argmax'.*top_k"):
        make_plan(load_caffe(prototxt=path))


def test_rejected_eltwise_shape_mismatch(tmp_path):
    # The entry's second bottom is a 2x2/2 MAX Pooling of 2x3x7x9 (ceil: 2x3x4x5); an Input of
    # that shape stands in, so this does not depend on the pooling family.
    text = _rejected("eltwise_shape_mismatch")
    assert 'bottom: "data" bottom: "pool"' in text
    _plan_fails(tmp_path, {"data": (2, 3, 7, 9), "pool": (2, 3, 4, 5)},
                'layer { name: "eltwise" type: "Eltwise" bottom: "data" bottom: "pool" '
                'top: "eltwise" }', "layer 'eltwise'.*differ")
    if lookup("Pooling") is not None:
        path = tmp_path / "y.prototxt"
        path.write_text(text)
        with pytest.raises(LayerdiffError, match="layer 'eltwise'"):
            make_plan(load_caffe(prototxt=path))


# -- error paths ------------------------------------------------------------------------------
X2 = {"a": (2, 3, 4, 5), "b": (2, 3, 4, 5)}


@pytest.mark.parametrize("body,match", [
    ('layer { name: "e" type: "Eltwise" bottom: "a" top: "e" }', "bottom"),
    ('layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "e" '
     "eltwise_param { coeff: 1 } }", "one per bottom"),
    ('layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "e" '
     "eltwise_param { operation: PROD coeff: 1 coeff: 2 } }", "only apply to SUM"),
    ('layer { name: "r" type: "Reduction" bottom: "a" top: "r" reduction_param { axis: 4 } }',
     "axis"),
    ('layer { name: "m" type: "ArgMax" bottom: "a" top: "m" argmax_param { top_k: 0 } }',
     "top_k"),
    ('layer { name: "m" type: "ArgMax" bottom: "a" top: "m" argmax_param { top_k: 61 } }',
     "top_k"),
    ('layer { name: "m" type: "ArgMax" bottom: "a" top: "m" argmax_param { axis: -5 } }',
     "axis"),
    ('layer { name: "x" type: "Axpy" bottom: "a" bottom: "a" bottom: "b" top: "x" }', "scale"),
])
def test_plan_errors(tmp_path, body, match):
    _plan_fails(tmp_path, X2, body, match)


def test_axpy_shape_errors(tmp_path):
    body = 'layer { name: "x" type: "Axpy" bottom: "s" bottom: "a" bottom: "b" top: "x" }'
    _plan_fails(tmp_path, {"s": (2, 4), "a": (2, 3, 4, 5), "b": (2, 3, 4, 5)}, body, "scale")
    _plan_fails(tmp_path, {"s": (2, 3), "a": (2, 3, 4, 5), "b": (2, 3, 4, 4)}, body, "differ")


# -- Eltwise semantics ------------------------------------------------------------------------
def test_eltwise_sum_order_and_float64(tmp_path):
    # Caffe: top = 0; top += c_i * b_i in bottom order by saxpy, fused (FMA) in OpenBLAS.
    # Coefficients that are not powers of two make the rounding visible.
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((3, 4, 5, 6)).astype(f32) * f32(10.0 ** i) for i in range(3))
    body = ('layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "e" '
            "eltwise_param { coeff: 0.3 coeff: -1.7 coeff: 1 } }")
    out = _run(tmp_path, {"a": a, "b": b, "c": c}, body)["e"].outputs[0]
    fused = (f32(0.3) * a).astype(np.float64) + np.float64(f32(-1.7)) * b.astype(np.float64)
    want = fused.astype(f32) + c
    assert out.dtype == np.float32 and out.tobytes() == want.tobytes()
    assert want.tobytes() != ((f32(0.3) * a + f32(-1.7) * b) + c).tobytes()  # FMA shows
    body2 = body.replace("coeff: -1.7", "coeff: -0.25")  # exact product: plain float ops
    out = _run(tmp_path, {"a": a, "b": b, "c": c}, body2)["e"].outputs[0]
    assert out.tobytes() == ((f32(0.3) * a + f32(-0.25) * b) + c).tobytes()
    out64 = _run(tmp_path, {"a": a, "b": b, "c": c}, body, "float64")["e"].outputs[0]
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    want64 = (float(f32(0.3)) * a64 + float(f32(-1.7)) * b64) + c64
    assert out64.dtype == np.float64 and np.array_equal(out64, want64)


def test_eltwise_prod_max_semantics(tmp_path):
    nan = np.nan
    a = np.array([1.0, nan, 2.0, 0.0, -0.0, 3.0], np.float32)
    b = np.array([2.0, 1.0, nan, -0.0, 0.0, 3.0], np.float32)
    c = np.array([nan, 5.0, 1.0, 0.0, -1.0, 4.0], np.float32)
    body = ('layer { name: "m" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "m" '
            "eltwise_param { operation: MAX } }\n"
            'layer { name: "p" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "p" '
            "eltwise_param { operation: PROD } }")
    tr = _run(tmp_path, {"a": a, "b": b, "c": c}, body)
    # a > b ? a : b, then c > top ? c : top: a NaN in a is dropped, one in b kept and then
    # replaced by nothing (c > NaN is false); equal zeros keep the later bottom's sign first.
    want = np.array([2.0, 5.0, nan, -0.0, 0.0, 4.0], np.float32)
    got = tr["m"].outputs[0]
    assert got.tobytes() == want.tobytes()
    assert np.array_equal(tr["p"].outputs[0], a * b * c, equal_nan=True)


def test_eltwise_max_matches_caffe_select():
    # Random values with many exact ties (signed zeros included) and NaNs, in 4 bottoms.
    rng = np.random.default_rng(3)
    vals = np.array([0.0, -0.0, 1.0, -1.0, np.nan, 2.5], np.float32)
    bots = [vals[rng.integers(0, 6, (5, 7, 11))] for _ in range(4)]
    impl = _impl("Eltwise", "eltwise_param { operation: MAX }", 4)
    want = np.where(bots[0] > bots[1], bots[0], bots[1])
    for b in bots[2:]:
        want = np.where(b > want, b, want)
    assert impl.forward(bots, [])[0].tobytes() == want.tobytes()


def _impl(type_name, param_text, n_bottoms):
    from google.protobuf import text_format

    from layerdiff.caffe import caffe_pb2
    from layerdiff.caffe.net import CaffeLayer
    p = text_format.Parse(param_text, caffe_pb2.LayerParameter())
    lay = CaffeLayer("l", type_name, [f"b{i}" for i in range(n_bottoms)], ["t"], p)
    return lookup(type_name)(lay)


# -- Reduction semantics ----------------------------------------------------------------------
def _sdot_scalar(x, y):
    # OpenBLAS sdot (Haswell): FMA into 4x8 float lanes for the first dim & ~31 values, lanes
    # folded pairwise; the rest summed in double; the float part added last.
    n = len(x)
    n1 = n & -32
    lanes = np.zeros(32, f32)
    for i in range(0, n1, 32):
        lanes = (lanes + x[i:i + 32].astype(np.float64) * y[i:i + 32]).astype(f32)
    acc = lanes.reshape(4, 8)
    h = [acc[j, :4] + acc[j, 4:] for j in range(4)]
    h = (h[0] + h[1]) + (h[2] + h[3])
    part = (h[0] + h[1]) + (h[2] + h[3])
    d = 0.0
    for i in range(n1, n):
        d += float(f32(x[i] * y[i]))
    return f32(d + float(part))


def _sasum_scalar(v, phase):
    # OpenBLAS asum_sse.S, one value at a time: peel to 16-byte alignment, then 4-float slices.
    v = np.abs(v)
    acc = np.zeros((4, 4), f32)
    m, p = len(v), 0

    def add(j, k, n):
        acc[j, :n] = acc[j, :n] + v[p + k:p + k + n]

    if m > 3:
        if phase % 2:
            add(0, 0, 1)
            p, m, phase = p + 1, m - 1, phase + 1
        if phase % 4 == 2:
            add(1, 0, 2)
            p, m = p + 2, m - 2
        for _ in range(m >> 5):
            for k in range(8):
                add(k % 4, 4 * k, 4)
            p += 32
        if m & 16:
            for k, j in enumerate((0, 1, 0, 1)):
                add(j, 4 * k, 4)
            p += 16
        if m & 8:
            add(0, 0, 4)
            add(1, 4, 4)
            p += 8
        if m & 4:
            add(2, 0, 4)
            p += 4
    if m & 2:
        add(3, 0, 2)
        p += 2
    if m & 1:
        add(2, 0, 1)
    c = (acc[0] + acc[1]) + (acc[2] + acc[3])
    return (c[0] + c[1]) + (c[2] + c[3])


@pytest.mark.parametrize("dim", [1, 3, 4, 9, 31, 32, 33, 63, 64, 100, 255, 257, 1000])
def test_blas_models_vectorized_match_scalar(dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((7, dim)) * np.exp(rng.standard_normal((7, dim)) * 3)).astype(f32)
    ones = np.ones(dim, f32)
    assert _sdot_rows(x, None).tobytes() == np.array([_sdot_scalar(r, ones) for r in x]).tobytes()
    assert _sdot_rows(x, x).tobytes() == np.array([_sdot_scalar(r, r) for r in x]).tobytes()
    want = np.array([_sasum_scalar(r, (i * dim) % 4) for i, r in enumerate(x)], f32)
    assert _sasum_rows(x).tobytes() == want.tobytes()


def test_sdot_long_rows_fall_back_close():
    # Past _FMA_LOOP_MAX blocks the FMA is not emulated; the result stays within rounding.
    from layerdiff.engine.eltwise import _FMA_LOOP_MAX
    dim = 32 * (_FMA_LOOP_MAX + 3) + 5
    x = np.random.default_rng(0).uniform(-1, 1, (1, dim)).astype(f32)
    got, exact = _sdot_rows(x, x)[0], _sdot_scalar(x[0], x[0])
    assert abs(float(got) - float(exact)) <= 1e-6 * float(exact)


def test_reduction_ops_and_float64(tmp_path):
    x = _x(2, 3, 40, 5)
    body = "\n".join(
        f'layer {{ name: "{op}{ax}" type: "Reduction" bottom: "data" top: "{op}{ax}" '
        f"reduction_param {{ operation: {op} axis: {ax} coeff: {c} }} }}"
        for op, ax, c in (("SUM", 0, 1), ("ASUM", 1, -2), ("SUMSQ", 2, 0.5), ("MEAN", -1, 3),
                          ("MEAN", 1, 1)))
    for dtype, tol in (("float32", 2e-6), ("float64", 1e-13)):
        tr = _run(tmp_path, {"data": x}, body, dtype)
        x64 = x.astype(np.float64)
        want = {"SUM0": x64.sum(), "ASUM1": -2 * np.abs(x64).sum(axis=(1, 2, 3)),
                "SUMSQ2": 0.5 * (x64 ** 2).sum(axis=(2, 3)), "MEAN-1": 3 * x64.mean(axis=3),
                "MEAN1": x64.reshape(2, -1).mean(axis=1)}
        for name, ref in want.items():
            out = tr[name].outputs[0]
            assert out.dtype == dtype and out.shape == np.shape(ref), name
            assert np.abs(out - ref).max() <= tol * max(1, np.abs(ref).max()), (dtype, name)
    # MEAN is sum * (coeff / dim) with the factor rounded to float first, as in Caffe
    out = tr["MEAN1"].outputs[0]
    assert out.shape == (2,)
    f = _run(tmp_path, {"data": x}, body)["MEAN1"].outputs[0]
    assert f.tobytes() == (_sdot_rows(x.reshape(2, -1), None) * (f32(1) / f32(600))).tobytes()


# -- ArgMax semantics -------------------------------------------------------------------------
def test_argmax_ties_larger_index_first(tmp_path):
    x = np.array([[1, 3, 3, 0, 3, 2]], np.float32).reshape(1, 6, 1, 1)
    body = ('layer { name: "m" type: "ArgMax" bottom: "data" top: "m" '
            "argmax_param { top_k: 4 out_max_val: true } }\n"
            'layer { name: "a" type: "ArgMax" bottom: "data" top: "a" argmax_param { axis: 1 } }\n'
            'layer { name: "v" type: "ArgMax" bottom: "data" top: "v" '
            "argmax_param { axis: 1 top_k: 2 out_max_val: true } }")
    tr = _run(tmp_path, {"data": x}, body)
    m = tr["m"].outputs[0]
    assert m.shape == (1, 2, 4, 1)
    assert m[0, 0, :, 0].tolist() == [4, 2, 1, 5] and m[0, 1, :, 0].tolist() == [3, 3, 3, 2]
    assert tr["a"].outputs[0].ravel().tolist() == [4]
    assert tr["v"].outputs[0].shape == (1, 2, 1, 1)
    assert tr["v"].outputs[0].ravel().tolist() == [3, 3]  # values only


def test_argmax_shapes_and_float64(tmp_path):
    x = _x(2, 3, 4, 5, 2, dtype=np.float64)
    body = ('layer { name: "n" type: "ArgMax" bottom: "data" top: "n" argmax_param { top_k: 2 } }\n'
            'layer { name: "k" type: "ArgMax" bottom: "data" top: "k" '
            "argmax_param { axis: -2 top_k: 3 } }")
    tr = _run(tmp_path, {"data": x}, body, "float64")
    n, k = tr["n"].outputs[0], tr["k"].outputs[0]
    assert n.shape == (2, 1, 2, 1, 1) and n.dtype == np.float64  # max(ndim, 3) axes
    flat = x.reshape(2, -1)
    assert n[:, 0, :, 0, 0].tolist() == np.argsort(-flat, axis=1)[:, :2].tolist()
    assert k.shape == (2, 3, 4, 3, 2)
    assert np.array_equal(k, np.moveaxis(np.argsort(-x, axis=3)[:, :, :, :3], 3, 3))
    net = _net(tmp_path, {"data": (4, 7)},
               'layer { name: "m" type: "ArgMax" bottom: "data" top: "m" }')
    assert make_plan(net).layers[-1].top_shapes == [(4, 1, 1)]  # 2-D bottom: 3 axes


def test_axpy_2d_scale_and_float64(tmp_path):
    s, x, y = _x(2, 3), _x(2, 3, 4, 5), _x(2, 3, 4, 6)[..., :5].copy()
    body = 'layer { name: "ax" type: "Axpy" bottom: "s" bottom: "x" bottom: "y" top: "ax" }'
    for dtype in ("float32", "float64"):
        out = _run(tmp_path, {"s": s, "x": x, "y": y}, body, dtype)["ax"].outputs[0]
        want = s.astype(dtype)[:, :, None, None] * x.astype(dtype) + y.astype(dtype)
        assert out.dtype == dtype and out.tobytes() == want.tobytes()

"""Neuron layers and Softmax: error paths, float64, and semantics the goldens do not pin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import (
    GOLDEN,
    UNIT_TOL,
    check_end_to_end,
    golden_dirs,
    load_golden,
    require_shared,
)

from layerdiff.caffe import load_caffe
from layerdiff.engine import make_plan
from layerdiff.errors import LayerdiffError

SHAPE = (2, 3, 4, 5)


def _impl(tmp_path, layer: str, shape=SHAPE, phase: str = "TEST"):
    """Plan an Input + one layer (named 'l', bottom 'data') and return its implementation."""
    dims = " ".join(f"dim: {d}" for d in shape)
    (tmp_path / "x.prototxt").write_text(
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "l" bottom: "data" top: "out" {layer} }}\n')
    plan = make_plan(load_caffe(prototxt=tmp_path / "x.prototxt"), phase=phase)
    return plan.layers[-1]


def _run(tmp_path, layer: str, x: np.ndarray, blobs=()):
    p = _impl(tmp_path, layer, x.shape)
    x = x.copy()
    x.flags.writeable = False
    (out,) = p.impl.forward([x], [np.asarray(b, x.dtype) for b in blobs])
    assert out.shape == x.shape and out.dtype == x.dtype
    return out


def _x(dtype=np.float32, lo=-2.0, hi=2.0):
    return np.random.RandomState(0).uniform(lo, hi, SHAPE).astype(dtype)


# -- rejected parameters ------------------------------------------------------------------------

def test_rejected_exp_base_negative(tmp_path):
    require_shared()
    case = json.loads((GOLDEN / "unit" / "rejected.json").read_text())["exp_base_negative"]
    (tmp_path / "x.prototxt").write_text(case["deploy.prototxt"])
    with pytest.raises(LayerdiffError, match="exp_param.base"):
        make_plan(load_caffe(prototxt=tmp_path / "x.prototxt"))


@pytest.mark.parametrize("layer", [
    'type: "Exp" exp_param { base: 0 }',
    'type: "Exp" exp_param { base: -0.5 }',
    'type: "Log" log_param { base: -3 }',
    'type: "Log" log_param { base: 1 }',  # 1/log(1) is infinite: Caffe CHECKs it
    'type: "Softmax" softmax_param { axis: 4 }',
    'type: "Softmax" softmax_param { axis: -5 }',
    'type: "Clip" clip_param { min: 0 }',  # max is required
])
def test_refused_params(tmp_path, layer):
    with pytest.raises(LayerdiffError, match="layer 'l'"):
        _impl(tmp_path, layer)


def test_prelu_needs_two_axes(tmp_path):
    with pytest.raises(LayerdiffError, match=">= 2 axes"):
        _impl(tmp_path, 'type: "PReLU"', shape=(6,))


def test_dropout_refuses_train_phase(tmp_path):
    with pytest.raises(LayerdiffError, match="phase"):
        _impl(tmp_path, 'type: "Dropout"', phase="TRAIN")


# -- semantics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", [0.0, 0.1, 1.0, 2.5, -0.5])
def test_relu_slopes(tmp_path, slope):
    # Every branch of ReLU's fast paths against Caffe's max(x,0) + s·min(x,0).
    x = _x(np.float64)
    out = _run(tmp_path, f'type: "ReLU" relu_param {{ negative_slope: {slope} }}', x)
    s = float(np.float32(slope))  # the proto field is a float
    np.testing.assert_array_equal(out, np.maximum(x, 0) + s * np.minimum(x, 0))


def test_nan_handling(tmp_path):
    x = np.full(SHAPE, np.nan, np.float32)
    assert np.isnan(_run(tmp_path, 'type: "ReLU"', x)).all()
    assert np.isnan(_run(tmp_path, 'type: "ReLU" relu_param { negative_slope: 0.2 }', x)).all()
    # std::max(min, std::min(NaN, max)) gives min; (NaN > t) is false.
    assert (_run(tmp_path, 'type: "Clip" clip_param { min: -1 max: 2 }', x) == -1).all()
    assert (_run(tmp_path, 'type: "Threshold"', x) == 0).all()


def test_clip_min_above_max_gives_min(tmp_path):
    out = _run(tmp_path, 'type: "Clip" clip_param { min: 1 max: -1 }', _x())
    assert (out == 1).all()


def test_power_special_cases(tmp_path):
    x = _x()
    assert (_run(tmp_path, 'type: "Power" power_param { power: 0 scale: 3 }', x) == 1).all()
    assert (_run(tmp_path, 'type: "Power" power_param { power: 0 scale: 0 }', x) == 1).all()
    out = _run(tmp_path, 'type: "Power" power_param { power: 3 scale: 0 shift: 2 }', x)
    assert (out == 8).all()
    out = _run(tmp_path, 'type: "Power" power_param { power: 0.5 shift: -1 scale: 0 }', x)
    assert np.isnan(out).all()  # pow(-1, 0.5), as Caffe
    out = _run(tmp_path, 'type: "Power" power_param { power: 0.5 }', x)
    np.testing.assert_array_equal(np.isnan(out), x < 0)


def test_exp_base_one_is_constant_shift(tmp_path):
    out = _run(tmp_path, 'type: "Exp" exp_param { base: 1 scale: 5 shift: 3 }', _x())
    assert (out == 1).all()


def test_prelu_shapes_and_broadcast(tmp_path):
    p = _impl(tmp_path, 'type: "PReLU" prelu_param { channel_shared: true }')
    assert p.expected_blobs == [()]
    p = _impl(tmp_path, 'type: "PReLU"')
    assert p.expected_blobs == [(3,)]
    x = _x()
    slopes = np.array([0.1, -0.2, 3.0], np.float32)
    out = _run(tmp_path, 'type: "PReLU"', x, [slopes])
    ref = np.maximum(x, 0) + slopes[None, :, None, None] * np.minimum(x, 0)
    np.testing.assert_array_equal(out, ref)


def test_softmax_large_logits_and_axis(tmp_path):
    x = _x(lo=-500, hi=500)
    for axis in (0, 1, 2, -1):
        out = _run(tmp_path, f'type: "Softmax" softmax_param {{ axis: {axis} }}', x)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out.sum(axis=axis), 1, rtol=1e-6)
        assert (out.argmax(axis=axis) == x.argmax(axis=axis)).all()


def test_bnll_is_stable(tmp_path):
    x = np.array([-1e4, -50, 0, 50, 1e4], np.float32).reshape(1, 5)
    out = _run(tmp_path, 'type: "BNLL"', x)
    np.testing.assert_allclose(out, np.log1p(np.exp(-np.abs(x.astype(np.float64))))
                               + np.maximum(x, 0), rtol=1e-6)


# -- float64 ------------------------------------------------------------------------------------

FLOAT64_LAYERS = [
    ('type: "ReLU" relu_param { negative_slope: 0.1 }',
     lambda x: np.maximum(x, 0) + 0.10000000149011612 * np.minimum(x, 0)),
    ('type: "ELU" elu_param { alpha: 0.5 }', lambda x: np.where(x > 0, x, 0.5 * np.expm1(x))),
    ('type: "Sigmoid"', lambda x: 1 / (1 + np.exp(-x))),
    ('type: "Swish" swish_param { beta: 1.5 }', lambda x: x / (1 + np.exp(-1.5 * x))),
    ('type: "BNLL"', lambda x: np.log1p(np.exp(x))),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.25 }', lambda x: 2 ** (0.25 + 0.5 * x)),
    ('type: "Log" log_param { base: 10 scale: 0.5 shift: 1.5 }',
     lambda x: np.log10(1.5 + 0.5 * x)),
    ('type: "Power" power_param { power: 3 scale: -2 shift: 0.5 }', lambda x: (0.5 - 2 * x) ** 3),
    ('type: "Softmax"', lambda x: np.exp(x) / np.exp(x).sum(1, keepdims=True)),
]


@pytest.mark.parametrize("layer,ref", FLOAT64_LAYERS, ids=[s.split('"')[1] for s, _ in
                                                           FLOAT64_LAYERS])
def test_float64_precision(tmp_path, layer, ref):
    # In float64 the result must agree with the closed form far below float32 rounding.
    x = _x(np.float64)
    out = _run(tmp_path, layer, x)
    np.testing.assert_allclose(out, ref(x), rtol=1e-13, atol=1e-14)


def _my_cases():
    mine = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log",
            "Threshold", "Clip", "Swish", "Dropout", "Softmax"}
    out = []
    for d in golden_dirs("unit"):
        meta = json.loads((d / "meta.json").read_text())
        types = {r["type"] for r in meta["layers"]} - {"Input", "Split"}
        if types and types <= mine:
            out.append(pytest.param(d, id=d.name))
    return out or [pytest.param(None, id="no-shared-data")]


@pytest.mark.parametrize("case", _my_cases())
def test_goldens_in_float64(case):
    # The whole net run in float64 stays float64 and within the unit tolerance of Caffe.
    check_end_to_end(load_golden(case), UNIT_TOL, dtype="float64")

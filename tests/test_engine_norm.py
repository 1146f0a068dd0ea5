"""Normalization layers: error paths, float64, and semantics the goldens do not pin (BN forks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import GOLDEN, UNIT_TOL, compare, golden_dirs, load_golden, require_shared
from nets import caffe_net

from layerdiff.caffe import load_caffe
from layerdiff.engine import make_plan, run_caffe
from layerdiff.errors import LayerdiffError, ModelFormatError, UnsupportedError

SHAPE = (2, 3, 4, 5)


def _net(tmp_path, layers: str, inputs: dict[str, tuple] | None = None, blobs=None):
    """A net of Input layers plus ``layers`` (prototxt text); ``blobs``: {layer: [arrays]}."""
    return caffe_net(tmp_path, layers, inputs or {"data": SHAPE}, blobs, np.float32)


def _plan(tmp_path, layer: str, shape=SHAPE, blobs=None, phase="TEST"):
    """Plan Input 'data' + one layer 'l' (top 'out'); return the planned layer."""
    net = _net(tmp_path, f'layer {{ name: "l" bottom: "data" top: "out" {layer} }}\n',
               {"data": shape}, {"l": blobs} if blobs is not None else None)
    return make_plan(net, phase=phase).layers[-1]


def _fwd(p, *bottoms, blobs=None, dtype=np.float64):
    """Run one planned layer on read-only copies of ``bottoms`` in ``dtype``."""
    bs = []
    for b in bottoms:
        b = np.array(b, dtype)
        b.flags.writeable = False
        bs.append(b)
    blobs = p.blobs if blobs is None else blobs
    outs = p.impl.forward(bs, [np.asarray(b, dtype) for b in blobs])
    for o, s in zip(outs, p.top_shapes, strict=True):
        assert o.shape == tuple(s) and o.dtype == dtype
    return outs


def _x(shape=SHAPE, seed=0, lo=-2.0, hi=2.0):
    return np.random.RandomState(seed).uniform(lo, hi, shape)


def _ch(v, ndim=4):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


# -- rejected variants ----------------------------------------------------------------------------

def test_rejected_lrn_even_size(tmp_path):
    require_shared()
    case = json.loads((GOLDEN / "unit" / "rejected.json").read_text())["lrn_even_size"]
    (tmp_path / "x.prototxt").write_text(case["deploy.prototxt"])
    with pytest.raises(UnsupportedError, match="local_size"):
        make_plan(load_caffe(prototxt=tmp_path / "x.prototxt"))


@pytest.mark.parametrize("layer, shape, match", [
    ('type: "BatchNorm"', (6,), "at least 2 axes"),
    ('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 } param { lr_mult: 0 }', SHAPE,
     "lr_mult"),
    ('type: "Scale" scale_param { num_axes: -2 }', SHAPE, "num_axes"),
    ('type: "Scale" scale_param { axis: 4 }', SHAPE, "axis"),
    ('type: "Scale" scale_param { axis: -5 }', SHAPE, "axis"),
    ('type: "Scale" scale_param { axis: 2 num_axes: 3 }', SHAPE, "num_axes"),
    ('type: "Bias" bias_param { axis: 3 num_axes: 2 }', SHAPE, "num_axes"),
    ('type: "LRN"', (2, 3, 4), "4 axes"),
    ('type: "LRN" lrn_param { local_size: 2 norm_region: WITHIN_CHANNEL }', SHAPE, "local_size"),
    ('type: "MVN"', (2, 3, 4, 5, 6), "4 axes"),
    ('type: "Normalize"', (6,), "2 axes"),
    ('type: "Normalize"', (1, 2, 3, 4, 5), "4 axes"),
    ('type: "BN"', (1, 2, 3, 4, 5), "4 axes"),
])
def test_refused(tmp_path, layer, shape, match):
    with pytest.raises(LayerdiffError, match=match):
        _plan(tmp_path, layer, shape)


@pytest.mark.parametrize("typ, second", [("Scale", (4,)), ("Scale", (3, 5)), ("Bias", (3, 4, 6)),
                                         ("Bias", (2, 3, 4, 5, 1))])
def test_two_bottom_shape_mismatch(tmp_path, typ, second):
    net = _net(tmp_path, f'layer {{ name: "l" type: "{typ}" bottom: "data" bottom: "p" top: "o" }}',
               {"data": SHAPE, "p": second})
    with pytest.raises(ModelFormatError, match="does not match"):
        make_plan(net)


def test_scale_blob_count_checked(tmp_path):
    # bias_term makes the bias a second blob; a caffemodel with only the scale is refused.
    with pytest.raises(ModelFormatError, match="1 blob"):
        _plan(tmp_path, 'type: "Scale" scale_param { bias_term: true }', blobs=[np.ones(3)])


# -- BatchNorm -------------------------------------------------------------------------------------

def test_batchnorm_global_formula_float64(tmp_path):
    m, v, s = np.array([0.5, -1.0, 2.0]), np.array([4.0, 1.0, 9.0]), 10.0
    p = _plan(tmp_path, 'type: "BatchNorm" batch_norm_param { eps: 0.01 }',
              blobs=[m, v, [s]])
    x = _x()
    (out,) = _fwd(p, x)
    ref = (x - _ch(m / s)) / np.sqrt(_ch(v / s) + np.float64(np.float32(0.01)))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_batchnorm_factor_zero_ignores_stats(tmp_path):
    p = _plan(tmp_path, 'type: "BatchNorm"', blobs=[[5.0, 6, 7], [8.0, 9, 10], [0.0]])
    x = _x()
    (out,) = _fwd(p, x)
    np.testing.assert_allclose(out, x / np.sqrt(np.float64(np.float32(1e-5))), rtol=1e-12)


@pytest.mark.parametrize("layer, phase", [
    ('type: "BatchNorm" batch_norm_param { use_global_stats: false }', "TEST"),
    ('type: "BatchNorm"', "TRAIN"),  # unset use_global_stats follows the phase
])
def test_batchnorm_batch_statistics(tmp_path, layer, phase):
    shape = (3, 2, 4, 2, 3)
    p = _plan(tmp_path, layer, shape, blobs=[[9.0, 9], [9.0, 9], [1.0]], phase=phase)
    x = _x(shape)
    (out,) = _fwd(p, x)
    axes = (0, 2, 3, 4)
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)  # biased
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + np.float32(1e-5)), rtol=1e-10)


def test_batchnorm_train_phase_with_global_stats(tmp_path):
    p = _plan(tmp_path, 'type: "BatchNorm" batch_norm_param { use_global_stats: true }',
              blobs=[[1.0, 2, 3], [1.0, 1, 1], [1.0]], phase="TRAIN")
    x = _x()
    (out,) = _fwd(p, x)
    np.testing.assert_allclose(out, (x - _ch([1, 2, 3])) / np.sqrt(1 + np.float32(1e-5)))


def test_batchnorm_blob_shapes(tmp_path):
    p = _plan(tmp_path, 'type: "BatchNorm"', (4, 7))
    assert p.expected_blobs == [(7,), (7,), (1,)]


# -- Scale / Bias ----------------------------------------------------------------------------------

@pytest.mark.parametrize("param, sshape", [
    ("", (3,)), ("axis: 0 num_axes: 2", (2, 3)), ("axis: -2 num_axes: -1", (4, 5)),
    ("num_axes: 0", ()), ("axis: 3 num_axes: 0", ()), ("axis: 2 num_axes: 1", (4,)),
])
def test_scale_bias_learned_shapes_and_values(tmp_path, param, sshape):
    p = _plan(tmp_path, f'type: "Scale" scale_param {{ {param} bias_term: true }}')
    assert p.expected_blobs == [sshape, sshape]
    s, b = _x(sshape, 1) if sshape else np.float64(1.5), _x(sshape, 2) if sshape else -0.25
    x = _x()
    (out,) = _fwd(p, x, blobs=[np.asarray(s), np.asarray(b)])
    ax = 0 if not sshape else (x.ndim + int(param.split("axis: ")[1].split()[0])) % x.ndim \
        if "axis:" in param else 1
    tail = (1,) * (x.ndim - ax - len(sshape))
    ref = x * np.reshape(s, np.shape(s) + tail) + np.reshape(b, np.shape(b) + tail)
    np.testing.assert_allclose(out, ref, rtol=1e-14)

    q = _plan(tmp_path, f'type: "Bias" bias_param {{ {param} }}')
    assert q.expected_blobs == [sshape]
    (out,) = _fwd(q, x, blobs=[np.asarray(b)])
    np.testing.assert_allclose(out, x + np.reshape(b, np.shape(b) + tail), rtol=1e-14)


def test_scale_two_bottoms_with_bias(tmp_path):
    # Scale from bottom[1] (axis 2, shape (4, 5)); the only blob is the bias, shaped like it.
    net = _net(tmp_path, 'layer { name: "l" type: "Scale" bottom: "data" bottom: "s" top: "o" '
                         'scale_param { axis: 2 num_axes: 1 bias_term: true } }',
               {"data": SHAPE, "s": (4, 5)})
    p = make_plan(net).layers[-1]
    assert p.expected_blobs == [(4, 5)]
    x, s, b = _x(), _x((4, 5), 1), _x((4, 5), 2)
    (out,) = _fwd(p, x, s, blobs=[b])
    np.testing.assert_allclose(out, x * s + b, rtol=1e-14)


def test_scale_bias_two_bottoms_scalar_and_leading_axis(tmp_path):
    net = _net(tmp_path,
               'layer { name: "s0" type: "Scale" bottom: "data" bottom: "k" top: "a" '
               'scale_param { axis: 3 } }\n'
               'layer { name: "b0" type: "Bias" bottom: "data" bottom: "n" top: "b" '
               'bias_param { axis: 0 } }\n',
               {"data": SHAPE, "k": (5,), "n": (2, 3)})
    plan = make_plan(net)
    x = _x()
    (a,) = _fwd(plan.layers[-2], x, np.arange(5.0), blobs=[])
    np.testing.assert_allclose(a, x * np.arange(5.0))
    # A 0-axis factor (an Input cannot declare one) uses axis 0 whatever `axis` says.
    assert plan.layers[-2].impl.top_shapes([SHAPE, ()]) == [SHAPE]
    (a,) = _fwd(plan.layers[-2], x, np.float64(3.0), blobs=[])
    np.testing.assert_allclose(a, 3 * x)
    n = _x((2, 3), 5)
    (b,) = _fwd(plan.layers[-1], x, n, blobs=[])
    np.testing.assert_allclose(b, x + n[:, :, None, None])


# -- LRN -------------------------------------------------------------------------------------------

def test_lrn_across_hand_numbers(tmp_path):
    # 3 channels, window 3: channel c sums squares of c-1..c+1, missing channels count 0.
    p = _plan(tmp_path, 'type: "LRN" lrn_param { local_size: 3 alpha: 3 beta: 0.5 k: 2 }',
              (1, 3, 1, 1))
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    (out,) = _fwd(p, x)
    sums = np.array([1 + 4, 1 + 4 + 9, 4 + 9])
    ref = x.ravel() * (2 + 3 / 3 * sums) ** -0.5
    np.testing.assert_allclose(out.ravel(), ref, rtol=1e-14)


def test_lrn_within_divisor_counts_padding(tmp_path):
    # A single 1 at a corner: the 3x3 average around it is 1/9 at its neighbours, not 1/4.
    p = _plan(tmp_path, 'type: "LRN" lrn_param { local_size: 3 alpha: 9 beta: 1 k: 5 '
                        'norm_region: WITHIN_CHANNEL }', (1, 1, 3, 3))
    x = np.full((1, 1, 3, 3), 2.0)
    (out,) = _fwd(p, x)
    pooled = np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) * 4 / 9  # x² = 4, k ignored
    np.testing.assert_allclose(out[0, 0], 2 / (1 + 9 * pooled), rtol=1e-14)


# -- MVN -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("across", [False, True])
def test_mvn_eps_on_std_and_legacy_top(tmp_path, across):
    flag = "true" if across else "false"
    p = _plan(tmp_path, f'type: "MVN" mvn_param {{ across_channels: {flag} eps: 0.5 }}', (2, 6))
    assert p.top_shapes == [(2, 6, 1, 1)]
    x = _x((2, 6))
    (out,) = _fwd(p, x)
    if across:
        ref = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + np.float32(0.5))
    else:  # one value per (n, c): centred to 0, so 0 / (0 + eps)
        ref = np.zeros_like(x)
    np.testing.assert_allclose(out.reshape(2, 6), ref, rtol=1e-12, atol=1e-15)


# -- Normalize -------------------------------------------------------------------------------------

@pytest.mark.parametrize("across, shared", [(True, True), (False, False), (False, True),
                                            (True, False)])
def test_normalize_formula_and_blob(tmp_path, across, shared):
    a, s = str(across).lower(), str(shared).lower()
    p = _plan(tmp_path, f'type: "Normalize" norm_param {{ across_spatial: {a} '
                        f'channel_shared: {s} eps: 0.25 }}')
    assert p.expected_blobs == ([()] if shared else [(3,)])
    scale = np.array(4.0) if shared else np.array([1.0, 2.0, 3.0])
    x = _x()
    (out,) = _fwd(p, x, blobs=[scale])
    axes = (1, 2, 3) if across else (1,)
    norm = np.sqrt((x * x).sum(axis=axes, keepdims=True) + 0.25)
    np.testing.assert_allclose(out, x / norm * (scale if shared else _ch(scale)), rtol=1e-13)


# -- BN (PSPNet / ENet forks) ---------------------------------------------------------------------

SLOPE, BIAS, MEAN, VAR = [1.5, -2.0, 0.5], [0.125, 0.25, -0.375], [0.25, -1.0, 2.0], [4.0, 0.5, 1.0]
C4 = [np.reshape(v, (1, 3, 1, 1)) for v in (SLOPE, BIAS, MEAN, VAR)]


def test_bn_pspnet_stored_stats(tmp_path):
    p = _plan(tmp_path, 'type: "BN" bn_param { frozen: true eps: 0.01 }', blobs=C4)
    assert p.expected_blobs == [(1, 3, 1, 1)] * 4
    x = _x()
    (out,) = _fwd(p, x)
    ref = _ch(SLOPE) * (x - _ch(MEAN)) / np.sqrt(_ch(VAR) + np.float32(0.01)) + _ch(BIAS)
    np.testing.assert_allclose(out, ref, rtol=1e-13)


def test_bn_pspnet_train_unfrozen_uses_batch_stats(tmp_path):
    p = _plan(tmp_path, 'type: "BN" bn_param { momentum: 0.9 }', blobs=C4, phase="TRAIN")
    x = _x()
    (out,) = _fwd(p, x)
    mean, var = x.mean((0, 2, 3), keepdims=True), x.var((0, 2, 3), keepdims=True)
    ref = _ch(SLOPE) * (x - mean) / np.sqrt(var + np.float32(1e-5)) + _ch(BIAS)
    np.testing.assert_allclose(out, ref, rtol=1e-10)
    # ...but frozen keeps the stored statistics even in TRAIN.
    q = _plan(tmp_path, 'type: "BN" bn_param { frozen: true }', blobs=C4, phase="TRAIN")
    (out,) = _fwd(q, x)
    ref = _ch(SLOPE) * (x - _ch(MEAN)) / np.sqrt(_ch(VAR) + np.float32(1e-5)) + _ch(BIAS)
    np.testing.assert_allclose(out, ref, rtol=1e-13)


def test_bn_enet_inference(tmp_path):
    p = _plan(tmp_path, 'type: "BN" bn_param { bn_mode: INFERENCE }', blobs=C4[:2])
    assert p.expected_blobs == [(1, 3, 1, 1)] * 2
    x = _x()
    (out,) = _fwd(p, x)
    np.testing.assert_allclose(out, _ch(SLOPE) * x + _ch(BIAS), rtol=1e-14)


def test_bn_enet_learn_with_stat_tops(tmp_path):
    net = _net(tmp_path, 'layer { name: "l" type: "BN" bottom: "data" top: "o" top: "m" top: "v" '
                         'bn_param { scale_filler { value: 1 } } }', {"data": (2, 3, 5)},
               {"l": C4[:2]})
    p = make_plan(net).layers[-1]
    assert p.top_shapes == [(2, 3, 5, 1), (1, 3, 1, 1), (1, 3, 1, 1)]
    x = _x((2, 3, 5))
    out, m, v = _fwd(p, x)
    mean = x.mean((0, 2), keepdims=True)
    var = (x * x).mean((0, 2), keepdims=True) - mean**2
    ref = _ch(SLOPE, 3) * (x - mean) / np.sqrt(var + 1e-9) + _ch(BIAS, 3)
    np.testing.assert_allclose(out, ref[..., None], rtol=1e-10)
    np.testing.assert_allclose(m.ravel(), mean.ravel(), rtol=1e-12)
    np.testing.assert_allclose(v.ravel(), var.ravel(), rtol=1e-10)


@pytest.mark.parametrize("layer, blobs, expect", [
    ('type: "BN"', C4, 4),                       # blob count decides
    ('type: "BN"', C4[:2], 2),
    ('type: "BN"', None, 4),                     # nothing to go on: PSPNet
    ('type: "BN" bn_param { frozen: true }', None, 4),
    ('type: "BN" bn_param { shift_filler { value: 0 } }', None, 2),
])
def test_bn_fork_detection(tmp_path, layer, blobs, expect):
    assert len(_plan(tmp_path, layer, blobs=blobs).expected_blobs) == expect


@pytest.mark.parametrize("layer, blobs", [
    ('type: "BN" bn_param { frozen: true bn_mode: INFERENCE }', None),
    ('type: "BN" bn_param { bn_mode: LEARN }', C4),
    ('type: "BN" bn_param { eps: 0.001 }', C4[:2]),
    ('type: "BN"', C4[:3]),
])
def test_bn_fork_contradictions(tmp_path, layer, blobs):
    with pytest.raises(LayerdiffError, match="layer 'l'"):
        _plan(tmp_path, layer, blobs=blobs)


def test_bn_enet_inference_has_one_top(tmp_path):
    net = _net(tmp_path, 'layer { name: "l" type: "BN" bottom: "data" top: "o" top: "m" '
                         'bn_param { bn_mode: INFERENCE } }')
    with pytest.raises(LayerdiffError, match="one top"):
        make_plan(net)


# -- float64 on the goldens ------------------------------------------------------------------------

MINE = {"BatchNorm", "Scale", "Bias", "LRN", "MVN", "Normalize"}


def _my_goldens():
    cases = []
    for kind in ("unit", "fork"):
        for d in golden_dirs(kind):
            types = {r["type"] for r in json.loads((d / "meta.json").read_text())["layers"]}
            if types & MINE and types <= MINE | {"Input", "Convolution"}:
                cases.append(pytest.param(d, id=f"{kind}/{d.name}"))
    return cases or [pytest.param(None, id="no-shared-data")]


@pytest.mark.parametrize("case", _my_goldens())
def test_goldens_float64(case):
    """The float64 engine stays within the unit tolerance of Caffe's float32 output."""
    g = load_golden(case)
    trace = run_caffe(g.net, g.feeds, dtype="float64")
    checked = 0
    for rec in g.meta["layers"]:
        if rec["type"] in MINE:
            for k, top in enumerate(rec["tops"]):
                out = trace[rec["name"]].outputs[k]
                assert out.dtype == np.float64
                compare(out, g.trace[g.key(rec, top)], UNIT_TOL, f"{case.name} {rec['name']}")
                checked += 1
    assert checked

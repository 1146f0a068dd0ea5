"""RNN, LSTM and LSTMUnit: shape errors, static input, expose_hidden, cont resets, float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import UNIT_TOL, check_end_to_end, golden_dirs, load_golden
from nets import caffe_net

from layerdiff.engine import make_plan, run_caffe
from layerdiff.errors import LayerdiffError

T, N, H = 4, 3, 5


def _net(tmp_path, inputs: dict[str, tuple], layer: str, blobs=None):
    return caffe_net(tmp_path, f'layer {{ name: "l" {layer} }}', inputs,
                     None if blobs is None else {"l": blobs}, np.float32)


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _ref_lstm(x, cont, xs, w_x, b, w_s, w_h, h, c):
    """Plain float64 LSTM, one stream and one step at a time."""
    out = np.zeros(x.shape[:2] + (H,))
    for t in range(x.shape[0]):
        for n in range(x.shape[1]):
            g = w_x @ x[t, n].ravel() + b + w_h @ (cont[t, n] * h[n])
            if xs is not None:
                g += w_s @ xs[n].ravel()
            i, f, o, gg = _sig(g[:H]), _sig(g[H:2 * H]), _sig(g[2 * H:3 * H]), np.tanh(g[3 * H:])
            c[n] = cont[t, n] * f * c[n] + i * gg
            h[n] = o * np.tanh(c[n])
            out[t, n] = h[n]
    return out


def _ref_rnn(x, cont, xs, w_x, b, w_s, w_hh, w_ho, b_o, h):
    out = np.zeros(x.shape[:2] + (H,))
    for t in range(x.shape[0]):
        for n in range(x.shape[1]):
            a = w_x @ x[t, n].ravel() + b + w_hh @ (cont[t, n] * h[n])
            if xs is not None:
                a += w_s @ xs[n].ravel()
            h[n] = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ h[n] + b_o)
    return out


def _data(static: bool):
    rs = np.random.RandomState(1)
    x = rs.uniform(-1, 1, (T, N, 2, 3))
    cont = np.array([[0, 0, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1]], np.float64)
    xs = rs.uniform(-1, 1, (N, 7)) if static else None
    return rs, x, cont, xs


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lstm_against_reference(tmp_path, static, dtype):
    rs, x, cont, xs = _data(static)
    w = [rs.normal(0, 0.5, s) for s in [(4 * H, 6), (4 * H,)] + [(4 * H, 7)] * static
         + [(4 * H, H)]]
    inputs = {"x": x.shape, "cont": cont.shape} | ({"xs": xs.shape} if static else {})
    bottoms = " ".join(f'bottom: "{k}"' for k in inputs)
    net = _net(tmp_path, inputs, f'type: "LSTM" {bottoms} top: "h" '
               f'recurrent_param {{ num_output: {H} }}', w)
    assert make_plan(net).layers[-1].expected_blobs == [tuple(a.shape) for a in w]
    w = [a.astype(np.float32).astype(np.float64) for a in w]
    feeds = {"x": x, "cont": cont} | ({"xs": xs} if static else {})
    feeds = {k: v.astype(dtype) for k, v in feeds.items()}
    out = run_caffe(net, feeds, dtype=dtype)["l"].outputs[0]
    assert out.dtype == dtype and out.shape == (T, N, H)
    f = {k: v.astype(np.float64) for k, v in feeds.items()}
    ref = _ref_lstm(f["x"], f["cont"], f.get("xs"), w[0], w[1], w[2] if static else None, w[-1],
                    np.zeros((N, H)), np.zeros((N, H)))
    np.testing.assert_allclose(out, ref, atol=1e-6 if dtype == "float32" else 1e-13)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rnn_against_reference(tmp_path, static, dtype):
    rs, x, cont, xs = _data(static)
    w = [rs.normal(0, 0.5, s) for s in [(H, 6), (H,)] + [(H, 7)] * static
         + [(H, H), (H, H), (H,)]]
    inputs = {"x": x.shape, "cont": cont.shape} | ({"xs": xs.shape} if static else {})
    bottoms = " ".join(f'bottom: "{k}"' for k in inputs)
    net = _net(tmp_path, inputs, f'type: "RNN" {bottoms} top: "o" '
               f'recurrent_param {{ num_output: {H} }}', w)
    w = [a.astype(np.float32).astype(np.float64) for a in w]
    feeds = {"x": x, "cont": cont} | ({"xs": xs} if static else {})
    feeds = {k: v.astype(dtype) for k, v in feeds.items()}
    out = run_caffe(net, feeds, dtype=dtype)["l"].outputs[0]
    assert out.dtype == dtype
    f = {k: v.astype(np.float64) for k, v in feeds.items()}
    ref = _ref_rnn(f["x"], f["cont"], f.get("xs"), w[0], w[1], w[2] if static else None,
                   *w[-3:], np.zeros((N, H)))
    np.testing.assert_allclose(out, ref, atol=1e-6 if dtype == "float32" else 1e-13)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_expose_hidden_continues_a_sequence(tmp_path, kind):
    # Running T steps at once equals running them in two halves, passing the state across.
    rs, x, cont, _ = _data(False)
    cont[2] = 1  # the second half must continue, not reset
    states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
    ends = ["hT", "cT"] if kind == "LSTM" else ["hT"]
    shapes = ([(4 * H, 6), (4 * H,), (4 * H, H)] if kind == "LSTM"
              else [(H, 6), (H,), (H, H), (H, H), (H,)])
    w = [rs.normal(0, 0.5, s) for s in shapes]
    impls = {}
    for half in (T, T // 2):
        inputs = {"x": (half,) + x.shape[1:], "cont": (half, N)} | {s: (1, N, H) for s in states}
        sub = tmp_path / str(half)
        sub.mkdir()
        net = _net(sub, inputs, f'type: "{kind}" ' + " ".join(f'bottom: "{k}"' for k in inputs)
                   + ' top: "y" ' + " ".join(f'top: "{e}"' for e in ends)
                   + f' recurrent_param {{ num_output: {H} expose_hidden: true }}', w)
        impls[half] = make_plan(net).layers[-1]
    p, blobs = impls[T], impls[T].blobs
    zeros = [np.zeros((1, N, H), np.float32)] * len(states)
    x32, c32 = x.astype(np.float32), cont.astype(np.float32)
    full = p.impl.forward([x32, c32] + zeros, blobs)
    q = impls[T // 2]
    first = q.impl.forward([x32[:2], c32[:2]] + zeros, blobs)
    second = q.impl.forward([x32[2:], c32[2:]] + first[1:], blobs)
    np.testing.assert_allclose(np.concatenate([first[0], second[0]]), full[0], atol=1e-6)
    for a, b in zip(second[1:], full[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert full[0].shape == (T, N, H) and full[1].shape == (1, N, H)
    if kind == "LSTM":
        np.testing.assert_array_equal(full[1][0], full[0][-1])  # h_T is the last output


def test_cont_zero_resets_state(tmp_path):
    # With cont 0 at step t, steps >= t do not depend on what came before.
    rs, x, _, _ = _data(False)
    w = [rs.normal(0, 0.5, s) for s in [(4 * H, 6), (4 * H,), (4 * H, H)]]
    net = _net(tmp_path, {"x": x.shape, "cont": (T, N)},
               f'type: "LSTM" bottom: "x" bottom: "cont" top: "h" '
               f'recurrent_param {{ num_output: {H} }}', w)
    p = make_plan(net).layers[-1]
    cont = np.ones((T, N), np.float32)
    cont[2] = 0
    x1 = x.astype(np.float32)
    x2 = x1.copy()
    x2[:2] = 7.0  # different history
    a = p.impl.forward([x1, cont], p.blobs)[0]
    b = p.impl.forward([x2, cont], p.blobs)[0]
    assert not np.allclose(a[:2], b[:2])
    np.testing.assert_array_equal(a[2:], b[2:])


@pytest.mark.parametrize("inputs,layer,match", [
    ({"x": (T, N, 4), "cont": (T, N + 1)}, 'type: "LSTM" bottom: "x" bottom: "cont" top: "h" '
     'recurrent_param { num_output: 5 }', "cont must be"),
    ({"x": (T, N, 4), "cont": (T, N)}, 'type: "RNN" bottom: "x" bottom: "cont" top: "h" '
     'recurrent_param { num_output: 0 }', "num_output"),
    ({"x": (T,), "cont": (T, N)}, 'type: "RNN" bottom: "x" bottom: "cont" top: "h" '
     'recurrent_param { num_output: 3 }', ">= 2 axes"),
    ({"x": (T, N, 4), "cont": (T, N), "s": (N + 1, 2)}, 'type: "LSTM" bottom: "x" '
     'bottom: "cont" bottom: "s" top: "h" recurrent_param { num_output: 5 }', "static input"),
    ({"x": (T, N, 4), "cont": (T, N)}, 'type: "LSTM" bottom: "x" bottom: "cont" top: "h" '
     'recurrent_param { num_output: 5 expose_hidden: true }', "bottoms"),
    ({"x": (T, N, 4), "cont": (T, N), "h0": (1, N, 5), "c0": (1, N, 5)}, 'type: "LSTM" '
     'bottom: "x" bottom: "cont" bottom: "h0" bottom: "c0" top: "h" '
     'recurrent_param { num_output: 5 expose_hidden: true }', "tops"),
    ({"x": (T, N, 4), "cont": (T, N), "h0": (1, N, 4)}, 'type: "RNN" bottom: "x" '
     'bottom: "cont" bottom: "h0" top: "o" top: "hT" '
     'recurrent_param { num_output: 5 expose_hidden: true }', "hidden state"),
    ({"c": (1, N, H), "g": (1, N, 4 * H + 1), "k": (1, N)}, 'type: "LSTMUnit" bottom: "c" '
     'bottom: "g" bottom: "k" top: "c1" top: "h1"', "4 x"),
    ({"c": (2, N, H), "g": (2, N, 4 * H), "k": (2, N)}, 'type: "LSTMUnit" bottom: "c" '
     'bottom: "g" bottom: "k" top: "c1" top: "h1"', "leading axis"),
    ({"c": (1, N, H), "g": (1, N, 4 * H), "k": (1, N, 1)}, 'type: "LSTMUnit" bottom: "c" '
     'bottom: "g" bottom: "k" top: "c1" top: "h1"', "2-axis"),
])
def test_invalid_shapes_and_params(tmp_path, inputs, layer, match):
    with pytest.raises(LayerdiffError, match=match):
        make_plan(_net(tmp_path, inputs, layer))


def test_lstm_unit_cont_zero_forgets_exactly(tmp_path):
    net = _net(tmp_path, {"c": (1, N, H), "g": (1, N, 4 * H), "k": (1, N)},
               'type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "k" top: "c1" top: "h1"')
    p = make_plan(net).layers[-1]
    rs = np.random.RandomState(2)
    gates = rs.uniform(-2, 2, (1, N, 4 * H))
    c_prev = rs.uniform(-1e6, 1e6, (1, N, H))
    cont = np.array([[0.0, 1.0, 0.5]])
    c, h = p.impl.forward([c_prev, gates, cont], [])
    g = gates[0]
    i, f, o = (_sig(g[:, k * H:(k + 1) * H]) for k in range(3))
    gg = np.tanh(g[:, 3 * H:])
    ref_c = cont[0][:, None] * f * c_prev[0] + i * gg
    np.testing.assert_allclose(c[0], ref_c, rtol=1e-13)
    np.testing.assert_array_equal(c[0, 0], (i * gg)[0])  # no trace of the huge c_prev
    np.testing.assert_allclose(h[0], o * np.tanh(ref_c), rtol=1e-13)


def _my_cases():
    out = []
    for d in golden_dirs("unit"):
        types = {r["type"] for r in json.loads((d / "meta.json").read_text())["layers"]}
        if types & {"RNN", "LSTM", "LSTMUnit"}:
            out.append(pytest.param(d, id=d.name))
    return out or [pytest.param(None, id="no-shared-data")]


@pytest.mark.parametrize("case", _my_cases())
def test_goldens_in_float64(case):
    check_end_to_end(load_golden(case), UNIT_TOL, dtype="float64")

"""BVLC recurrent layers: RNN, LSTM (unrolled over time) and the single-step LSTMUnit.

Caffe builds RNN/LSTM as an unrolled inner net (recurrent_layer.cpp, rnn_layer.cpp,
lstm_layer.cpp); this module computes the same graph directly, in the same operation order:

- bottoms ``x`` (T, N, ...), ``cont`` (T, N), optional static input (N, ...), then with
  ``expose_hidden`` the initial states (1, N, H): ``h_0`` for RNN, ``h_0, c_0`` for LSTM;
- ``cont_t`` multiplies ``h_{t-1}`` before the recurrent product (0 starts a new sequence);
- each step's pre-activation is the Eltwise SUM ``(W_h·h_{t-1}) + (W_x·x_t + b) [+ W_s·x_s]``.

Without ``expose_hidden`` Caffe feeds the previous forward's final state in as ``h_0``/``c_0``;
that state is zero in a freshly loaded net, which is what this stateless engine reproduces.
"""

from __future__ import annotations

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register


def _prod(dims: tuple[int, ...]) -> int:
    return int(np.prod(dims, dtype=np.int64))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """lstm_unit_layer.cpp's 1 / (1 + exp(-x)), evaluated in double and rounded to x's dtype."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(x.dtype)


def _tanh(x: np.ndarray) -> np.ndarray:
    """lstm_unit_layer.cpp's tanh (2·sigmoid(2x) - 1 in double), rounded to x's dtype."""
    return np.tanh(x.astype(np.float64)).astype(x.dtype)


def _lstm_step(c_prev: np.ndarray, gates: np.ndarray, cont: np.ndarray):
    """One LSTMUnit step on (N, H), (N, 4H), (N,): returns (c, h). Gate order is i, f, o, g."""
    hd = c_prev.shape[-1]
    i = _sigmoid(gates[:, :hd])
    f = _sigmoid(gates[:, hd:2 * hd])
    o = _sigmoid(gates[:, 2 * hd:3 * hd])
    g = _tanh(gates[:, 3 * hd:])
    f *= cont[:, None]  # Caffe's (cont == 0 ? 0 : cont·f) is the same, f being finite
    c = f * c_prev
    c += i * g
    h = o * _tanh(c)
    return c, h


class _Recurrent(LayerImpl):
    """Shared bottom/top bookkeeping of RNN and LSTM (recurrent_layer.cpp)."""

    #: how many hidden-state blobs the architecture carries (RNN: h; LSTM: h, c)
    num_states = 1
    #: pre-activation width per hidden unit (LSTM: 4 gates)
    gate_factor = 1
    num_tops = (1, 3)

    def setup(self) -> None:
        p = self.param.recurrent_param
        if p.num_output <= 0:
            raise self.unsupported("recurrent_param.num_output", "must be positive")
        self.hidden = int(p.num_output)
        self.expose = bool(p.expose_hidden)
        exposed = self.num_states if self.expose else 0
        nb, nt = len(self.layer.bottoms), len(self.layer.tops)
        if nb not in (2 + exposed, 3 + exposed):
            raise self.invalid(f"has {nb} bottoms; expected x, cont, an optional static input"
                               + (f" and {exposed} exposed hidden state(s)" if exposed else ""))
        if nt != 1 + exposed:
            raise self.invalid(f"has {nt} tops, expected {1 + exposed}")
        self.static = nb > 2 + exposed

    def _check(self, bottom_shapes: list[Shape]) -> None:
        x, cont = bottom_shapes[0], bottom_shapes[1]
        if len(x) < 2:
            raise self.invalid(f"x must have >= 2 axes (T, N, ...), got {list(x)}")
        if tuple(cont) != tuple(x[:2]):
            raise self.invalid(f"cont must be (T, N) = {list(x[:2])}, got {list(cont)}")
        if self.static:
            s = bottom_shapes[2]
            if len(s) < 1 or s[0] != x[1]:
                raise self.invalid(f"static input must be (N, ...) with N = {x[1]}, got {list(s)}")
        want = (1, x[1], self.hidden)
        for s in bottom_shapes[2 + self.static:]:
            if tuple(s) != want:
                raise self.invalid(f"exposed hidden state must be {list(want)}, got {list(s)}")

    def _input_blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """W_x (G, K), b (G,), [W_static (G, Ks)]: the blobs owned before the time loop."""
        self._check(bottom_shapes)
        g = self.gate_factor * self.hidden
        shapes = [(g, _prod(bottom_shapes[0][2:])), (g,)]
        if self.static:
            shapes.append((g, _prod(bottom_shapes[2][1:])))
        return shapes

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._check(bottom_shapes)
        t, n = bottom_shapes[0][:2]
        state = (1, n, self.hidden)
        return [(t, n, self.hidden)] + [state] * (self.num_states if self.expose else 0)

    def _pre(self, bottoms, blobs):
        """(T, N, G) input transforms W_x·x + b, the (N, G) static term or None, the states."""
        x, cont = bottoms[0], bottoms[1]
        t, n = x.shape[:2]
        w_x, b = blobs[0], blobs[1]
        pre = (x.reshape(t * n, -1) @ w_x.T).reshape(t, n, -1)
        pre += b
        static = bottoms[2].reshape(n, -1) @ blobs[2].T if self.static else None
        zeros = np.zeros((n, self.hidden), x.dtype)
        states = ([s.reshape(n, self.hidden) for s in bottoms[2 + self.static:]] if self.expose
                  else [zeros] * self.num_states)
        return pre, static, cont, states

    @staticmethod
    def _gate_input(h_prev, cont_t, w_h, pre_t, static):
        # Scale (h * cont), InnerProduct, then Eltwise SUM in bottom order.
        gates = (h_prev * cont_t[:, None]) @ w_h.T
        gates += pre_t
        if static is not None:
            gates += static
        return gates


@register("RNN")
class RNN(_Recurrent):
    """h_t = tanh(W_hh·(cont_t·h_{t-1}) + W_xh·x_t + b_h); o_t = tanh(W_ho·h_t + b_o).

    Blobs (rnn_layer.cpp's parameter order): W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o.
    Tops: o (T, N, H), and h_T with ``expose_hidden``.
    """

    num_bottoms = (2, 4)
    num_tops = (1, 2)

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        h = self.hidden
        return self._input_blob_shapes(bottom_shapes) + [(h, h), (h, h), (h,)]

    def forward(self, bottoms, blobs):
        pre, static, cont, (h,) = self._pre(bottoms, blobs)
        w_hh, w_ho, b_o = blobs[-3:]
        out = np.empty(pre.shape[:2] + (self.hidden,), pre.dtype)
        for t in range(pre.shape[0]):
            h = np.tanh(self._gate_input(h, cont[t], w_hh, pre[t], static))
            o = h @ w_ho.T
            o += b_o
            np.tanh(o, out=out[t])
        return [out] + ([h[None].copy()] if self.expose else [])


@register("LSTM")
class LSTM(_Recurrent):
    """LSTM over T steps, gates (i, f, o, g) stacked along the 4H axis (lstm_layer.cpp).

    Blobs: W_xc (4H, K), b_c (4H,), [W_xc_static (4H, Ks)], W_hc (4H, H).
    Tops: h (T, N, H), and h_T, c_T with ``expose_hidden`` (bottoms then end with h_0, c_0).
    """

    num_states = 2
    gate_factor = 4
    num_bottoms = (2, 5)
    num_tops = (1, 3)

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return self._input_blob_shapes(bottom_shapes) + [(4 * self.hidden, self.hidden)]

    def forward(self, bottoms, blobs):
        pre, static, cont, (h, c) = self._pre(bottoms, blobs)
        w_hc = blobs[-1]
        out = np.empty(pre.shape[:2] + (self.hidden,), pre.dtype)
        for t in range(pre.shape[0]):
            gates = self._gate_input(h, cont[t], w_hc, pre[t], static)
            c, h = _lstm_step(c, gates, cont[t])
            out[t] = h
        return [out] + ([h[None].copy(), c[None].copy()] if self.expose else [])


@register("LSTMUnit")
class LSTMUnit(LayerImpl):
    """One LSTM step: bottoms c_prev (1, N, H), gates (1, N, 4H), cont (1, N); tops c, h."""

    num_bottoms = (3, 3)
    num_tops = (2, 2)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        c, x, cont = (tuple(s) for s in bottom_shapes)
        # lstm_unit_layer.cpp's Reshape checks.
        if len(c) != 3 or len(x) != 3 or len(cont) != 2:
            raise self.invalid(f"needs 3-, 3- and 2-axis bottoms, got {[c, x, cont]}")
        if c[0] != 1 or x[0] != 1 or cont[0] != 1:
            raise self.invalid(f"every bottom must have a leading axis of 1, got {[c, x, cont]}")
        if not c[1] == x[1] == cont[1]:
            raise self.invalid(f"bottoms disagree on N: {[c, x, cont]}")
        if x[2] != 4 * c[2]:
            raise self.invalid(f"gates have {x[2]} channels, expected 4 x {c[2]}")
        return [c, c]

    def forward(self, bottoms, blobs):
        c_prev, gates, cont = bottoms
        c, h = _lstm_step(c_prev[0], gates[0], cont[0])
        return [c[None], h[None]]

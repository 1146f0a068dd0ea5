"""Element-wise neuron layers and Softmax, in BVLC Caffe's TEST-phase arithmetic.

Each forward follows the operation order of Caffe's ``*_layer.cpp`` CPU code (which scalars are
folded, what is skipped when it equals 1 or 0), so float32 results round the way Caffe's do.
Scalars from the prototxt are cast to the bottom's dtype first, as Caffe stores them as Dtype.
"""

from __future__ import annotations

import math

import numpy as np

from layerdiff.engine.registry import LayerImpl, Shape, register


class _Neuron(LayerImpl):
    """One bottom, one top of the same shape (Caffe's NeuronLayer)."""

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0])]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Caffe's sigmoid, 0.5·tanh(0.5·z) + 0.5 (sigmoid_layer.cpp); ``z`` is overwritten."""
    half = z.dtype.type(0.5)
    z *= half
    np.tanh(z, out=z)
    z *= half
    z += half
    return z


@register("ReLU")
class ReLU(_Neuron):
    """max(x, 0) + negative_slope·min(x, 0) (relu_layer.cpp)."""

    def setup(self) -> None:
        self.slope = self.param.relu_param.negative_slope

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        s = x.dtype.type(self.slope)
        if s == 0:
            return [np.maximum(x, s)]
        if 0 < s <= 1:  # then max(x, s·x) is the same value with one temporary fewer
            out = x * s
            return [np.maximum(x, out, out=out)]
        out = np.minimum(x, 0)
        out *= s
        out += np.maximum(x, 0)
        return [out]


@register("PReLU")
class PReLU(_Neuron):
    """ReLU with learned slopes per channel (axis 1), or one slope with ``channel_shared``."""

    def setup(self) -> None:
        self.shared = self.param.prelu_param.channel_shared

    def blob_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        if len(bottom_shapes[0]) < 2:
            raise self.invalid(f"bottom must have >= 2 axes, got {list(bottom_shapes[0])}")
        # prelu_layer.cpp: a shared slope is a 0-D blob, else one per channel.
        return [()] if self.shared else [(bottom_shapes[0][1],)]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        slope = blobs[0].astype(x.dtype, copy=False)
        if not self.shared:
            slope = slope.reshape((1, -1) + (1,) * (x.ndim - 2))
        # Caffe's max(x,0) + s·min(x,0) equals this for finite slopes (up to the sign of 0).
        return [np.where(x > 0, x, x * slope)]


@register("ELU")
class ELU(_Neuron):
    """max(x, 0) + alpha·(exp(min(x, 0)) - 1) (elu_layer.cpp; exp - 1, not expm1)."""

    def setup(self) -> None:
        self.alpha = self.param.elu_param.alpha

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        out = np.minimum(x, 0)
        np.exp(out, out=out)
        out -= 1
        out *= x.dtype.type(self.alpha)
        out += np.maximum(x, 0)
        return [out]


@register("Sigmoid")
class Sigmoid(_Neuron):
    def forward(self, bottoms, blobs):
        return [_sigmoid(bottoms[0].copy())]


@register("TanH")
class TanH(_Neuron):
    def forward(self, bottoms, blobs):
        return [np.tanh(bottoms[0])]


@register("AbsVal")
class AbsVal(_Neuron):
    def forward(self, bottoms, blobs):
        return [np.abs(bottoms[0])]


@register("BNLL")
class BNLL(_Neuron):
    """log(1 + exp(x)) in Caffe's stable form: x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x))."""

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        # logaddexp(x, 0) is max(x, 0) + log1p(exp(-|x|)): the same split as bnll_layer.cpp.
        return [np.logaddexp(x, x.dtype.type(0))]


@register("Power")
class Power(_Neuron):
    """(shift + scale·x)^power (power_layer.cpp)."""

    def setup(self) -> None:
        p = self.param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        t = x.dtype.type
        power, scale, shift = t(self.power), t(self.scale), t(self.shift)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN/inf as in C's pow
            if power * scale == 0:  # Caffe ignores the input when power·scale is 0
                value = t(1) if power == 0 else np.power(shift, power)
                return [np.full(x.shape, value, x.dtype)]
            out = x * scale if scale != 1 else x.copy()
            if shift != 0:
                out += shift
            if power != 1:
                np.power(out, power, out=out)
        return [out]


@register("Exp")
class Exp(_Neuron):
    """base^(shift + scale·x), computed as exp(log(base)·scale·x) · base^shift (exp_layer.cpp)."""

    def setup(self) -> None:
        p = self.param.exp_param
        if p.base != -1 and not p.base > 0:
            raise self.unsupported("exp_param.base", f"{p.base} (Caffe needs > 0, or -1 for e)")
        log_base = 1.0 if p.base == -1 else math.log(p.base)
        if math.isinf(log_base):
            raise self.unsupported("exp_param.base", f"log({p.base}) is infinite")
        self.inner = log_base * p.scale
        self.outer = 1.0 if p.shift == 0 else (math.exp(p.shift) if p.base == -1
                                                else math.pow(p.base, p.shift))

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        t = x.dtype.type
        inner, outer = t(self.inner), t(self.outer)
        out = np.exp(x) if inner == 1 else np.exp(x * inner)
        if outer != 1:
            out *= outer
        return [out]


@register("Log")
class Log(_Neuron):
    """log_base(shift + scale·x), computed as ln(...) · (1 / ln(base)) (log_layer.cpp)."""

    def setup(self) -> None:
        p = self.param.log_param
        if p.base != -1 and not p.base > 0:
            raise self.unsupported("log_param.base", f"{p.base} (Caffe needs > 0, or -1 for e)")
        log_base = 1.0 if p.base == -1 else math.log(p.base)
        if math.isinf(log_base) or log_base == 0:
            raise self.unsupported("log_param.base",
                                   f"{p.base}: 1/log(base) is not finite (Caffe refuses it)")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = p.scale, p.shift

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        t = x.dtype.type
        scale, shift, base_scale = t(self.scale), t(self.shift), t(self.base_scale)
        out = x * scale if scale != 1 else x.copy()
        if shift != 0:
            out += shift
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN/-inf as in C's log
            np.log(out, out=out)
        if base_scale != 1:
            out *= base_scale
        return [out]


@register("Threshold")
class Threshold(_Neuron):
    """1 where x > threshold, else 0 (NaN gives 0)."""

    def setup(self) -> None:
        self.threshold = self.param.threshold_param.threshold

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        return [np.greater(x, x.dtype.type(self.threshold)).astype(x.dtype)]


@register("Clip")
class Clip(_Neuron):
    """max(min, min(x, max)) (clip_layer.cpp): NaN becomes ``min``; min > max gives ``min``."""

    def setup(self) -> None:
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.unsupported("clip_param", "Caffe requires both min and max")
        self.lo, self.hi = p.min, p.max

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        t = x.dtype.type
        out = np.minimum(x, t(self.hi))
        # fmax drops the NaN operand, which is what std::max(min, NaN) does.
        return [np.fmax(out, t(self.lo), out=out)]


@register("Swish")
class Swish(_Neuron):
    """x · sigmoid(beta·x), with Caffe's tanh-form sigmoid (swish_layer.cpp)."""

    def setup(self) -> None:
        self.beta = self.param.swish_param.beta

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        sig = _sigmoid(x * x.dtype.type(self.beta))
        sig *= x
        return [sig]


@register("Dropout")
class Dropout(_Neuron):
    """An exact copy at TEST (BVLC scales at TRAIN time; it has no ``scale_train``)."""

    def setup(self) -> None:
        if self.phase != "TEST":
            raise self.unsupported("phase", f"{self.phase}: Dropout is random outside TEST")

    def forward(self, bottoms, blobs):
        return [bottoms[0].copy()]


@register("Softmax")
class Softmax(LayerImpl):
    """exp(x - max) / sum along ``axis`` (softmax_layer.cpp: subtract max, exp, sum, divide)."""

    def setup(self) -> None:
        self.axis = self.param.softmax_param.axis

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.canonical_axis(self.axis, len(bottom_shapes[0]), "softmax_param.axis")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms, blobs):
        x = bottoms[0]
        axis = self.canonical_axis(self.axis, x.ndim, "softmax_param.axis")
        out = x - x.max(axis=axis, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(axis=axis, keepdims=True)
        return [out]

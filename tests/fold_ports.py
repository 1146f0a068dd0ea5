"""BatchNorm folding for the alignment tests: folded Caffe models and folded or unfolded ports.

- :func:`fold_caffe_bn`: write a Caffe model (prototxt + caffemodel) with every BatchNorm
  (+ Scale) folded into the Convolution / InnerProduct before it, as ONNX export with constant
  folding and the converters after it do.
- :func:`bn_port`: a torch port with one ``BatchNorm2d``/``BatchNorm1d`` (affine) per Caffe
  BatchNorm + Scale pair, the way a PyTorch original has it.
- :func:`renamed`: the same port with other module names, so only the numbers can align it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from ports import ChannelAffine, GraphPort
from torch import nn

from layerdiff.caffe import caffe_pb2, load_caffe
from layerdiff.caffe.net import CaffeLayer, CaffeNet
from layerdiff.demo.resnet50 import write_caffemodel

_FOLDABLE = ("Convolution", "InnerProduct")


def blobs_of(layer: CaffeLayer) -> list[np.ndarray]:
    return [np.asarray(b.data, np.float64).reshape(b.shape) for b in layer.blobs]


def fold(weight: np.ndarray, bias: np.ndarray | None, mean: np.ndarray, var: np.ndarray,
         eps: float, gamma: np.ndarray | None = None, beta: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """``w' = w * k`` per output channel and ``b' = (b - mean) * k + beta``,
    with ``k = gamma / sqrt(var + eps)`` (in float64)."""
    k = 1.0 / np.sqrt(var + eps)
    if gamma is not None:
        k = k * gamma
    b = np.zeros_like(mean) if bias is None else bias
    shift = (b - mean) * k + (0.0 if beta is None else beta)
    return weight * k.reshape((-1,) + (1,) * (weight.ndim - 1)), shift


def _caffe_stats(bn: CaffeLayer) -> tuple[np.ndarray, np.ndarray, float]:
    mean, var, s = blobs_of(bn)[:3]
    factor = 0.0 if s.reshape(-1)[0] == 0 else 1.0 / s.reshape(-1)[0]
    return mean * factor, var * factor, bn.param.batch_norm_param.eps


def fold_caffe_bn(net: CaffeNet, out_dir: Path) -> Path:
    """Write ``net`` with its BatchNorm (+ Scale) layers folded into the layer before them.

    Returns the folder (``folded.prototxt`` + ``folded.caffemodel``) for ``load_caffe``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = [lay for lay in net.layers if lay.type != "Input"]
    producer: dict[str, CaffeLayer] = {}
    alias: dict[str, str] = {}  # top of a removed layer -> the blob that replaces it
    kept: list[CaffeLayer] = []
    weights: dict[str, list[np.ndarray]] = {}
    params: dict[str, caffe_pb2.LayerParameter] = {}
    for lay in layers:
        bottoms = [alias.get(b, b) for b in lay.bottoms]
        src = producer.get(bottoms[0]) if bottoms else None
        if lay.type in ("BatchNorm", "Scale") and src is not None and src.type in _FOLDABLE:
            w, b = weights[src.name][0], weights[src.name][1] if len(weights[src.name]) > 1 \
                else None
            if lay.type == "BatchNorm":
                mean, var, eps = _caffe_stats(lay)
                w, b = fold(w, b, mean, var, eps)
            else:
                scale = blobs_of(lay)
                w, b = fold(w, b, np.zeros(w.shape[0]), np.ones(w.shape[0]), 0.0, scale[0],
                            scale[1] if len(scale) > 1 else None)
            weights[src.name] = [w, b]
            _bias_term(params[src.name])
            for top in lay.tops:
                alias[top] = bottoms[0]
            continue
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(lay.param)
        del param.bottom[:]
        param.bottom.extend(bottoms)
        del param.blobs[:]
        params[lay.name] = param
        weights[lay.name] = blobs_of(lay)
        kept.append(lay)
        for top in lay.tops:
            producer[top] = lay
    proto = caffe_pb2.NetParameter(name=f"{net.name}_folded")
    for name, shape in net.inputs.items():
        inp = proto.layer.add(name=name, type="Input", top=[name])
        inp.input_param.shape.add(dim=list(shape))
    proto.layer.extend(params[lay.name] for lay in kept)
    (out_dir / "folded.prototxt").write_text(text_format.MessageToString(proto))
    write_caffemodel(out_dir / "folded.caffemodel",
                     {lay.name: weights[lay.name] for lay in kept if weights[lay.name]},
                     {lay.name: lay.type for lay in kept}, proto.name)
    return out_dir


def _bias_term(param: caffe_pb2.LayerParameter) -> None:
    if param.type == "Convolution":
        param.convolution_param.bias_term = True
    else:
        param.inner_product_param.bias_term = True


def load_folded(net: CaffeNet, out_dir: Path) -> CaffeNet:
    shape = next(iter(net.inputs.values()))
    return load_caffe(fold_caffe_bn(net, out_dir), shape=shape)


def bn_port(net: CaffeNet) -> GraphPort:
    """A correct port of ``net`` with each Caffe BatchNorm + Scale as one affine BatchNorm."""
    port = GraphPort(net).eval()
    steps = []
    for name, bottoms, tops in port.steps:
        mod = getattr(port, name)
        prev = steps[-1] if steps else None
        if isinstance(mod, ChannelAffine) and prev is not None \
                and isinstance(getattr(port, prev[0]), nn.BatchNorm2d) and bottoms == prev[2]:
            stats = getattr(port, prev[0])
            flat = _feeds_flat(net, prev[1][0])
            bn = (nn.BatchNorm1d if flat else nn.BatchNorm2d)(stats.num_features, stats.eps)
            with torch.no_grad():
                bn.running_mean.copy_(stats.running_mean)
                bn.running_var.copy_(stats.running_var)
                bn.weight.copy_(mod.weight)
                bn.bias.copy_(mod.bias if mod.bias is not None else torch.zeros_like(mod.weight))
            setattr(port, prev[0], bn.eval())
            delattr(port, name)
            steps[-1] = (prev[0], prev[1], tops)
            continue
        steps.append((name, bottoms, tops))
    port.steps = steps
    return port


def _feeds_flat(net: CaffeNet, blob: str) -> bool:
    """Whether ``blob`` comes out of an InnerProduct (a 2-D activation)."""
    return any(lay.type == "InnerProduct" and blob in lay.tops for lay in net.layers)


def renamed(port: GraphPort, rename: Callable[[str], str]) -> GraphPort:
    """``port`` with every module re-registered under ``rename(name)``."""
    steps = []
    for name, bottoms, tops in port.steps:
        mod = getattr(port, name)
        delattr(port, name)
        port.add_module(rename(name), mod)
        steps.append((rename(name), bottoms, tops))
    port.steps = steps
    return port


def drop_steps(port: GraphPort, names: set[str]) -> GraphPort:
    """``port`` without the steps ``names`` (a port that forgot those layers; in-place tops)."""
    port.steps = [s for s in port.steps if s[0] not in names]
    for name in names:
        delattr(port, name)
    return port


def insert_step(port: GraphPort, after: str, name: str, module: nn.Module) -> GraphPort:
    """``port`` with ``module`` applied in place to the output of step ``after``."""
    port.add_module(name, module)
    k = next(i for i, s in enumerate(port.steps) if s[0] == after)
    top = port.steps[k][2]
    port.steps.insert(k + 1, (name, top, top))
    return port

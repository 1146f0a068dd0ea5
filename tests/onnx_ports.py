"""ONNX files for the tests, made the way users make them: ``torch.onnx.export`` of a port (the
TorchScript exporter, ``dynamo=False``), a float16 conversion, small hand-built graphs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest


def require_onnx():
    """``onnx``; the module skips without it, except under CI where it must be installed."""
    if os.environ.get("CI") == "true":
        import onnx

        return onnx
    return pytest.importorskip("onnx", reason="needs the onnx extra: pip install layerdiff[onnx]")


def export(module, shape: tuple[int, ...], path: Path, *, fold: bool = False,
           input_name: str = "data") -> Path:
    """Export ``module`` with the TorchScript exporter. ``fold=True`` is the exporter's default
    (constant folding: BatchNorm merged into the conv before it); ``False`` keeps every BN."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(module.eval(), torch.zeros(shape), str(path), dynamo=False,
                          input_names=[input_name], do_constant_folding=fold)
    return path


def to_float16(src: Path, dst: Path) -> Path:
    """The model with every float initializer, input and output in float16 (what an fp16
    conversion tool produces with keep_io_types off)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                               t.name))
    for v in (*m.graph.input, *m.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del m.graph.value_info[:]
    onnx.save(m, str(dst))
    return dst


def set_attribute(src: Path, dst: Path, node: str, **attrs) -> Path:
    """A copy of the model with attributes of one node changed (a converter's mistake)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    n = next(x for x in m.graph.node if x.name == node)
    keep = [a for a in n.attribute if a.name not in attrs]
    del n.attribute[:]
    n.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in attrs.items()])
    onnx.save(m, str(dst))
    return dst


def set_initializer(src: Path, dst: Path, name: str, change) -> Path:
    """A copy of the model with initializer ``name`` replaced by ``change(array)``."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    t = next(x for x in m.graph.initializer if x.name == name)
    new = np.ascontiguousarray(change(numpy_helper.to_array(t)))
    t.CopyFrom(numpy_helper.from_array(new, name))
    onnx.save(m, str(dst))
    return dst


def small_graph(path: Path, *, batch: int | str = 1, inits_as_inputs: bool = False,
                scopes: bool = False, two_inputs: bool = False, domain_op: bool = False,
                seed: int = 0) -> Path:
    """Conv -> BatchNormalization -> Relu -> MaxPool (-> Add of a second input), 3x8x8 input.

    ``inits_as_inputs``: every initializer listed among the graph inputs too (old exporters);
    ``scopes``: dynamo-style ``pkg.torch.onnx.name_scopes`` metadata on each node;
    ``domain_op``: one node of an op no runtime implements.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = [numpy_helper.from_array(a.astype(f32), n) for n, a in (
        ("conv.weight", rng.normal(0, 0.3, (4, 3, 3, 3))), ("conv.bias", rng.normal(0, 1, 4)),
        ("bn.weight", rng.uniform(0.5, 1.5, 4)), ("bn.bias", rng.normal(0, 1, 4)),
        ("bn.running_mean", rng.normal(0, 1, 4)), ("bn.running_var", rng.uniform(0.5, 2, 4)))]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv_node",
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"], ["b"], name="bn_node",
                         epsilon=1e-5),
        helper.make_node("Relu", ["b"], ["r"], name="relu_node"),
        helper.make_node("MaxPool", ["r"], ["y"], name="pool_node", kernel_shape=[2, 2],
                         strides=[2, 2]),
    ]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])]
    if two_inputs:
        nodes.append(helper.make_node("Add", ["y", "z"], ["out"], name="add_node"))
        ins.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 4, 4, 4]))
    if domain_op:
        nodes.append(helper.make_node("Mystery", [nodes[-1].output[0]], ["m"],
                                      name="mystery_node", domain="com.example"))
    if scopes:
        for n, scope in zip(nodes, (["", "features", "features.0", "conv2d"],
                                    ["", "features", "features.1", "batch_norm"],
                                    ["", "features", "features.2", "relu"],
                                    ["", "features", "features.3", "max_pool2d"]), strict=False):
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scope))
    if inits_as_inputs:
        ins += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
                for t in inits]
    last = nodes[-1].output[0]
    out = helper.make_tensor_value_info(last, TensorProto.FLOAT, [batch, 4, 4, 4])
    opsets = [helper.make_opsetid("", 17)] + (
        [helper.make_opsetid("com.example", 1)] if domain_op else [])
    model = helper.make_model(helper.make_graph(nodes, "small", ins, [out], inits),
                              opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def torch_small(seed: int = 0):
    """The torch module ``small_graph`` stands for (same weights; module paths ``features.0``,
    ... as in the dynamo-style scopes)."""
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                          nn.ReLU(), nn.MaxPool2d(2, 2))

        def forward(self, x):
            return self.features(x)

    model = Small()
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 0.3, (4, 3, 3, 3)), rng.normal(0, 1, 4), rng.uniform(0.5, 1.5, 4),
              rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)]
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():
        for t, a in zip((conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                         bn.running_var), arrays, strict=True):
            t.copy_(torch.as_tensor(a, dtype=torch.float32))
    return model.eval()

"""Caffe's ResNet-50 (KaimingHe), built in code, and its conversion to the torch port.

- :func:`resnet50_prototxt`: the deploy definition, byte for byte the layout of KaimingHe's
  ``ResNet-50-deploy.prototxt`` (legacy ``input_dim`` header, tab indentation, same layer
  names and order), so nothing from the corpus has to ship with the package;
- :func:`resnet50_weights`: weights with realistic BatchNorm statistics: each BatchNorm's
  mean/variance is measured on the layer's actual input for the demo input (one engine pass),
  then stored the way Caffe stores moving averages: multiplied by the scale factor ``s``, with
  ``s`` itself as the third blob;
- :func:`write_caffemodel`: a V2 ``.caffemodel`` written directly from NumPy buffers;
- :func:`load_resnet50_from_caffe`: the weight conversion a porter writes; ``divide_bn=False``
  is the classic bug (running statistics copied without dividing by ``s``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerdiff.caffe.net import CaffeNet

#: Caffe's BatchNorm moving-average scale factor after training (the third blob).
BN_FACTOR = 999.98236084
#: Bottleneck stages: (stage number, blocks, bottleneck width).
STAGES = ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512))


# -- the deploy prototxt --------------------------------------------------------------------
def _layer(bottoms: list[str], top: str, name: str, type_: str, param: str = "",
           fields: tuple[tuple[str, object], ...] = ()) -> str:
    lines = ["layer {"]
    lines += [f'\tbottom: "{b}"' for b in bottoms]
    lines += [f'\ttop: "{top}"', f'\tname: "{name}"', f'\ttype: "{type_}"']
    if param:
        lines.append(f"\t{param} {{")
        lines += [f"\t\t{k}: {v}" for k, v in fields]
        lines.append("\t}")
    return "\n".join(lines) + "\n}\n"


def _conv_bn(bottom: str, top: str, bn: str, scale: str, out: int, k: int, pad: int,
             stride: int, relu: bool) -> list[str]:
    """Convolution (no bias) + BatchNorm + Scale (+ ReLU), all in place on ``top``."""
    layers = [
        _layer([bottom], top, top, "Convolution", "convolution_param",
               (("num_output", out), ("kernel_size", k), ("pad", pad), ("stride", stride),
                ("bias_term", "false"))),
        _layer([top], top, bn, "BatchNorm", "batch_norm_param", (("use_global_stats", "true"),)),
        _layer([top], top, scale, "Scale", "scale_param", (("bias_term", "true"),)),
    ]
    if relu:
        layers.append(_layer([top], top, f"{top}_relu", "ReLU"))
    return layers


def resnet50_prototxt(size: int = 224) -> str:
    """KaimingHe's ResNet-50 deploy prototxt (``size`` x ``size`` input)."""
    head = (f'name: "ResNet-50"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\n'
            f"input_dim: {size}\ninput_dim: {size}\n")
    layers = [
        _layer(["data"], "conv1", "conv1", "Convolution", "convolution_param",
               (("num_output", 64), ("kernel_size", 7), ("pad", 3), ("stride", 2))),
        _layer(["conv1"], "conv1", "bn_conv1", "BatchNorm", "batch_norm_param",
               (("use_global_stats", "true"),)),
        _layer(["conv1"], "conv1", "scale_conv1", "Scale", "scale_param",
               (("bias_term", "true"),)),
        _layer(["conv1"], "conv1", "conv1_relu", "ReLU"),
        _layer(["conv1"], "pool1", "pool1", "Pooling", "pooling_param",
               (("kernel_size", 3), ("stride", 2), ("pool", "MAX"))),
    ]
    prev = "pool1"
    for stage, blocks, width in STAGES:
        for b in range(blocks):
            blk = f"{stage}{'abcdef'[b]}"
            stride = 2 if b == 0 and stage > 2 else 1
            if b == 0:  # projection shortcut; the stride sits in the 1x1 convs
                layers += _conv_bn(prev, f"res{blk}_branch1", f"bn{blk}_branch1",
                                   f"scale{blk}_branch1", width * 4, 1, 0, stride, False)
                shortcut = f"res{blk}_branch1"
            else:
                shortcut = prev
            a, bb, c = (f"res{blk}_branch2{x}" for x in "abc")
            layers += _conv_bn(prev, a, f"bn{blk}_branch2a", f"scale{blk}_branch2a", width,
                               1, 0, stride, True)
            layers += _conv_bn(a, bb, f"bn{blk}_branch2b", f"scale{blk}_branch2b", width,
                               3, 1, 1, True)
            layers += _conv_bn(bb, c, f"bn{blk}_branch2c", f"scale{blk}_branch2c", width * 4,
                               1, 0, 1, False)
            layers.append(_layer([shortcut, c], f"res{blk}", f"res{blk}", "Eltwise"))
            layers.append(_layer([f"res{blk}"], f"res{blk}", f"res{blk}_relu", "ReLU"))
            prev = f"res{blk}"
    layers += [
        _layer([prev], "pool5", "pool5", "Pooling", "pooling_param",
               (("kernel_size", 7), ("stride", 1), ("pool", "AVE"))),
        _layer(["pool5"], "fc1000", "fc1000", "InnerProduct", "inner_product_param",
               (("num_output", 1000),)),
        _layer(["fc1000"], "prob", "prob", "Softmax"),
    ]
    return head + "\n" + "\n".join(layers) + "\n"


# -- weights --------------------------------------------------------------------------------
def resnet50_weights(net: CaffeNet, data: np.ndarray, seed: int = 0,
                     bn_factor: float = BN_FACTOR) -> dict[str, list[np.ndarray]]:
    """Generate every blob of ``net`` and attach it; returns ``{layer: [float32 blobs]}``.

    Convolution/InnerProduct weights are He-normal, Scale ``U(0.5, 1.5)`` / ``N(0, 0.2)``.
    BatchNorm statistics come from one float32 engine pass on ``data``: each BatchNorm sees
    its real input, so activations stay in a trained network's range at every depth (random
    statistics would blow them up or flatten them within a few blocks).
    """
    from layerdiff.caffe.weights import RawBlob
    from layerdiff.engine import make_plan

    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    # The plan of the bare net gives every expected blob shape (no weights needed).
    for p in make_plan(net, {"data": tuple(data.shape)}).layers:
        shapes, kind = p.expected_blobs, p.layer.type
        if kind in ("Convolution", "InnerProduct"):
            fan_in = int(np.prod(shapes[0][1:]))
            blobs = [rng.standard_normal(shapes[0], np.float32)
                     * np.float32(np.sqrt(2.0 / fan_in))]
            blobs += [rng.normal(0, 0.1, s).astype(np.float32) for s in shapes[1:]]
        elif kind == "Scale":
            blobs = [rng.uniform(0.5, 1.5, shapes[0]).astype(np.float32),
                     rng.normal(0, 0.2, shapes[1]).astype(np.float32)]
        elif kind == "BatchNorm":  # placeholders, measured below
            blobs = [np.zeros(shapes[0], np.float32), np.ones(shapes[1], np.float32),
                     np.array([bn_factor], np.float32)]
        else:
            continue
        out[p.layer.name] = blobs
        p.layer.blobs = [RawBlob(b.reshape(-1), b.shape, False) for b in blobs]

    plan = make_plan(net, {"data": tuple(data.shape)})
    values: dict[str, np.ndarray] = {"data": np.asarray(data, np.float32)}
    for p in plan.layers:
        lay = p.layer
        if lay.type == "Input":
            continue
        bottoms = [values[b] for b in lay.bottoms]
        if lay.type == "BatchNorm":
            x = bottoms[0].astype(np.float64)
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            # p.blobs are views of the RawBlob buffers: this writes the caffemodel's values.
            p.blobs[0][...] = (mean * bn_factor).astype(np.float32)
            p.blobs[1][...] = (var * bn_factor).astype(np.float32)
        (values[lay.tops[0]],) = p.impl.forward(bottoms, p.blobs or [])
    return out


def write_caffemodel(path: str | Path, weights: dict[str, list[np.ndarray]],
                     types: dict[str, str], name: str = "ResNet-50") -> Path:
    """Write ``{layer: blobs}`` as a V2 caffemodel (NetParameter.layer[].blobs[]).

    Encoded by hand from the arrays' bytes (packed float32 ``data``): serialising 25M floats
    through protobuf's Python lists would take seconds.
    """
    def head(num: int, size: int) -> bytes:  # tag + length of a length-delimited field
        return _varint(num << 3 | 2) + _varint(size)

    def field(num: int, payload: bytes) -> bytes:
        return head(num, len(payload)) + payload

    # Lists of chunks, so each array's bytes are copied once (into the file).
    chunks: list[bytes | memoryview] = [field(1, name.encode())]
    for lname, blobs in weights.items():
        body: list[bytes | memoryview] = [field(1, lname.encode()),
                                          field(2, types[lname].encode())]
        for arr in blobs:
            shape = field(7, field(1, b"".join(_varint(int(d)) for d in arr.shape)))
            data = memoryview(np.ascontiguousarray(arr, "<f4")).cast("B")
            blob = [shape, head(5, data.nbytes), data]
            body += [head(7, sum(len(c) for c in blob)), *blob]
        chunks += [head(100, sum(len(c) for c in body)), *body]
    path = Path(path)
    with open(path, "wb") as fh:
        fh.writelines(chunks)
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


# -- the torch port's weight conversion -----------------------------------------------------
def resnet50_name_map() -> dict[str, str]:
    """Caffe ResNet-50 layer name -> torchvision-style module path (conv/bn; Scale -> bn)."""
    m = {"conv1": "conv1", "bn_conv1": "bn1", "scale_conv1": "bn1", "fc1000": "fc"}
    for stage, blocks, _ in STAGES:
        for b in range(blocks):
            letter = "abcdef"[b]
            base = f"layer{stage - 1}.{b}"
            for branch, idx in (("2a", 1), ("2b", 2), ("2c", 3)):
                m[f"res{stage}{letter}_branch{branch}"] = f"{base}.conv{idx}"
                m[f"bn{stage}{letter}_branch{branch}"] = f"{base}.bn{idx}"
                m[f"scale{stage}{letter}_branch{branch}"] = f"{base}.bn{idx}"
            if b == 0:
                m[f"res{stage}a_branch1"] = f"{base}.downsample.0"
                m[f"bn{stage}a_branch1"] = f"{base}.downsample.1"
                m[f"scale{stage}a_branch1"] = f"{base}.downsample.1"
    return m


def resnet50_state_dict(net: CaffeNet, divide_bn: bool = True) -> dict:
    """The torch port's ``state_dict`` from ``net``'s blobs: the weight converter a porter writes.

    ``divide_bn=False`` is the classic bug: BatchNorm running statistics copied from the
    caffemodel without dividing by the moving-average scale factor (the third blob).
    """
    import torch

    from layerdiff.engine import make_plan

    def t(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    plan = {p.layer.name: p for p in make_plan(net).layers}
    sd: dict[str, torch.Tensor] = {}
    for caffe_name, path in resnet50_name_map().items():
        p = plan[caffe_name]
        blobs = p.blobs
        if p.layer.type in ("Convolution", "InnerProduct"):
            sd[f"{path}.weight"] = t(blobs[0])
            if len(blobs) > 1:
                sd[f"{path}.bias"] = t(blobs[1])
        elif p.layer.type == "BatchNorm":
            s = float(np.asarray(blobs[2]).reshape(-1)[0])
            f = (0.0 if s == 0 else 1.0 / s) if divide_bn else 1.0
            sd[f"{path}.running_mean"] = t(np.asarray(blobs[0], np.float64) * f)
            sd[f"{path}.running_var"] = t(np.asarray(blobs[1], np.float64) * f)
            sd[f"{path}.num_batches_tracked"] = torch.tensor(0)
        elif p.layer.type == "Scale":  # merged into the BatchNorm2d's affine parameters
            sd[f"{path}.weight"], sd[f"{path}.bias"] = t(blobs[0]), t(blobs[1])
    return sd


def load_resnet50_from_caffe(net: CaffeNet, divide_bn: bool = True):
    """A :class:`CaffeResNet50` holding ``net``'s weights (see :func:`resnet50_state_dict`)."""
    from layerdiff.demo.torch_resnet50 import CaffeResNet50

    model = CaffeResNet50().eval()
    model.load_state_dict(resnet50_state_dict(net, divide_bn))
    eps = {lay.name: lay.param.batch_norm_param.eps for lay in net.layers
           if lay.type == "BatchNorm"}
    mods = dict(model.named_modules())
    for caffe_name, path in resnet50_name_map().items():
        if caffe_name in eps:
            mods[path].eps = eps[caffe_name]
    return model

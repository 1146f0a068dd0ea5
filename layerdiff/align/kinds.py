"""Op equivalence across frameworks, kept as data (not matcher code).

Each record kind (a Caffe type, a torch module class or a torch op name) maps to one or more
canonical op families; two records can be paired when their families intersect.
"""

from __future__ import annotations

FAMILIES: dict[str, set[str]] = {
    "conv": {"Convolution", "ConvolutionDepthwise", "DepthwiseConvolution", "Conv1d", "Conv2d",
             "Conv3d", "conv1d", "conv2d", "conv3d"},
    "deconv": {"Deconvolution", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
               "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"},
    "linear": {"InnerProduct", "Linear", "linear", "addmm", "matmul", "mm"},
    "batchnorm": {"BatchNorm", "BN", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm",
                  "FrozenBatchNorm2d"},
    "affine": {"Scale", "Bias"},
    "relu": {"ReLU", "relu", "relu_", "LeakyReLU", "leaky_relu", "leaky_relu_", "ReLU6",
             "relu6", "hardtanh", "Hardtanh"},
    "prelu": {"PReLU", "prelu"},
    "elu": {"ELU", "elu", "elu_"},
    "sigmoid": {"Sigmoid", "sigmoid", "sigmoid_"},
    "tanh": {"TanH", "Tanh", "tanh", "tanh_"},
    "swish": {"Swish", "SiLU", "silu"},
    "abs": {"AbsVal", "abs"},
    "clip": {"Clip", "clamp", "clip", "Hardtanh", "hardtanh", "ReLU6", "relu6"},
    "pool": {"Pooling", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d",
             "AvgPool3d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "max_pool2d", "avg_pool2d",
             "adaptive_avg_pool2d", "adaptive_max_pool2d",
             # reductions over H, W written in forward (x.mean((2, 3)), x.amax((2, 3)), ...)
             "mean", "amax", "max"},
    "pad": {"pad", "ZeroPad2d", "ConstantPad2d", "ConstantPad1d", "ZeroPad1d"},
    "eltwise": {"Eltwise", "Axpy", "add", "add_", "iadd", "mul", "mul_", "maximum", "max",
                "sub"},
    "concat": {"Concat", "cat", "concat", "stack"},
    "reshape": {"Flatten", "Reshape", "flatten", "view", "reshape", "Unflatten",
                "squeeze", "unsqueeze"},
    "softmax": {"Softmax", "softmax", "Softmax2d", "LogSoftmax", "log_softmax"},
    "dropout": {"Dropout", "dropout", "Dropout2d", "dropout2d"},
    "lrn": {"LRN", "LocalResponseNorm", "local_response_norm"},
    "normalize": {"Normalize", "MVN", "normalize", "LayerNorm", "layer_norm", "GroupNorm",
                  "InstanceNorm2d", "instance_norm"},
    "resize": {"Interp", "Upsample", "interpolate", "upsample", "UpsamplingBilinear2d",
               "UpsamplingNearest2d", "upsample_bilinear2d", "upsample_nearest2d"},
    "permute": {"Permute", "permute", "transpose", "ShuffleChannel", "channel_shuffle",
                "ChannelShuffle"},
    "slice": {"Slice", "split", "chunk", "narrow", "getitem", "__getitem__"},
    "power": {"Power", "Exp", "Log", "pow", "exp", "log", "sqrt", "rsqrt"},
}

#: Functional reductions that are a pooling only when they do a global pooling's work: the
#: reference output is (N, C, 1, 1) and theirs has as many values (``x.amax((2, 3))``), not a
#: scalar or a channel mean (``x / x.amax()``).
GLOBAL_POOL_ONLY = {"mean", "amax", "max"}

#: ONNX op types (onnxruntime's records of an .onnx graph), joined to the families above.
ONNX_FAMILIES: dict[str, set[str]] = {
    "conv": {"Conv", "FusedConv"},  # FusedConv: onnxruntime's conv + activation
    "deconv": {"ConvTranspose"},
    "linear": {"Gemm", "MatMul"},
    "batchnorm": {"BatchNormalization"},
    "relu": {"Relu", "LeakyRelu"},
    "prelu": {"PRelu"},
    "elu": {"Elu"},
    "sigmoid": {"Sigmoid"},
    "tanh": {"Tanh"},
    "swish": {"HardSwish"},
    "abs": {"Abs"},
    "clip": {"Clip"},
    "pool": {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"},
    "eltwise": {"Add", "Mul", "Sub", "Max", "Sum"},
    "concat": {"Concat"},
    "reshape": {"Flatten", "Reshape", "Squeeze", "Unsqueeze"},
    "softmax": {"Softmax", "LogSoftmax"},
    "dropout": {"Dropout"},
    "lrn": {"LRN"},
    "normalize": {"LpNormalization", "InstanceNormalization", "LayerNormalization",
                  "GroupNormalization", "MeanVarianceNormalization"},
    "resize": {"Resize", "Upsample"},
    "permute": {"Transpose"},
    "slice": {"Slice", "Split"},
    "power": {"Pow", "Exp", "Log", "Sqrt"},
}
for _fam, _kinds in ONNX_FAMILIES.items():
    FAMILIES[_fam] = FAMILIES[_fam] | _kinds

#: Records that only route data: never aligned, never reported as unaligned.
PASSTHROUGH = {"Input", "Split", "Silence", "contiguous", "clone", "detach", "to", "Identity",
               "identity", "size", "Cast"}

_BY_KIND: dict[str, set[str]] = {}
for _fam, _kinds in FAMILIES.items():
    for _k in _kinds:
        _BY_KIND.setdefault(_k, set()).add(_fam)


def families(kind: str) -> set[str]:
    """Canonical op families of a record kind (empty when unknown)."""
    return _BY_KIND.get(kind, set())


def compatible(a: str, b: str) -> bool:
    """Whether records of kinds ``a`` and ``b`` may compute the same thing."""
    return a == b or bool(families(a) & families(b))


# Known groups: several records on one side that do the work of one record on the other.
# The aligner extends a matched pair with the unmatched records next to it when the pattern fits;
# the group is compared on the output of its last record.
# Families a BatchNorm is folded into. A group that folds one is checked against the outputs:
# when the pair agrees without the BatchNorm and disagrees with it, the port inserted or left
# out that BatchNorm, and the group is not formed.
FOLD_TARGETS = {"conv", "linear"}
# REF_GROUPS: (reference kinds in execution order on one blob, candidate families, description).
REF_GROUPS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("BatchNorm", "Scale"), ("batchnorm",), "Caffe BatchNorm + Scale = one BatchNorm"),
    (("Convolution", "BatchNorm", "Scale"), ("conv",), "BatchNorm + Scale folded into the conv"),
    (("Convolution", "BatchNorm"), ("conv",), "BatchNorm folded into the conv"),
    (("InnerProduct", "BatchNorm", "Scale"), ("linear",), "BatchNorm folded into the linear"),
    (("InnerProduct", "BatchNorm"), ("linear",), "BatchNorm folded into the linear"),
    # torch or unfolded ONNX against an ONNX export whose constant folding merged the BN
    (("Conv2d", "BatchNorm2d"), ("conv",), "BatchNorm folded into the conv (ONNX export)"),
    # onnxruntime's optimized graph against the file's own
    (("Conv", "BatchNormalization", "Relu"), ("conv",), "BatchNorm and ReLU fused into the conv"),
    (("Conv", "BatchNormalization"), ("conv",), "BatchNorm folded into the conv"),
    (("Conv", "Relu"), ("conv",), "ReLU fused into the conv"),
]
# CAND_GROUPS: (candidate families in execution order on one blob, reference families,
# description). The first candidate record whose family is among the reference families is the
# one already paired; the others join it. Longest patterns first.
CAND_GROUPS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("pad", "conv", "batchnorm"), ("conv",),
     "explicit padding + conv + BatchNorm = one conv with pad and BatchNorm folded in"),
    (("pad", "conv"), ("conv",), "explicit padding = the conv's pad"),
    (("conv", "batchnorm"), ("conv",), "BatchNorm folded into the conv"),
    (("pad", "pool"), ("pool",), "explicit padding = the pooling's pad"),
    (("reshape", "linear", "batchnorm"), ("linear",),
     "InnerProduct = flatten + Linear, BatchNorm folded in"),
    (("reshape", "linear"), ("linear",), "InnerProduct = flatten + Linear"),
    (("linear", "batchnorm"), ("linear",), "BatchNorm folded into the linear"),
]

# A reference record whose work the candidate splits over several records *after* the aligned
# one: (reference kind, candidate kinds in order, description). The group is compared on the
# output of its last candidate record.
CAND_TAIL_GROUPS: list[tuple[str, tuple[str, ...], str]] = [
    ("Scale", ("Mul", "Add"), "Caffe Scale = ONNX Mul + Add"),
]

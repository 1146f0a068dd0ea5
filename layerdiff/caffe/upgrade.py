"""Upgrade V1 ``layers {}`` definitions (enum types) to the V2 ``layer {}`` form."""

from __future__ import annotations

from pathlib import Path

from layerdiff.caffe import caffe_pb2
from layerdiff.errors import ModelFormatError

# V1 enum name -> V2 type string (Caffe's UpgradeV1LayerType table).
V1_TYPE_NAMES: dict[str, str] = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

_V1_ENUM = caffe_pb2.V1LayerParameter.LayerType


def v1_type_string(value: int | str) -> str:
    """V2 type string for a V1 enum value (number, or its name)."""
    name = _V1_ENUM.Name(int(value)) if str(value).isdigit() else str(value)
    return V1_TYPE_NAMES.get(name, name)


_COPIED = ("bottom", "top", "name", "include", "exclude", "loss_weight", "blobs")


def upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter, path: Path) -> caffe_pb2.LayerParameter:
    """Return the V2 ``LayerParameter`` equivalent of one V1 layer definition."""
    if v1.HasField("layer"):
        raise ModelFormatError(f"{path}: layer '{v1.name}': V0 layer definitions are not supported")
    lp = caffe_pb2.LayerParameter()
    lp.name = v1.name
    lp.type = v1_type_string(v1.type)
    lp.bottom.extend(v1.bottom)
    lp.top.extend(v1.top)
    lp.include.extend(v1.include)
    lp.exclude.extend(v1.exclude)
    lp.loss_weight.extend(v1.loss_weight)
    lp.blobs.extend(v1.blobs)
    v2_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for fd, value in v1.ListFields():
        if fd.name in _COPIED or not fd.name.endswith("_param"):
            continue
        if fd.name in v2_fields:
            getattr(lp, fd.name).CopyFrom(value)
    return lp

"""The Caffe reader: every corpus model, every input form, V1 upgrade, weights matching."""

from __future__ import annotations

import numpy as np
import pytest
from golden import CORPUS, require_shared

from layerdiff.caffe import load_caffe
from layerdiff.caffe.weights import read_caffemodel
from layerdiff.engine import make_plan

# Train/test prototxts read data from files: their input shape comes from --shape.
DATA_LAYER_SHAPES = {
    "cifar10_resnet20_junyuseu": (1, 3, 32, 32),
    "cifar10_se_resnet20_lijianfei": (1, 3, 32, 32),
}


def _corpus_models():
    if not CORPUS.is_dir():
        return [pytest.param(None, id="no-shared-data")]
    return [pytest.param(d, id=d.name) for d in sorted(CORPUS.iterdir()) if d.is_dir()]


@pytest.mark.parametrize("model", _corpus_models())
def test_corpus_model_loads_and_plans(model):
    require_shared()
    protos = sorted(model.glob("*.prototxt"))
    assert protos, f"{model} has no prototxt"
    net = load_caffe(model, shape=DATA_LAYER_SHAPES.get(model.name))
    assert net.layers and net.inputs
    plan = make_plan(net)  # every type known, every shape inferred, every blob checked
    assert all(p.top_shapes is not None for p in plan.layers)
    caffemodels = list(model.glob("*.caffemodel"))
    if caffemodels:
        assert net.weights == caffemodels[0]
        with_blobs = [p for p in plan.layers if p.expected_blobs]
        assert with_blobs and all(p.blobs is not None for p in with_blobs), \
            f"layers without weights: {[p.layer.name for p in with_blobs if p.blobs is None]}"
        for p in with_blobs:
            assert [b.shape for b in p.blobs] == p.expected_blobs


def test_v1_caffemodel_loads_under_v1_and_v2_prototxts():
    require_shared()
    d = CORPUS / "cifar10_quick_v1"
    weights = d / "cifar10_quick_iter_5000.caffemodel"
    stored = read_caffemodel(weights)
    assert all(w.v1 for w in stored), "cifar10_quick is a V1 caffemodel"
    legacy = [b for w in stored for b in w.blobs]
    assert legacy and all(b.legacy and len(b.shape) == 4 for b in legacy)
    nets = [load_caffe(prototxt=d / name, weights=weights)
            for name in ("deploy.prototxt", "cifar10_quick_v2_head.prototxt")]
    assert nets[0].upgraded_v1 and not nets[1].upgraded_v1
    plans = [make_plan(n) for n in nets]
    for a, b in zip(plans[0].layers, plans[1].layers, strict=True):
        assert a.layer.type == b.layer.type
        assert a.top_shapes == b.top_shapes
        for x, y in zip(a.blobs or [], b.blobs or [], strict=True):
            assert x.shape == y.shape and np.array_equal(x, y)
    ip = next(p for p in plans[0].layers if p.layer.type == "InnerProduct")
    assert ip.layer.blobs[0].shape[:2] == (1, 1)  # legacy 1x1xOUTxIN in the file
    assert len(ip.blobs[0].shape) == 2 and ip.blobs[1].ndim == 1  # reshaped for the engine


def test_mtcnn_det2_extra_weights_ignored_with_note():
    require_shared()
    net = load_caffe(CORPUS / "mtcnn_det2")
    assert net.unused_weights == ["conv5-3"]
    assert any("conv5-3" in n for n in net.notes)


def test_train_test_prototxt_needs_shape_and_drops_loss():
    require_shared()
    d = CORPUS / "cifar10_resnet20_junyuseu"
    from layerdiff.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="--shape"):
        load_caffe(d)
    net = load_caffe(d, shape=(2, 3, 32, 32))
    assert list(net.inputs.values()) == [(2, 3, 32, 32)]
    types = {lay.type for lay in net.layers}
    assert "SoftmaxWithLoss" not in types and "Accuracy" not in types and "Data" not in types
    assert any("dropped" in n for n in net.notes)
    assert all(len(lay.tops) == 1 for lay in net.layers if lay.type == "Input")  # label dropped


def _write(tmp_path, text, name="deploy.prototxt"):
    p = tmp_path / name
    p.write_text(text)
    return p


CONV = ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
        'convolution_param { num_output: 2 kernel_size: 3 } }\n')


@pytest.mark.parametrize("header, shape", [
    ('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 9\n', (1, 3, 8, 9)),
    ('input: "data"\ninput_shape { dim: 2 dim: 3 dim: 5 dim: 6 }\n', (2, 3, 5, 6)),
    ('layer { name: "in" type: "Input" top: "data" '
     'input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n', (1, 3, 4, 4)),
])
def test_input_forms(tmp_path, header, shape):
    net = load_caffe(_write(tmp_path, header + CONV))
    assert net.inputs == {"data": shape}
    assert net.layers[0].type == "Input"
    plan = make_plan(net)
    assert plan.layers[1].top_shapes == [(shape[0], 2, shape[2] - 2, shape[3] - 2)]
    override = load_caffe(_write(tmp_path, header + CONV), shape=(1, 3, 10, 10))
    assert override.inputs == {"data": (1, 3, 10, 10)}


def test_v1_prototxt_upgrade(tmp_path):
    text = ('input: "data"\ninput_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4\n'
            'layers { name: "r" type: RELU bottom: "data" top: "r" }\n'
            'layers { name: "p" type: POOLING bottom: "r" top: "p" '
            'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
    net = load_caffe(_write(tmp_path, text))
    assert [lay.type for lay in net.layers] == ["Input", "ReLU", "Pooling"]
    assert net.layers[2].param.pooling_param.kernel_size == 2


def test_phase_rules(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n' + CONV +
            'layer { name: "t" type: "ReLU" bottom: "c" top: "t" include { phase: TRAIN } }\n'
            'layer { name: "e" type: "ReLU" bottom: "c" top: "e" exclude { phase: TEST } }\n'
            'layer { name: "k" type: "ReLU" bottom: "c" top: "k" include { phase: TEST } }\n')
    net = load_caffe(_write(tmp_path, text))
    assert [lay.name for lay in net.layers] == ["in", "c", "k"]


def test_directory_prefers_deploy(tmp_path):
    _write(tmp_path, 'input: "data"\ninput_dim: 1 input_dim: 1 input_dim: 2 input_dim: 2\n',
           "my_deploy.prototxt")
    _write(tmp_path, "name: 'other'\n", "train_val.prototxt")
    net = load_caffe(tmp_path)
    assert net.prototxt.name == "my_deploy.prototxt"

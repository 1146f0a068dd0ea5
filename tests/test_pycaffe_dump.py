"""The shipped pycaffe dump script, run against a stand-in for pycaffe's Net.

The stand-in keeps pycaffe's blob semantics (one array per blob name, in-place layers write
over it, ``forward(start, end)`` runs a range of layers) with the engine doing the arithmetic,
so the test checks that the script records every in-place step and writes a trace that
``Trace.load`` and ``compare`` accept.
"""

from __future__ import annotations

import numpy as np

import layerdiff
from layerdiff.cli import main
from layerdiff.engine import make_plan
from layerdiff.tools.pycaffe_dump import dump
from layerdiff.trace import Trace


class _Blob:
    def __init__(self, shape):
        self.data = np.zeros(shape, np.float32)

    def reshape(self, *shape):
        self.data = np.zeros(shape, np.float32)


class _Layer:
    def __init__(self, type_):
        self.type = type_


class FakeNet:
    """pycaffe.Net's surface used by the script, computing with layerdiff's engine."""

    def __init__(self, caffe_net):
        self._plan = make_plan(caffe_net)
        self._layer_names = [p.layer.name for p in self._plan.layers]
        self.layers = [_Layer(p.layer.type) for p in self._plan.layers]
        self.top_names = {p.layer.name: p.layer.tops for p in self._plan.layers}
        self.bottom_names = {p.layer.name: p.layer.bottoms for p in self._plan.layers}
        self.inputs = list(caffe_net.inputs)
        self.blobs = {}
        for p in self._plan.layers:
            for t, s in zip(p.layer.tops, p.top_shapes, strict=True):
                self.blobs.setdefault(t, _Blob(s))

    def forward(self, start, end):
        i, j = self._layer_names.index(start), self._layer_names.index(end)
        for p in self._plan.layers[i:j + 1]:
            outs = p.impl.forward([self.blobs[b].data.copy() for b in p.layer.bottoms], p.blobs)
            for t, o in zip(p.layer.tops, outs, strict=True):
                self.blobs[t].data[...] = o  # in place, like Caffe


def test_dump_records_in_place_steps_and_compares(example_dir, tmp_path):
    net = layerdiff.load_caffe(example_dir)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    out = tmp_path / "pycaffe.npz"
    n = dump(FakeNet(net), {"data": x}, str(out))
    trace = Trace.load(out)
    assert n == len(trace) == 18
    conv, bn = trace["conv1"].output, trace["bn_conv1"].output
    assert not np.array_equal(conv, bn), "the conv output was overwritten by BatchNorm"
    report = layerdiff.compare(out, example_dir, {"data": x})
    assert report and len(report.results) == 17


def test_cli_prints_the_script(capsys):
    assert main(["pycaffe-script"]) == 0
    text = capsys.readouterr().out
    assert "def dump(net, inputs, out_path)" in text and "import caffe" in text

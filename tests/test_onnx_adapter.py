"""The ONNX adapter on small hand-built graphs: records, parameters, inputs, exporter paths,
the optimized graph, the node re-run handle, inspect/run/--save."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx_ports import require_onnx, small_graph, torch_small

require_onnx()

from layerdiff.adapters.onnx import capture_onnx, load_onnx, resolve_shapes  # noqa: E402
from layerdiff.adapters.onnx_load import exporter_module_paths  # noqa: E402

import layerdiff  # noqa: E402
from layerdiff.align import align  # noqa: E402
from layerdiff.cli import main  # noqa: E402
from layerdiff.trace import Trace  # noqa: E402


def _x(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 8, 8)).astype(np.float32)


def _reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch_small(seed)(torch.from_numpy(x)).numpy()


def test_one_record_per_node_with_roles_and_values(tmp_path):
    model = load_onnx(small_graph(tmp_path / "m.onnx"))
    x = _x()
    trace = capture_onnx(model, {"x": x})
    assert [r.kind for r in trace] == ["Conv", "BatchNormalization", "Relu", "MaxPool"]
    conv, bn = trace["conv_node"], trace["bn_node"]
    assert conv.bottoms == ["x"] and conv.tops == ["c"] and bn.bottoms == ["c"]
    assert set(bn.params) == {"weight", "bias", "running_mean", "running_var"}
    assert bn.attrs["initializers"]["running_var"] == "bn.running_var"
    assert bn.attrs["onnx_attrs"]["epsilon"] == pytest.approx(1e-5)
    np.testing.assert_allclose(trace.records[-1].output, _reference(x), rtol=1e-5, atol=1e-6)
    assert trace.meta["framework"] == "onnx" and trace.meta["optimize"] == "none"


def test_handle_reruns_node_with_other_initializers_and_attributes(tmp_path):
    trace = capture_onnx(load_onnx(small_graph(tmp_path / "m.onnx")), {"x": _x()})
    bn = trace["bn_node"]
    c = trace["conv_node"].output
    np.testing.assert_array_equal(bn.handle.run(c)[0], bn.output)
    mean, var = bn.params["running_mean"], bn.params["running_var"]
    gamma, beta = bn.params["weight"], bn.params["bias"]
    shape = (1, -1, 1, 1)

    def expect(m, v, eps):
        return gamma.reshape(shape) * (c - m.reshape(shape)) / np.sqrt(
            v.reshape(shape) + eps) + beta.reshape(shape)

    got = bn.handle.with_params(running_mean=mean * 2)(c)
    np.testing.assert_allclose(got, expect(mean * 2, var, 1e-5), rtol=1e-5, atol=1e-5)
    got = bn.handle.with_attributes(epsilon=0.5)(c)
    np.testing.assert_allclose(got, expect(mean, var, 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.handle(c), bn.output)  # the original is unchanged


def test_initializers_listed_as_inputs_are_weights_and_warnings_silenced(tmp_path, capfd):
    model = load_onnx(small_graph(tmp_path / "m.onnx", inits_as_inputs=True))
    assert list(model.inputs) == ["x"]
    assert any("initializers are also listed as graph inputs" in n for n in model.notes)
    trace = capture_onnx(model, {"x": _x()})
    assert len(trace) == 4
    err = capfd.readouterr().err
    assert "initializer" not in err.lower(), err


def test_symbolic_batch_dim_and_shape_override(tmp_path):
    model = load_onnx(small_graph(tmp_path / "m.onnx", batch="N"))
    assert model.inputs["x"][0] == "N"
    assert resolve_shapes(model, None) == {"x": (1, 3, 8, 8)}
    assert resolve_shapes(model, {None: (2, 3, 8, 8)}) == {"x": (2, 3, 8, 8)}
    trace = layerdiff.compare(str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"),
                              {"x": _x(3)})
    assert trace and trace.results[0].metrics.ref_shape[0] == 3


def test_several_inputs_paired_by_name(tmp_path):
    a = small_graph(tmp_path / "a.onnx", two_inputs=True)
    x, z = _x(), np.random.default_rng(1).normal(size=(1, 4, 4, 4)).astype(np.float32)
    report = layerdiff.compare(str(a), str(a), {"z": z, "x": x})
    assert report, [(r.pair.ref_name, r.metrics.max_abs) for r in report.failures]
    assert set(report.candidate.inputs) == {"x", "z"}
    np.testing.assert_array_equal(report.candidate.inputs["z"], z)


def test_dynamo_name_scopes_align_with_torch_modules(tmp_path):
    model = load_onnx(small_graph(tmp_path / "m.onnx", scopes=True))
    paths = exporter_module_paths(model.proto)
    assert list(paths.values()) == ["features.0", "features.1", "features.2", "features.3"]
    x = _x()
    report = layerdiff.compare(torch_small(), str(tmp_path / "m.onnx"), {"x": x})
    assert report, [(r.pair.ref_name, r.metrics.max_abs) for r in report.failures]
    pairs = {p.ref_name: (p.cand_name, p.method) for p in report.alignment.pairs}
    assert pairs["features.0"] == ("conv_node", "normalized")
    assert pairs["features.1"] == ("bn_node", "normalized")


def test_torchscript_exporter_paths(tmp_path):
    from onnx import helper

    names = ["/conv1/Conv", "/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/relu/Relu",
             "/layer1/layer1.0/relu_1/Relu", "/layer1/layer1.0/Add", "/Flatten",
             "/head/conv_2/Conv", "/layer1/layer1.0/downsample/downsample.0/Conv"]
    nodes = [helper.make_node("Relu", ["a"], ["b"], name=n) for n in names]
    graph = helper.make_graph(nodes, "g", [], [])
    got = exporter_module_paths(helper.make_model(graph))
    assert list(got.values()) == ["conv1", "layer1.0.conv1", "layer1.0.relu", "layer1.0.relu",
                                  "layer1.0", "flatten", "head.conv_2",
                                  "layer1.0.downsample.0"]


def test_optimized_graph_runs_fewer_nodes_and_agrees(tmp_path):
    path = small_graph(tmp_path / "m.onnx")
    model = load_onnx(path)
    x = _x()
    plain = capture_onnx(model, {"x": x})
    opt = capture_onnx(model, {"x": x}, optimize="extended")
    assert len(opt) < len(plain)  # BatchNormalization folded into the conv, Relu fused
    assert "BatchNormalization" not in [r.kind for r in opt]
    np.testing.assert_allclose(opt.records[-1].output, plain.records[-1].output, rtol=1e-5,
                               atol=1e-5)


def test_cli_inspect_run_save_compare(tmp_path, capsys):
    path = small_graph(tmp_path / "m.onnx", batch="N")
    assert main(["inspect", str(path), "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    assert [n["op_type"] for n in ins["nodes"]] == ["Conv", "BatchNormalization", "Relu",
                                                    "MaxPool"]
    kinds = {t["kind"] for t in ins["traps"]}
    assert {"bn_epsilon", "pool_ceil_mode", "symbolic_dims"} <= kinds
    assert ins["nodes"][0]["output_shapes"] == [["N", 4, 8, 8]]
    assert main(["inspect", str(tmp_path)]) == 0  # the folder holding it
    assert "pool_ceil_mode" in capsys.readouterr().out
    save = tmp_path / "t.npz"
    assert main(["run", str(path), "--shape", "2,3,8,8", "--save", str(save)]) == 0
    trace = Trace.load(save)
    assert trace.meta["framework"] == "onnx" and trace["bn_node"].output.shape == (2, 4, 8, 8)
    assert "running_mean" in trace["bn_node"].params
    capsys.readouterr()
    assert main(["compare", str(path), str(path), "--onnx-optimize", "none",
                 "--cand-onnx-optimize", "extended", "--summary-only"]) == 0
    out = capsys.readouterr().out
    assert "agree" in out


def test_onnx_trace_aligns_with_saved_copy(tmp_path):
    path = small_graph(tmp_path / "m.onnx")
    trace = capture_onnx(load_onnx(path), {"x": _x()})
    trace.save(tmp_path / "t.npz")
    al = align(Trace.load(tmp_path / "t.npz"), trace)
    assert [p.method for p in al.pairs] == ["exact"] * 4


def test_file_bytes_plus_outputs_equal_reserialized_model(tmp_path):
    from dataclasses import replace

    model = load_onnx(small_graph(tmp_path / "m.onnx", inits_as_inputs=True))
    assert model.self_contained
    x = _x()
    fast = capture_onnx(model, {"x": x})
    slow = capture_onnx(replace(model, self_contained=False), {"x": x})
    assert fast.names() == slow.names()
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a.output, b.output)

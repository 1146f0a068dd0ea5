"""Torch adapter: loading every supported form safely, and capturing every layer's output."""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layerdiff.adapters.torch import capture_torch, input_shapes, load_torch
from torch import nn
from torch_models import (
    Bottleneck,
    DataDependent,
    ResNet,
    SmallNet,
    TwoInputs,
    randomize_bn,
    reference_resnet,
    resnet50,
)

from layerdiff.errors import LayerdiffError, ModelFormatError
from layerdiff.trace import Trace

PATHS = ["fx", "hooks"]


def _x(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _capture(model, x, path, **kw):
    trace = capture_torch(model, x, prefer_graph=(path == "fx"), **kw)
    assert trace.meta["capture"] == path
    return trace


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * max(1.0, float(np.abs(b).max()))


@pytest.fixture(scope="module")
def r50():
    return resnet50()


@pytest.fixture(scope="module")
def r50_x():
    return _x((1, 3, 64, 64))


@pytest.fixture(scope="module")
def r50_ref(r50, r50_x):
    return {k: v.numpy() for k, v in reference_resnet(r50, torch.from_numpy(r50_x)).items()}


# ---------------------------------------------------------------------------------------------
# capture: ResNet-50 against hand-written functional code


@pytest.mark.parametrize("path", PATHS)
def test_resnet50_every_layer_matches_functional_reference(r50, r50_x, r50_ref, path):
    trace = _capture(r50, r50_x, path)
    # exactly the layers the reference computes, in execution order
    assert trace.names() == list(r50_ref)
    kinds = {r.kind for r in trace}
    assert kinds == {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "add", "AdaptiveAvgPool2d",
                     "flatten", "Linear"}
    assert sum(r.kind == "Conv2d" for r in trace) == 53
    assert sum(r.kind == "ReLU" for r in trace) == 1 + 16 * 3
    for name, want in r50_ref.items():
        _close(trace[name].output, want)
    # the last record is the model's output
    _close(trace.records[-1].output, r50(torch.from_numpy(r50_x)).detach().numpy())


@pytest.mark.parametrize("path", PATHS)
def test_resnet50_shared_relu_calls_are_distinct_records(r50, r50_x, path):
    trace = _capture(r50, r50_x, path)
    calls = [trace[f"layer2.1.relu{s}"] for s in ("", "#1", "#2")]
    assert [r.attrs["module"] for r in calls] == ["layer2.1.relu"] * 3
    assert [r.attrs["call"] for r in calls] == [0, 1, 2]
    assert [r.bottoms for r in calls] == [["layer2.1.bn1"], ["layer2.1.bn2"], ["layer2.1.add"]]
    add = trace["layer2.1.add"]
    assert add.attrs["op"] == "add" and add.attrs["scope"] == "layer2.1"
    assert add.attrs.get("inplace") is True  # out += identity
    assert add.bottoms == ["layer2.1.bn3", "layer2.0.relu#2"]
    assert trace["layer2.0.add"].bottoms == ["layer2.0.bn3", "layer2.0.downsample.1"]
    assert trace["flatten"].bottoms == ["avgpool"] and trace["conv1"].bottoms == ["input"]


@pytest.mark.parametrize("path", PATHS)
def test_value_before_gives_each_layer_its_input(r50, r50_x, r50_ref, path):
    trace = _capture(r50, r50_x, path)
    for name in ("layer1.0.relu#1", "layer3.2.add", "fc", "layer1.0.conv1"):
        rec = trace[name]
        ins = trace.bottoms_of(rec)
        assert all(v is not None for v in ins)
        if name == "layer1.0.relu#1":
            # the in-place ReLU's input is the BN output before it was overwritten
            assert (ins[0] < 0).any()
            _close(ins[0], r50_ref["layer1.0.bn2"])
        if name == "layer3.2.add":
            _close(ins[0] + ins[1], rec.output)
    np.testing.assert_array_equal(trace.value_before("input", 0), r50_x)


@pytest.mark.parametrize("path", PATHS)
def test_inplace_relu_does_not_corrupt_conv_or_bn_record(path):
    class ConvReluInplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.relu(self.conv(x))  # in place on the conv output itself
            return self.relu(self.bn(self.conv2(y)))

    torch.manual_seed(0)
    m = randomize_bn(ConvReluInplace()).eval()
    x = _x((1, 3, 8, 8))
    trace = _capture(m, x, path)
    conv = F.conv2d(torch.from_numpy(x), m.conv.weight, m.conv.bias).detach().numpy()
    assert (conv < 0).any()  # the ReLU would visibly change it
    _close(trace["conv"].output, conv)
    assert (trace["bn"].output < 0).any()
    _close(trace["relu"].output, np.maximum(conv, 0))
    _close(trace["relu#1"].output, np.maximum(trace["bn"].output, 0))


class _Aliased(nn.Module):
    """Writes in place into a tensor that is read again later, by name or through a view."""

    def __init__(self, via_view: bool):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.via_view = via_view

    def forward(self, x):
        y = self.lin(x)
        later = y.view(-1) if self.via_view else y  # same memory either way
        y += 1.0
        y.relu_()
        return later * 2.0


@pytest.mark.parametrize("via_view", [False, True], ids=["alias", "view"])
@pytest.mark.parametrize("path", PATHS)
def test_inplace_writes_keep_eager_semantics(path, via_view):
    torch.manual_seed(0)
    m = _Aliased(via_view).eval()
    x = _x((2, 6))
    trace = _capture(m, x, path)
    lin = (torch.from_numpy(x) @ m.lin.weight.T + m.lin.bias).detach().numpy()
    after = np.maximum(lin + 1, 0)
    _close(trace["lin"].output, lin)
    _close(trace["add"].output, lin + 1)
    _close(trace["relu"].output, after)
    if via_view:
        _close(trace["view"].output, lin.reshape(-1))  # recorded before the writes
    # the later read sees the writes, as in eager mode, even on the fx path
    _close(trace["mul"].output, 2 * (after.reshape(-1) if via_view else after))
    _close(trace["mul"].output, m(torch.from_numpy(x)).detach().numpy())
    assert trace.meta["lazy_clones"] > 0


def test_unseen_inplace_write_triggers_eager_recapture():
    class SneakyScale(nn.Module):  # child-less, so fx treats it as one opaque leaf
        def forward(self, x):
            return x.mul_(2.0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = SneakyScale()

        def forward(self, x):
            return self.scale(self.lin(x))

    torch.manual_seed(0)
    m = Net().eval()
    x = _x((1, 4))
    trace = _capture(m, x, "fx")
    lin = (torch.from_numpy(x) @ m.lin.weight.T + m.lin.bias).detach().numpy()
    assert trace.meta.get("recaptured_eagerly") is True
    _close(trace["lin"].output, lin)
    _close(trace["scale"].output, 2 * lin)


@pytest.mark.parametrize("path", PATHS)
def test_functional_ops_in_containers_are_named_by_scope(path):
    torch.manual_seed(0)
    m = randomize_bn(SmallNet()).eval()
    x = _x(SmallNet.INPUT_SHAPE)
    trace = _capture(m, x, path)
    assert trace.names() == ["conv", "bn", "act", "mul", "relu", "cat", "view", "drop", "fc",
                             "softmax"]
    assert trace["relu"].kind == "relu" and trace["relu"].attrs["op"] == "relu"
    assert trace["cat"].bottoms == ["act", "relu"]
    assert trace["act"].kind == "ReLU"  # nn.ReLU is one record, not ReLU + F.relu
    y = trace["act"].output
    _close(trace["cat"].output, np.concatenate([y, np.maximum(2 * y, 0)], axis=1))
    _close(trace["softmax"].output.sum(axis=1), np.ones(2))


def test_untraceable_model_is_captured_with_hooks():
    torch.manual_seed(0)
    m = DataDependent().eval()
    x = _x((1, 3, 6, 6))
    trace = capture_torch(m, x)
    assert trace.meta["capture"] == "hooks"
    assert "graph_error" in trace.meta and "\n" not in trace.meta["graph_error"]
    conv = F.conv2d(torch.from_numpy(x), m.conv.weight, m.conv.bias, padding=1)
    branch = F.relu(conv) if conv.sum() > 0 else -conv
    names = ["conv", "relu" if conv.sum() > 0 else "neg", "mean", "fc"]
    assert trace.names() == names  # x.sum() > 0 is control flow, not a layer
    _close(trace["mean"].output, branch.mean(dim=(2, 3)).detach().numpy())
    _close(trace["fc"].output, m(torch.from_numpy(x)).detach().numpy())


def test_two_inputs_dict_order_and_names():
    torch.manual_seed(0)
    m = TwoInputs().eval()
    a, b = _x((1, 4), 1), _x((1, 4), 2)
    for path in PATHS:
        trace = _capture(m, {"left": a, "right": b}, path)
        assert trace["a"].bottoms == ["left"] and trace["b"].bottoms == ["right"]
        assert list(trace.inputs) == ["left", "right"]
        _close(trace["add"].output, m(torch.from_numpy(a), torch.from_numpy(b)).detach().numpy())
    trace = capture_torch(m, [a, b])
    assert trace["b"].bottoms == ["input1"]


# ---------------------------------------------------------------------------------------------
# state, options, handles


def test_train_mode_model_gets_eval_and_meta_says_so():
    torch.manual_seed(0)
    m = randomize_bn(SmallNet()).train()
    before = m.bn.running_mean.clone()
    x = _x(SmallNet.INPUT_SHAPE)
    trace = capture_torch(m, x)
    assert "(root)" in trace.meta["arrived_in_train_mode"] and "bn" in trace.meta[
        "arrived_in_train_mode"]
    assert trace.meta["training_modules"] == []
    m.eval()
    _close(trace.records[-1].output, m(torch.from_numpy(x)).detach().numpy())
    m.train()
    assert all(mod.training for mod in m.modules())  # the caller's flags are restored
    torch.testing.assert_close(m.bn.running_mean, before)  # eval: no statistics update

    kept = capture_torch(m, x, keep_train_mode=True)
    assert "bn" in kept.meta["training_modules"]
    bn_in = kept.value_before("conv", kept["bn"].index + 1)
    normed = (bn_in - bn_in.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(
        bn_in.var(axis=(0, 2, 3), keepdims=True) + m.bn.eps)
    w, b = (p.detach().numpy()[None, :, None, None] for p in (m.bn.weight, m.bn.bias))
    _close(kept["bn"].output, normed * w + b, 1e-4)  # batch statistics were used


def test_meta_records_numerics_state():
    trace = capture_torch(nn.Linear(2, 2), _x((1, 2)))
    meta = trace.meta
    assert meta["framework"] == "torch" and meta["torch_version"] == torch.__version__
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["allow_tf32_matmul"] == torch.backends.cuda.matmul.allow_tf32
    assert meta["allow_tf32_cudnn"] == torch.backends.cudnn.allow_tf32
    assert meta["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert trace.names() == ["Linear"]  # a child-less root is one record


@pytest.mark.parametrize("path", PATHS)
def test_float64_run(r50, r50_x, r50_ref, path):
    trace = _capture(r50, r50_x, path, dtype="float64")
    assert trace["fc"].output.dtype == np.float64 and trace["fc"].attrs["dtype"] == "float64"
    assert trace.inputs["input"].dtype == np.float64
    _close(trace["layer4.2.relu#2"].output, r50_ref["layer4.2.relu#2"], 1e-4)
    assert r50.conv1.weight.dtype == torch.float32  # the caller's model is not cast


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_run(path):
    torch.manual_seed(0)
    m = randomize_bn(SmallNet()).eval()
    x = _x(SmallNet.INPUT_SHAPE)
    ref = capture_torch(m, x)
    trace = _capture(m, x, path, dtype="bfloat16")
    for rec in trace:
        assert rec.output.dtype == np.float32 and rec.attrs["dtype"] == "bfloat16"
        _close(rec.output, ref[rec.name].output, 0.1)
    assert trace.inputs["input"].dtype == np.float32  # bf16 values, widened
    assert m.fc.weight.dtype == torch.float32


def test_float16_run():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = _x((2, 8))
    trace = capture_torch(m, x, dtype="float16")
    assert trace["1"].output.dtype == np.float16
    _close(trace["1"].output, capture_torch(m, x)["1"].output, 1e-2)


def test_bad_options_are_one_line_errors():
    m = nn.Linear(2, 2)
    with pytest.raises(LayerdiffError, match="dtype 'int8'"):
        capture_torch(m, _x((1, 2)), dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(LayerdiffError, match="cuda"):
            capture_torch(m, _x((1, 2)), device="cuda")
    with pytest.raises(LayerdiffError, match=r"forward raised RuntimeError.*input\(1, 3\)"):
        capture_torch(m, _x((1, 3)))


@pytest.mark.parametrize("path", PATHS)
def test_handles_rerun_one_layer(r50, r50_x, r50_ref, path):
    trace = _capture(r50, r50_x, path)
    relu = trace["layer1.0.relu#1"]
    assert relu.handle.fn is r50.layer1[0].relu
    (inp,) = relu.handle.inputs
    _close(inp.numpy(), r50_ref["layer1.0.bn2"])  # the input as seen, not as overwritten
    (again,) = relu.handle.run()
    _close(again, relu.output)
    _close(trace["layer1.0.bn2"].output, r50_ref["layer1.0.bn2"])  # re-running wrote nothing
    conv = trace["layer1.0.conv2"]
    (other,) = conv.handle.run(np.zeros_like(trace.value_before("layer1.0.relu", conv.index)))
    assert np.abs(other).max() == 0  # bias-free conv of zeros
    add = trace["layer1.0.add"]
    (summed,) = add.handle.run()
    _close(summed, add.output)


def test_trace_round_trips_through_save(tmp_path):
    torch.manual_seed(0)
    trace = capture_torch(randomize_bn(SmallNet()).eval(), _x(SmallNet.INPUT_SHAPE))
    back = Trace.load(trace.save(tmp_path / "t.npz"))
    assert back.names() == trace.names() and back.meta["capture"] == "fx"
    np.testing.assert_array_equal(back["cat"].output, trace["cat"].output)


# ---------------------------------------------------------------------------------------------
# loading

MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 3, 8, 8)


    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x))


    def build():
        return Net()
''')


def _model_dir(tmp_path, body=MODEL_PY, weights=True):
    d = tmp_path / "port"
    d.mkdir()
    (d / "model.py").write_text(body)
    if weights:
        ns: dict = {}
        exec(compile(body, "model.py", "exec"), ns)
        torch.manual_seed(1)
        net = ns["Net"]()
        torch.save(net.state_dict(), d / "weights.pth")
        return d, net
    return d, None


def test_model_py_with_state_dict(tmp_path):
    d, net = _model_dir(tmp_path)
    m = load_torch(d)
    torch.testing.assert_close(m.conv.weight, net.conv.weight)  # weights came from the file
    assert input_shapes(m) == {"input": (1, 3, 8, 8)}
    assert input_shapes(d) == {"input": (1, 3, 8, 8)}
    trace = capture_torch(m, _x((1, 3, 8, 8)))
    assert trace.names() == ["conv", "relu"]


def test_model_py_entry_points(tmp_path):
    body = MODEL_PY.replace("def build():", "def get_model():")
    d, _ = _model_dir(tmp_path, body, weights=False)
    assert isinstance(load_torch(d / "model.py"), nn.Module)
    (d / "model.py").write_text(MODEL_PY.replace("def build():\n    return Net()",
                                                 "model = Net()"))
    assert isinstance(load_torch(d), nn.Module)
    (d / "model.py").write_text("import torch\n")
    with pytest.raises(ModelFormatError, match=r"model\.py: defines none of build\(\)"):
        load_torch(d)


def test_model_py_errors_name_the_file(tmp_path):
    d, _ = _model_dir(tmp_path, MODEL_PY.replace("return Net()", "raise ValueError('boom')"),
                      weights=False)
    with pytest.raises(ModelFormatError) as e:
        load_torch(d)
    assert str(e.value) == f"{d / 'model.py'}: build() raised ValueError: boom"
    (d / "model.py").write_text("def build(:\n")
    with pytest.raises(ModelFormatError, match=r"model\.py: importing it raised SyntaxError"):
        load_torch(d)


def test_state_dict_for_another_model_lists_keys(tmp_path):
    d, _ = _model_dir(tmp_path, weights=False)
    torch.save(SmallNet().state_dict(), d / "other.pt")
    with pytest.raises(ModelFormatError) as e:
        load_torch(d)
    assert str(e.value) == (
        f"{d / 'other.pt'}: state_dict does not fit the model from model.py: 7 unexpected "
        "key(s) (bn.weight, bn.bias, bn.running_mean, bn.running_var, ... (+3 more)); "
        "strict=False loads the keys that match")
    torch.save({"conv.weight": torch.zeros(6, 3, 3, 3), "conv.bias": torch.zeros(6)},
               d / "other.pt")
    with pytest.raises(ModelFormatError, match=r"2 shape mismatch\(es\) \(conv\.weight: file "
                                               r"\(6, 3, 3, 3\) vs model \(4, 3, 3, 3\)"):
        load_torch(d, strict=False)  # never tolerated
    torch.save({"head.w": torch.zeros(1), "conv.weight": torch.zeros(4, 3, 3, 3)}, d / "other.pt")
    with pytest.raises(ModelFormatError, match=r"1 missing key\(s\) \(conv\.bias\); "
                                               r"1 unexpected key\(s\) \(head\.w\)"):
        load_torch(d)
    with pytest.warns(UserWarning, match="non-strictly"):
        m = load_torch(d, strict=False)
    assert float(m.conv.weight.abs().sum()) == 0.0


def test_export_archive(tmp_path, r50_x):
    torch.manual_seed(0)
    m = randomize_bn(ResNet((1, 1, 1, 1), 10, width=8)).eval()
    x = r50_x[:, :, :32, :32].copy()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (torch.from_numpy(x),)), path)
    loaded = load_torch(tmp_path)  # a directory holding one archive
    assert input_shapes(loaded) == {"input": (1, 3, 32, 32)} == input_shapes(path)
    want = capture_torch(m, x)
    got = capture_torch(loaded, x)
    assert got.meta["capture"] == "fx"
    assert got.names() == want.names()  # module paths survive export
    assert [r.kind for r in got] == [r.kind for r in want]
    for r in want:
        _close(got[r.name].output, r.output)
    assert got["layer1.0.relu#1"].bottoms == ["layer1.0.bn2"]


def test_torchscript_archive(tmp_path):
    torch.manual_seed(0)
    m = randomize_bn(SmallNet()).eval()
    x = _x(SmallNet.INPUT_SHAPE)
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(m, (torch.from_numpy(x),)), path)
    loaded = load_torch(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    trace = capture_torch(loaded, x)
    assert trace.meta["source_format"] == "torchscript"
    want = m(torch.from_numpy(x)).detach().numpy()
    _close(trace.records[-1].output, want)
    if trace.meta["capture"] == "fx":  # converted: one record per op
        assert len(trace) >= 8 and trace.records[0].bottoms == ["input"]


def test_pickled_module_needs_trust(tmp_path):
    torch.manual_seed(0)
    m = SmallNet().eval()
    path = tmp_path / "whole.pt"
    torch.save(m, path)
    with pytest.raises(ModelFormatError) as e:
        load_torch(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "--trust-pickle" in msg
    assert "torch_models.SmallNet" in msg
    loaded = load_torch(path, trust_pickle=True)
    x = torch.from_numpy(_x(SmallNet.INPUT_SHAPE))
    torch.testing.assert_close(loaded(x), m(x))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_not_executed(tmp_path):
    # the payload works: plain unpickling creates the marker file
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()

    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(ModelFormatError, match="--trust-pickle"):
            load_torch(tmp_path / name)
        assert not marker.exists()
    # nor as "weights" beside a model.py
    d, _ = _model_dir(tmp_path, weights=False)
    torch.save(_Payload(marker), d / "weights.pt")
    with pytest.raises(ModelFormatError, match="--trust-pickle"):
        load_torch(d)
    assert not marker.exists()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        load_torch(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFormatError, match="junk.pt: not a torch model file"):
        load_torch(junk)
    sd = tmp_path / "sd.pt"
    torch.save(nn.Linear(2, 2).state_dict(), sd)
    with pytest.raises(ModelFormatError, match="a state_dict, not a model"):
        load_torch(sd)


def test_bottleneck_alone_and_module_attribute_shapes():
    block = Bottleneck(8, 2).eval()
    block.input_shape = (1, 8, 4, 4)
    assert input_shapes(block) == {"input": (1, 8, 4, 4)}
    trace = capture_torch(block, _x((1, 8, 4, 4)))
    assert trace.names() == ["conv1", "bn1", "relu", "conv2", "bn2", "relu#1", "conv3", "bn3",
                             "add", "relu#2"]
    assert trace["add"].bottoms == ["bn3", "input"]


class _WithScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale=None):  # an optional argument left out
        y = self.fc(self.inner(x))
        return y if scale is None else y * scale


@pytest.mark.parametrize("path", PATHS)
def test_scripted_submodule_is_one_record(path):
    torch.manual_seed(0)
    m = _WithScripted().eval()
    x = _x((2, 4))
    trace = _capture(m, x, path)
    assert trace.names() == ["inner", "fc"]
    assert trace["inner"].kind == "Sequential" and trace["fc"].bottoms == ["inner"]
    _close(trace["fc"].output, m(torch.from_numpy(x)).detach().numpy())
    assert isinstance(m.inner, torch.jit.ScriptModule)  # put back after a hooks capture


def test_hook_on_a_container_forces_hooks_path():
    torch.manual_seed(0)
    m = SmallNet().eval()
    handle = m.register_forward_hook(lambda mod, args, out: out * 0.0)
    try:
        x = _x(SmallNet.INPUT_SHAPE)
        trace = capture_torch(m, x)
        assert trace.meta["capture"] == "hooks" and "forward hooks" in trace.meta["graph_error"]
    finally:
        handle.remove()
    assert capture_torch(m, x).meta["capture"] == "fx"  # the cached decision is revisited


@pytest.mark.parametrize("path", PATHS)
def test_model_writing_into_its_input(path):
    class Normalise(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            x.sub_(0.5)  # in-place preprocessing, as some ports do
            return self.lin(x)

    torch.manual_seed(0)
    m = Normalise().eval()
    x = _x((2, 3))
    trace = _capture(m, x, path)
    np.testing.assert_array_equal(trace.inputs["input"], x)  # as fed, not as overwritten
    assert trace["sub"].bottoms == ["input"] and trace["lin"].bottoms == ["sub"]
    _close(trace["sub"].output, x - 0.5)
    _close(trace["lin"].output, m(torch.from_numpy(x.copy())).detach().numpy())


def test_eager_recapture_starts_from_the_inputs_as_fed():
    class SneakyScale(nn.Module):
        def forward(self, x):
            return x.mul_(2.0)  # unseen by fx: inside an opaque leaf

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = SneakyScale()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.scale(x)  # writes into the input
            z = self.lin(y)
            self.scale(y)  # writes into the recorded "scale" output: forces a recapture
            return z

    torch.manual_seed(0)
    m = Net().eval()
    x = _x((1, 3))
    trace = _capture(m, x, "fx")
    assert trace.meta.get("recaptured_eagerly") is True
    _close(trace["scale"].output, 2 * x)  # not 8 * x: the rerun starts from x itself
    _close(trace["scale#1"].output, 4 * x)
    _close(trace["lin"].output, m(torch.from_numpy(x.copy())).detach().numpy())
    np.testing.assert_array_equal(trace.inputs["input"], x)

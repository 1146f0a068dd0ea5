"""The candidate on a CUDA device: compare, TF32 and float16/bfloat16 labels, the capture's
device-to-host path. Marked ``cuda``; without a device every test skips with a reason starting
``hardware: `` (the one documented hardware skip, allowed under CI=true)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from layerdiff.adapters.torch import capture_torch
from layerdiff.adapters.torch_capture import set_tf32
from ports import GraphPort
from torch import nn

import layerdiff
from layerdiff.examples import write_example
from layerdiff.sources import ModelOptions

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="hardware: no CUDA device"),
]
SPEC = "uniform:-1,1:3"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    d = tmp_path_factory.mktemp("example") / "ex"
    write_example(d)
    return layerdiff.load_caffe(d)


@pytest.fixture
def tf32_restored():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cuda(dtype: str = "float32") -> ModelOptions:
    return ModelOptions(device="cuda", dtype=dtype)


def test_compare_on_cuda_passes_with_tf32_off(net, tf32_restored):
    set_tf32(False)
    report = layerdiff.compare(net, GraphPort(net).eval(), SPEC, cand_options=_cuda())
    meta = report.candidate.meta
    assert meta["device"].startswith("cuda") and meta["allow_tf32_cudnn"] is False
    assert report and report.findings == []


def test_tf32_on_cuda_is_labelled_or_passes(net, tf32_restored):
    set_tf32(True)
    report = layerdiff.compare(net, GraphPort(net).eval(), SPEC, cand_options=_cuda())
    assert report.candidate.meta["allow_tf32_cudnn"] is True
    if not report:
        assert report.findings and {f.kind for f in report.findings} == {"precision"}
        assert {f.data["format"] for f in report.findings if f.data} <= {"tf32"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_on_cuda_is_labelled(net, dtype):
    report = layerdiff.compare(net, GraphPort(net).eval(), SPEC, cand_options=_cuda(dtype))
    assert not report and {f.kind for f in report.findings} == {"precision"}
    assert {f.data["format"] for f in report.findings} == {dtype}


def test_bn_bug_in_a_bfloat16_port_on_cuda(net):
    report = layerdiff.compare(net, GraphPort(net, divide_bn=False).eval(), SPEC,
                               cand_options=_cuda("bfloat16"))
    at_bn = [f for f in report.findings if f.layer == "bn_conv1 <-> bn_conv1"]
    assert at_bn and at_bn[0].kind == "bn_scale_factor" and at_bn[0].explained >= 0.99


def _chain(depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers).cuda().eval()


def _syncs_during_capture(model: nn.Module, x: np.ndarray) -> int:
    """Synchronising CUDA calls torch reports while capturing (explicit synchronize excluded)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            capture_torch(model, x, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def test_capture_does_not_synchronise_per_layer():
    x = np.random.default_rng(0).standard_normal((2, 8, 16, 16)).astype(np.float32)
    shallow, deep = _chain(2), _chain(24)
    capture_torch(shallow, x, device="cuda")  # warm-up: graph tracing, cuDNN plans
    capture_torch(deep, x, device="cuda")
    assert _syncs_during_capture(deep, x) == _syncs_during_capture(shallow, x)


def test_outputs_reach_the_host_in_pinned_memory():
    x = np.random.default_rng(0).standard_normal((2, 8, 16, 16)).astype(np.float32)
    model = _chain(3)
    trace = capture_torch(model, x, device="cuda")
    with torch.no_grad():
        want = model(torch.from_numpy(x).cuda()).cpu().numpy()
    last = trace.records[-1].output
    np.testing.assert_array_equal(last, want)
    # copied with non_blocking=True: torch allocates the host side pinned, one synchronize after
    assert all(torch.from_numpy(r.output).is_pinned() for r in trace.records)

"""The Trace data model: records, in-place lookups, save/load, streaming."""

from __future__ import annotations

import numpy as np
import pytest

from layerdiff.errors import ModelFormatError
from layerdiff.trace import Trace


def _trace(**kw) -> Trace:
    t = Trace(meta={"framework": "test"}, inputs={"data": np.arange(4.0)}, **kw)
    t.add("conv", "Convolution", ["x"], ["data"], [np.arange(4.0) * 2])
    t.add("relu", "ReLU", ["x"], ["x"], [np.array([0.0, 2.0, 4.0, 6.0])], attrs={"k": 1},
          params={"0": np.full((2, 2), 3.0)})
    t.add("a/b", "Split", ["y", "z"], ["x"], [np.ones(2), np.zeros((1, 2))])
    return t


def test_in_place_values_by_position():
    t = _trace()
    assert t["relu"].in_place and not t["conv"].in_place
    np.testing.assert_array_equal(t.value_before("x", t["relu"].index), np.arange(4.0) * 2)
    np.testing.assert_array_equal(t.value_before("x", 3), [0.0, 2.0, 4.0, 6.0])
    np.testing.assert_array_equal(t.value_before("data", 0), np.arange(4.0))
    assert t.value_before("nothing", 2) is None
    assert [b.tolist() for b in t.bottoms_of(t["a/b"])] == [[0.0, 2.0, 4.0, 6.0]]


def test_duplicate_record_name_rejected():
    t = _trace()
    with pytest.raises(ValueError, match="already"):
        t.add("conv", "Convolution", ["q"], [], [np.zeros(1)])


def test_save_load_roundtrip(tmp_path):
    t = _trace()
    path = t.save(tmp_path / "t.npz")
    back = Trace.load(path)
    assert back.names() == ["conv", "relu", "a/b"]
    assert back["relu"].attrs == {"k": 1} and back["a/b"].tops == ["y", "z"]
    np.testing.assert_array_equal(back["relu"].params["0"], np.full((2, 2), 3.0))
    assert back["conv"].params == {}
    for a, b in zip(t, back, strict=True):
        assert a.kind == b.kind and a.bottoms == b.bottoms
        for x, y in zip(a.outputs, b.outputs, strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(back.inputs["data"], np.arange(4.0))
    with np.load(path, allow_pickle=False) as z:  # golden-compatible key layout
        assert "0002|a/b|z.npy" in z.zip.namelist() or "0002|a/b|z" in z.files


def test_streaming_keeps_outputs_on_disk(tmp_path):
    t = _trace(stream_dir=tmp_path / "stream")
    assert isinstance(t["conv"].output, np.memmap)
    assert len(list((tmp_path / "stream").glob("*.npy"))) == 4
    np.testing.assert_array_equal(t["relu"].output, [0.0, 2.0, 4.0, 6.0])
    back = Trace.load(t.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(back["a/b"].outputs[1], np.zeros((1, 2)))


def test_load_rejects_foreign_npz(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(2))
    with pytest.raises(ModelFormatError, match="not a layerdiff trace"):
        Trace.load(p)
    q = tmp_path / "y.npz"
    q.write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="not a readable"):
        Trace.load(q)

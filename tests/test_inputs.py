"""Input specs: parsing, shapes, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from layerdiff.errors import InputSpecError
from layerdiff.inputs import make_inputs, parse_shape, parse_spec, parse_specs


@pytest.mark.parametrize("text, kind, value", [
    ("ones", "const", 1.0), ("ones:0.5", "const", 0.5), ("const:-2", "const", -2.0),
    ("zeros", "const", 0.0),
])
def test_constants(text, kind, value):
    s = parse_spec(text)
    assert (s.kind, s.value) == (kind, value) and s.channel_symmetric
    assert np.all(s.make((1, 2, 3)) == value)


def test_random_specs_are_seeded():
    a = parse_spec("randn:3").make((2, 3))
    assert np.array_equal(a, parse_spec("randn:3").make((2, 3)))
    assert not np.array_equal(a, parse_spec("randn:4").make((2, 3)))
    u = parse_spec("uniform:-2,5:1").make((1000,))
    assert u.min() >= -2 and u.max() < 5 and u.std() > 1
    assert not parse_spec("uniform:0,1").channel_symmetric


def test_npy_spec(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.arange(6.0).reshape(1, 6))
    arr = make_inputs(parse_specs([f"npy:{p}"]), {"data": (9, 9)})["data"]
    assert arr.shape == (1, 6) and arr.dtype == np.float32
    with pytest.raises(InputSpecError, match="no such file"):
        parse_spec(f"npy:{tmp_path}/missing.npy").make((1,))


def test_named_inputs_and_batch():
    specs = parse_specs(["a=ones:2", "b=zeros"])
    out = make_inputs(specs, {"a": (4, 3), "b": (4, 1)})
    assert out["a"].shape == (4, 3) and np.all(out["a"] == 2) and np.all(out["b"] == 0)
    with pytest.raises(InputSpecError, match="unknown input"):
        make_inputs(parse_specs(["c=ones"]), {"a": (1,)})
    with pytest.raises(InputSpecError, match="no --input"):
        make_inputs(parse_specs(["a=ones"]), {"a": (1,), "b": (1,)})


@pytest.mark.parametrize("bad", ["onez", "uniform:1", "uniform:2,1", "randn:x", "const:", "npy:"])
def test_bad_specs(bad):
    with pytest.raises(InputSpecError, match="--input"):
        parse_spec(bad)


def test_shapes():
    assert parse_shape("1,3,224,224") == {None: (1, 3, 224, 224)}
    assert parse_shape("data=2,3,8,8;im=1,3") == {"data": (2, 3, 8, 8), "im": (1, 3)}
    for bad in ("", "1,-3", "a=1,b"):
        with pytest.raises(InputSpecError):
            parse_shape(bad)

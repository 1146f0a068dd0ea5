"""Data-movement layers (layerdiff/engine/shape.py): bit-equality with the goldens, Caffe's
error checks, float64 runs and semantics the goldens leave open."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import GOLDEN, golden_dirs, load_golden, require_shared
from nets import caffe_net

from layerdiff.caffe import load_caffe
from layerdiff.engine import lookup, make_plan, run_caffe
from layerdiff.errors import LayerdiffError

TYPES = {"Concat", "Slice", "Split", "Flatten", "Reshape", "Crop", "Tile", "Permute",
         "ShuffleChannel", "Silence", "BatchReindex", "Filter"}
PREFIXES = ("concat_", "slice_", "split", "flatten", "reshape_", "crop_", "tile", "silence",
            "batch_reindex", "filter")


def _golden_cases():
    dirs = [d for d in golden_dirs("unit") if d.name.startswith(PREFIXES)]
    dirs += [d for d in golden_dirs("fork") if d.name in ("permute", "shuffle_channel")]
    return [pytest.param(d, id=d.name) for d in dirs] or [pytest.param(None, id="no-shared")]


def check_layers_exact(case, types: set[str]) -> int:
    """Run each layer of ``types`` alone on its recorded bottoms; demand bit-equal outputs and
    (for shape-static types) the golden's shapes from top_shapes. Other families' layers are
    not needed. Returns the number of outputs compared."""
    g = load_golden(case)
    n = 0
    for rec in g.meta["layers"]:
        if rec["type"] not in types or rec.get("auto_split"):
            continue
        impl = lookup(rec["type"])(g.net.layer(rec["name"]))
        bottoms = [g.value_before(b, rec["index"]) for b in rec["bottoms"]]
        for b in bottoms:
            b.flags.writeable = False
        shapes = impl.top_shapes([b.shape for b in bottoms])
        outs = impl.forward(bottoms, [])
        assert len(outs) == len(rec["tops"]) == len(shapes)
        for k, top in enumerate(rec["tops"]):
            ref = g.trace[g.key(rec, top)]
            got = np.asarray(outs[k])
            assert got.dtype == np.float32, f"{rec['name']}: dtype {got.dtype}"
            assert got.shape == ref.shape, f"{rec['name']}: {got.shape} != {ref.shape}"
            if rec["type"] != "Filter":  # Filter's kept count is data-dependent
                assert tuple(shapes[k]) == ref.shape
            assert got.tobytes() == ref.tobytes(), f"{case.name} {rec['name']}: not bit-equal"
            n += 1
        if not rec["tops"]:
            assert outs == [] and shapes == []
            n += 1
    return n


@pytest.mark.parametrize("case", _golden_cases())
def test_golden_bit_equal(case):
    require_shared()
    assert check_layers_exact(case, TYPES) > 0


# -- helpers ----------------------------------------------------------------------------------
def _net(tmp_path, inputs: dict[str, tuple[int, ...]], body: str):
    return caffe_net(tmp_path, body, inputs)


def _run(tmp_path, inputs: dict[str, np.ndarray], body: str, dtype: str = "float32"):
    net = _net(tmp_path, {k: v.shape for k, v in inputs.items()}, body)
    return run_caffe(net, inputs, dtype=dtype)


def _plan_fails(tmp_path, inputs, body, match: str | None = None):
    net = _net(tmp_path, inputs, body)
    with pytest.raises(LayerdiffError, match=match):
        make_plan(net)


def _x(*shape, dtype=np.float32):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)


# -- rejected.json ----------------------------------------------------------------------------
def _rejected():
    require_shared()
    return json.loads((GOLDEN / "unit" / "rejected.json").read_text())


@pytest.mark.parametrize("name,layer", [("slice_unequal", "slice"),
                                        ("reshape_axis_m1", "reshape"),
                                        ("reshape_bad_count", "reshape")])
def test_rejected(tmp_path, name, layer):
    entry = _rejected()[name]
    path = tmp_path / "x.prototxt"
    path.write_text(entry["deploy.prototxt"])
    with pytest.raises(LayerdiffError, match=f"layer '{layer}'"):
        make_plan(load_caffe(prototxt=path))


def test_rejected_crop_out_of_range(tmp_path):
    # The entry's reference blob comes from a 2x2/2 MAX Pooling of 2x3x7x9 (ceil: 2x3x4x5); an Input
    # of that shape stands in, so this does not depend on the pooling family.
    text = _rejected()["crop_out_of_range"]["deploy.prototxt"]
    assert 'bottom: "data" bottom: "ref"' in text and "axis: 2 offset: 4" in text
    _plan_fails(tmp_path, {"data": (2, 3, 7, 9), "ref": (2, 3, 4, 5)},
                'layer { name: "crop" type: "Crop" bottom: "data" bottom: "ref" top: "crop" '
                "crop_param { axis: 2 offset: 4 } }", "layer 'crop'.*out of bounds")
    if lookup("Pooling") is not None:
        path = tmp_path / "y.prototxt"
        path.write_text(text)
        with pytest.raises(LayerdiffError, match="layer 'crop'"):
            make_plan(load_caffe(prototxt=path))


# -- error paths ------------------------------------------------------------------------------
X4 = {"data": (2, 6, 7, 9)}


@pytest.mark.parametrize("body,match", [
    ('layer { name: "c" type: "Concat" bottom: "data" bottom: "data" top: "c" '
     "concat_param { axis: 1 concat_dim: 1 } }", "not both"),
    ('layer { name: "c" type: "Concat" bottom: "data" bottom: "data" top: "c" '
     "concat_param { concat_dim: 4 } }", "concat_dim"),
    ('layer { name: "c" type: "Concat" bottom: "data" bottom: "data" top: "c" '
     "concat_param { axis: -5 } }", "axis"),
    ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" '
     "slice_param { slice_point: 1 slice_point: 2 } }", "slice_point"),
    ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" '
     "slice_param { slice_point: 3 slice_point: 3 } }", "increasing"),
    ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" '
     "slice_param { slice_point: 7 } }", "beyond"),
    ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" '
     "slice_param { axis: 1 slice_dim: 1 } }", "not both"),
    ('layer { name: "f" type: "Flatten" bottom: "data" top: "f" '
     "flatten_param { axis: 2 end_axis: 0 } }", "end_axis"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     "reshape_param { shape { dim: -1 dim: -1 } } }", "more than one -1"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     "reshape_param { shape { dim: 0 dim: -1 dim: 5 } } }", "divisible"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     "reshape_param { axis: 3 shape { dim: 0 dim: 0 } } }", "no axis"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     "reshape_param { axis: 2 num_axes: 3 shape { dim: -1 } } }", "num_axes"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     "reshape_param { axis: -6 shape { dim: -1 } } }", "axis"),
    ('layer { name: "t" type: "Tile" bottom: "data" top: "t" }', "tiles"),
    ('layer { name: "t" type: "Tile" bottom: "data" top: "t" tile_param { tiles: 0 } }',
     "positive"),
    ('layer { name: "p" type: "Permute" bottom: "data" top: "p" '
     "permute_param { order: 0 order: 0 } }", "repeats"),
    ('layer { name: "p" type: "Permute" bottom: "data" top: "p" '
     "permute_param { order: 4 } }", "order"),
    ('layer { name: "sc" type: "ShuffleChannel" bottom: "data" top: "sc" '
     "shuffle_channel_param { group: 4 } }", "divisible"),
    ('layer { name: "sc" type: "ShuffleChannel" bottom: "data" top: "sc" '
     "shuffle_channel_param { group: 0 } }", "group"),
    ('layer { name: "s" type: "Silence" bottom: "data" top: "z" }', "top"),
])
def test_plan_errors(tmp_path, body, match):
    _plan_fails(tmp_path, X4, body, match)


def test_concat_shape_mismatch(tmp_path):
    _plan_fails(tmp_path, {"a": (2, 3, 7, 9), "b": (2, 3, 7, 8)},
                'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }', "differ")


def test_crop_errors(tmp_path):
    shapes = {"a": (2, 3, 7, 9), "b": (2, 3, 5, 6)}
    _plan_fails(tmp_path, shapes, 'layer { name: "c" type: "Crop" bottom: "a" bottom: "b" '
                'top: "c" crop_param { axis: 1 offset: 0 offset: 1 } }', "offset")
    _plan_fails(tmp_path, shapes, 'layer { name: "c" type: "Crop" bottom: "a" bottom: "b" '
                'top: "c" crop_param { offset: 1 offset: 4 } }', "out of bounds")
    _plan_fails(tmp_path, shapes, 'layer { name: "c" type: "Crop" bottom: "a" top: "c" }',
                "bottom")


def test_batch_reindex_and_filter_errors(tmp_path):
    _plan_fails(tmp_path, {"a": (2, 3), "i": (3, 1)},
                'layer { name: "r" type: "BatchReindex" bottom: "a" bottom: "i" top: "r" }',
                "1-D")
    _plan_fails(tmp_path, {"a": (2, 3), "s": (2, 2)},
                'layer { name: "f" type: "Filter" bottom: "a" bottom: "s" top: "f" }',
                "singletons")
    _plan_fails(tmp_path, {"a": (2, 3), "s": (3,)},
                'layer { name: "f" type: "Filter" bottom: "a" bottom: "s" top: "f" }', "axis 0")
    _plan_fails(tmp_path, {"a": (2, 3), "s": (2,)},
                'layer { name: "f" type: "Filter" bottom: "a" bottom: "s" top: "f" top: "g" }',
                "one top per")
    # an index outside the batch is refused when the values are seen (Caffe's CHECK)
    body = 'layer { name: "r" type: "BatchReindex" bottom: "a" bottom: "i" top: "r" }'
    for bad in (2.0, -0.5, np.nan):
        with pytest.raises(LayerdiffError, match="outside the batch"):
            _run(tmp_path, {"a": _x(2, 3), "i": np.array([0, bad], np.float32)}, body)


# -- semantics and float64 --------------------------------------------------------------------
def test_float64_chain(tmp_path):
    x = _x(2, 6, 5, 4, dtype=np.float64)
    body = """
layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" top: "c"
        slice_param { slice_point: 1 slice_point: 4 } }
layer { name: "cat" type: "Concat" bottom: "c" bottom: "a" bottom: "b" top: "cat" }
layer { name: "r" type: "Reshape" bottom: "cat" top: "r"
        reshape_param { shape { dim: 0 dim: -1 dim: 4 } } }
layer { name: "f" type: "Flatten" bottom: "r" top: "f" }
layer { name: "t" type: "Tile" bottom: "f" top: "t" tile_param { axis: 0 tiles: 2 } }
layer { name: "p" type: "Permute" bottom: "data" top: "p"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "sc" type: "ShuffleChannel" bottom: "data" top: "sc"
        shuffle_channel_param { group: 3 } }
layer { name: "cr" type: "Crop" bottom: "data" bottom: "ref" top: "cr"
        crop_param { axis: 2 offset: 1 } }
layer { name: "sp" type: "Split" bottom: "cr" top: "sp1" top: "sp2" }
layer { name: "z" type: "Silence" bottom: "sp1" bottom: "sp2" }
"""
    tr = _run(tmp_path, {"data": x, "ref": np.zeros((1, 1, 3, 2))}, body, "float64")
    cat = np.concatenate([x[:, 4:], x[:, :1], x[:, 1:4]], axis=1)
    want = {
        "cat": cat,
        "r": cat.reshape(2, 30, 4),
        "f": cat.reshape(2, 120),
        "t": np.concatenate([cat.reshape(2, 120)] * 2),
        "p": x.transpose(0, 2, 3, 1),
        "sc": x.reshape(2, 3, 2, 5, 4).transpose(0, 2, 1, 3, 4).reshape(x.shape),
        "cr": x[:, :, 1:4, 1:3],
    }
    for name, ref in want.items():
        out = tr[name].outputs[0]
        assert out.dtype == np.float64 and np.array_equal(out, ref), name
    assert [o.tobytes() for o in tr["sp"].outputs] == [want["cr"].tobytes()] * 2
    assert tr["z"].outputs == []


def test_inputs_not_written_and_outputs_independent(tmp_path):
    x = _x(2, 6, 3, 3)
    tr = _run(tmp_path, {"data": x.copy()}, 'layer { name: "sp" type: "Split" bottom: "data" '
              'top: "a" top: "b" }')
    a, b = tr["sp"].outputs
    assert np.array_equal(a, x) and not np.shares_memory(a, b)


def test_reshape_forms(tmp_path):
    x = _x(2, 3, 4, 5)
    cases = {
        "shape { dim: 0 dim: 0 dim: -1 }": (2, 3, 20),
        "axis: 1 num_axes: 0 shape { dim: 1 }": (2, 1, 3, 4, 5),  # insert
        "axis: -1 shape { dim: 1 }": (2, 3, 4, 5, 1),  # -1 appends after the last axis
        "axis: -2 shape { dim: 5 dim: 1 }": (2, 3, 4, 5, 1),  # -2 replaces the last axis
        "axis: 4 num_axes: 0 shape { dim: 1 }": (2, 3, 4, 5, 1),
        "axis: 1 num_axes: 2 shape { dim: -1 }": (2, 12, 5),
        "shape { }": None,  # empty shape, all axes replaced: only legal for count 1
    }
    for spec, want in cases.items():
        body = ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
                f"reshape_param {{ {spec} }} }}")
        if want is None:
            _plan_fails(tmp_path, {"data": x.shape}, body, "elements")
            continue
        out = _run(tmp_path, {"data": x}, body)["r"].outputs[0]
        assert out.shape == want and np.array_equal(out.ravel(), x.ravel()), spec


def test_reshape_copy_dim_counts_into_inferred(tmp_path):
    # Caffe multiplies the copied dims into the known count before inferring -1.
    x = _x(4, 6)
    body = ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
            "reshape_param { shape { dim: -1 dim: 0 } } }")
    assert _run(tmp_path, {"data": x}, body)["r"].outputs[0].shape == (4, 6)


def test_flatten_end_before_axis_inserts_unit(tmp_path):
    # end_axis = axis - 1 flattens nothing: Caffe inserts a unit axis (count of an empty range).
    x = _x(2, 3, 4)
    body = ('layer { name: "f" type: "Flatten" bottom: "data" top: "f" '
            "flatten_param { axis: 2 end_axis: 1 } }")
    assert _run(tmp_path, {"data": x}, body)["f"].outputs[0].shape == (2, 3, 1, 4)


def test_slice_and_concat_edges(tmp_path):
    x = _x(2, 4, 3)
    body = """
layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b"
        slice_param { slice_dim: 2 slice_point: 3 } }
layer { name: "one" type: "Concat" bottom: "data" top: "one" }
layer { name: "s1" type: "Slice" bottom: "data" top: "s1" slice_param { axis: -1 } }
layer { name: "c" type: "Concat" bottom: "data" bottom: "data" top: "c"
        concat_param { concat_dim: 0 } }
"""
    tr = _run(tmp_path, {"data": x}, body)
    a, b = tr["s"].outputs
    assert a.shape == (2, 4, 3) and b.shape == (2, 4, 0)  # the last piece may be empty
    assert np.array_equal(tr["one"].outputs[0], x) and np.array_equal(tr["s1"].outputs[0], x)
    assert np.array_equal(tr["c"].outputs[0], np.concatenate([x, x]))


def test_crop_offsets(tmp_path):
    x = _x(2, 3, 7, 9)
    ref = np.zeros((1, 2, 4, 5), np.float32)
    body = ('layer { name: "c" type: "Crop" bottom: "data" bottom: "ref" top: "c" '
            "crop_param { axis: 1 offset: 1 offset: 2 offset: 3 } }")
    out = _run(tmp_path, {"data": x, "ref": ref}, body)["c"].outputs[0]
    assert np.array_equal(out, x[:, 1:3, 2:6, 3:8])
    body = ('layer { name: "c" type: "Crop" bottom: "data" bottom: "ref" top: "c" '
            "crop_param { axis: -2 offset: 2 } }")
    out = _run(tmp_path, {"data": x, "ref": ref}, body)["c"].outputs[0]
    assert np.array_equal(out, x[:, :, 2:6, 2:7])


def test_tile_permute_shuffle(tmp_path):
    x = _x(2, 6, 2, 3)
    body = """
layer { name: "t" type: "Tile" bottom: "data" top: "t" tile_param { axis: -2 tiles: 3 } }
layer { name: "p" type: "Permute" bottom: "data" top: "p" permute_param { order: 0 order: 3 } }
layer { name: "pi" type: "Permute" bottom: "data" top: "pi" }
layer { name: "g1" type: "ShuffleChannel" bottom: "data" top: "g1" }
layer { name: "g2" type: "ShuffleChannel" bottom: "data" top: "g2"
        shuffle_channel_param { group: 2 } }
"""
    tr = _run(tmp_path, {"data": x}, body)
    assert np.array_equal(tr["t"].outputs[0], np.tile(x, (1, 1, 3, 1)))
    assert np.array_equal(tr["p"].outputs[0], x.transpose(0, 3, 1, 2))  # rest appended
    assert np.array_equal(tr["pi"].outputs[0], x) and np.array_equal(tr["g1"].outputs[0], x)
    g2 = tr["g2"].outputs[0]
    # output channel j*g + i = input channel i*(C/g) + j
    src = [int(np.flatnonzero((x[0] == g2[0, c]).all(axis=(1, 2)))[0]) for c in range(6)]
    assert src == [0, 3, 1, 4, 2, 5]


def test_batch_reindex_truncates(tmp_path):
    x = _x(3, 2, 2)
    idx = np.array([2.9, 0.0, 1.5, 0.2], np.float32)  # Caffe casts with truncation
    body = 'layer { name: "r" type: "BatchReindex" bottom: "data" bottom: "i" top: "r" }'
    out = _run(tmp_path, {"data": x, "i": idx}, body)["r"].outputs[0]
    assert np.array_equal(out, x[[2, 0, 1, 0]])


def test_filter_forward_and_planned_shape(tmp_path):
    # Planned shape = full batch (data-dependent count); forward keeps selected items, several
    # bottoms filtered alike; NaN counts as non-zero and -0.0 as zero, as in C.
    net = _net(tmp_path, {"a": (4, 3), "b": (4, 2, 2), "s": (4, 1)},
               'layer { name: "f" type: "Filter" bottom: "a" bottom: "b" bottom: "s" '
               'top: "fa" top: "fb" }')
    plan = make_plan(net)
    p = plan.layers[-1]
    assert p.top_shapes == [(4, 3), (4, 2, 2)]
    a, b = _x(4, 3), _x(4, 2, 2)
    sel = np.array([[np.nan], [-0.0], [0.0], [3.0]], np.float32)
    fa, fb = p.impl.forward([a, b, sel], [])
    assert np.array_equal(fa, a[[0, 3]]) and np.array_equal(fb, b[[0, 3]])
    fa, _ = p.impl.forward([a, b, np.zeros((4, 1), np.float32)], [])
    assert fa.shape == (0, 3)

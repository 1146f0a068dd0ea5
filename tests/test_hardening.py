"""Hardening: every bad input ends in one line naming the file and line/layer/field, exit 2.

Complements ``tests/test_bad_input.py`` (not repeated here). Each refusal is also checked to
leave the user's files alone (bytes and mtimes of everything under ``tmp_path``, no new files),
and a few run as a real ``python -m layerdiff`` process.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_checks import cli_fails
from golden import CORPUS, require_shared

from layerdiff.caffe import caffe_pb2
from layerdiff.cli import main
from layerdiff.examples import caffemodel_bytes

INPUT = ('layer { name: "in" type: "Input" top: "data" '
         'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n')
CONV = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        'convolution_param { num_output: 4 kernel_size: 3 } }\n')
RELU = 'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
LENET = "lenet_mnist/lenet_iter_10000.caffemodel"


# -- helpers -----------------------------------------------------------------------------------
def _fails(capsys, tmp_path: Path, argv: list[str], *needles: str) -> str:
    """Run the CLI: exit 2, one stderr line holding every needle, no traceback, files intact."""
    return cli_fails(capsys, argv, *needles, untouched=tmp_path)


def _process(*argv, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "layerdiff", *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _model(tmp_path: Path, text: str | bytes, weights: bytes | None = None,
           name: str = "m") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    if isinstance(text, bytes):
        (d / "deploy.prototxt").write_bytes(text)
    else:
        (d / "deploy.prototxt").write_text(text)
    if weights is not None:
        (d / "w.caffemodel").write_bytes(weights)
    return d


def _conv_weights(w: np.ndarray | None = None) -> bytes:
    w = np.ones((4, 3, 3, 3), np.float32) if w is None else w
    return caffemodel_bytes({"conv": [w, np.zeros(4, np.float32)]}, {"conv": "Convolution"})


def _raw_blob(dims: list[int], n_values: int) -> bytes:
    net = caffe_pb2.NetParameter()
    lp = net.layer.add(name="conv", type="Convolution")
    b = lp.blobs.add()
    b.shape.dim.extend(dims)
    b.data.extend([0.5] * n_values)
    return net.SerializeToString()


# -- prototxt ----------------------------------------------------------------------------------
def test_cycle_bottom_produced_only_later(tmp_path, capsys):
    d = _model(tmp_path, INPUT + 'layer { name: "a" type: "ReLU" bottom: "b" top: "a" }\n'
                                 'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }\n')
    _fails(capsys, tmp_path, ["inspect", d], "deploy.prototxt", "layer 'a'", "bottom 'b'",
           "only later", "layer 'b'", "cycle")


def test_unknown_layer_types_listed_at_once_with_how_to_register(tmp_path, capsys):
    d = _model(tmp_path, INPUT + 'layer { name: "a" type: "Foo" bottom: "data" top: "a" }\n'
                                 'layer { name: "b" type: "Bar" bottom: "a" top: "b" }\n'
                                 'layer { name: "c" type: "Foo" bottom: "b" top: "c" }\n')
    _fails(capsys, tmp_path, ["run", d], "deploy.prototxt", "Foo (layer a, c)", "Bar (layer b)",
           "layerdiff.engine.registry.register")


def test_prototxt_that_is_binary(tmp_path, capsys):
    d = _model(tmp_path, _conv_weights())  # a caffemodel saved under the prototxt's name
    _fails(capsys, tmp_path, ["inspect", d], "deploy.prototxt", "binary", "--weights")


def test_empty_prototxt(tmp_path, capsys):
    d = _model(tmp_path, "# nothing here\n")
    _fails(capsys, tmp_path, ["inspect", d], "deploy.prototxt", "no layers")


@pytest.mark.parametrize("header, needle", [
    ('input: "data"\ninput_shape { dim: 1 dim: -3 dim: 8 dim: 8 }\n', "[1, -3, 8, 8]"),
    ('input: "data"\ninput_shape { dim: 1 dim: 0 dim: 8 dim: 8 }\n', "[1, 0, 8, 8]"),
    ('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8\n', "input_dim"),
    ('input: "data"\n', "no shape"),
])
def test_bad_input_declarations(tmp_path, capsys, header, needle):
    d = _model(tmp_path, header + CONV)
    _fails(capsys, tmp_path, ["inspect", d], "deploy.prototxt", needle)


def test_absurd_input_dims_refused_before_allocating(tmp_path, capsys):
    # 3e12 elements: allocating would raise MemoryError (or get the process killed)
    d = _model(tmp_path, INPUT.replace("dim: 8 dim: 8", "dim: 1000000 dim: 1000000") + CONV)
    _fails(capsys, tmp_path, ["run", d], "input 'data'", "absurdly large")
    _fails(capsys, tmp_path, ["inspect", d], "layer 'in'", "absurdly large")


def test_absurd_layer_output_refused_by_the_plan(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV.replace("num_output: 4", "num_output: 4000000000"))
    _fails(capsys, tmp_path, ["inspect", d], "layer 'conv' (Convolution)", "absurdly large")


def test_v1_and_v2_layers_mixed(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV + 'layers { name: "r" type: RELU bottom: "conv" '
                                        'top: "conv" }\n')
    _fails(capsys, tmp_path, ["inspect", d], "deploy.prototxt", "mixes V1")


def test_duplicate_layer_names(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV + CONV.replace('top: "conv"', 'top: "conv2"'))
    _fails(capsys, tmp_path, ["inspect", d], "deploy.prototxt", "two layers are named 'conv'")


def test_train_prototxt_without_shape(tmp_path, capsys):
    d = _model(tmp_path, 'layer { name: "mnist" type: "Data" top: "data" top: "label" }\n'
                         + CONV.replace('bottom: "data"', 'bottom: "data"'))
    _fails(capsys, tmp_path, ["inspect", d], "layer 'mnist' (Data)", "--shape")


# -- caffemodel --------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [1, 3, 50, 0.5])
def test_truncated_real_caffemodel(tmp_path, capsys, cut):
    require_shared()
    data = (CORPUS / LENET).read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    d = _model(tmp_path, (CORPUS / "lenet_mnist/deploy.prototxt").read_text(), data[:n])
    _fails(capsys, tmp_path, ["run", d], "w.caffemodel", "truncated")


def test_blob_with_wrong_number_of_values(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _raw_blob([4, 3, 3, 3], 10))
    _fails(capsys, tmp_path, ["inspect", d], "w.caffemodel", "layer 'conv'",
           "[4, 3, 3, 3] needs 108 values but 10 are stored")


def test_blob_with_absurd_declared_dims(tmp_path, capsys):
    # 2^64 elements and no data: an int64 product wraps to 0 and matched the 0 values stored
    d = _model(tmp_path, INPUT + CONV, _raw_blob([1 << 32, 1 << 32], 0))
    _fails(capsys, tmp_path, ["inspect", d], "w.caffemodel", "layer 'conv'",
           "18446744073709551616 values but 0 are stored")


def test_blob_with_negative_dim(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _raw_blob([4, -3, 3, 3], 0))
    _fails(capsys, tmp_path, ["inspect", d], "w.caffemodel", "negative dimension")


def test_caffemodel_with_huge_varint_length(tmp_path, capsys):
    # field 100 (layer), length varint of 2^63-1: refused without reading or allocating
    d = _model(tmp_path, INPUT + CONV, b"\xa2\x06" + b"\xff" * 8 + b"\x7f")
    _fails(capsys, tmp_path, ["inspect", d], "w.caffemodel", "runs past the end")


def test_caffemodel_with_overlong_varint(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, b"\xa2\x06" + b"\x80" * 11 + b"\x01")
    _fails(capsys, tmp_path, ["inspect", d], "w.caffemodel", "varint longer than 10 bytes")


def test_v0_caffemodel(tmp_path, capsys):
    # V1 'layers' (2) holding the pre-2014 V0 'layer' field (1)
    d = _model(tmp_path, INPUT + CONV, b"\x12\x04\x0a\x02\x0a\x00")
    _fails(capsys, tmp_path, ["inspect", d], "w.caffemodel", "V0")


def test_weights_of_another_model_no_names_match(tmp_path, capsys):
    require_shared()
    d = _model(tmp_path, INPUT + CONV)
    _fails(capsys, tmp_path, ["run", d, "--weights", CORPUS / LENET], "lenet_iter_10000",
           "weights for another model", "conv1")


def test_weights_of_another_model_same_layer_names(tmp_path, example_dir, capsys):
    require_shared()  # lenet's conv1 meets the example's conv1: the blob check names the file
    _fails(capsys, tmp_path, ["run", example_dir, "--weights", CORPUS / LENET],
           "lenet_iter_10000.caffemodel", "layer 'conv1' (Convolution)")


def test_directory_with_two_caffemodels(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _conv_weights())
    (d / "other.caffemodel").write_bytes(_conv_weights())
    _fails(capsys, tmp_path, ["run", d], str(d), "several caffemodels", "other.caffemodel",
           "w.caffemodel", "--weights")


def test_caffemodel_alone_and_missing_weights(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _conv_weights())
    _fails(capsys, tmp_path, ["inspect", d / "w.caffemodel"], "w.caffemodel",
           "no layer definitions")
    _fails(capsys, tmp_path, ["inspect", d, "--weights", d / "nope.caffemodel"],
           "nope.caffemodel", "no such caffemodel")


# -- NaN/Inf weights: a warning and NaN accounting, never a crash -------------------------------
def _nan_models(tmp_path: Path) -> tuple[Path, Path]:
    w = np.ones((4, 3, 3, 3), np.float32)
    bad = w.copy()
    bad[1, 0, 0, 0], bad[2, 0, 0, 0] = np.nan, np.inf
    return (_model(tmp_path, INPUT + CONV + RELU, _conv_weights(bad), "ref"),
            _model(tmp_path, INPUT + CONV + RELU, _conv_weights(w), "cand"))


def test_nan_weights_are_counted_by_run_and_warned_by_inspect(tmp_path, capsys):
    ref, _ = _nan_models(tmp_path)
    assert main(["inspect", str(ref)]) == 0
    assert "blob 0 in w.caffemodel holds 1 NaN and 1 Inf" in capsys.readouterr().out
    assert main(["run", str(ref), "--input", "randn:1"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "Convolution" in ln)
    cells = [c.strip() for c in row.strip("│ \n").split("│")]
    assert cells[-2:] == ["36", "36"], row  # channel 1 all NaN, channel 2 all Inf (6x6 each)


def test_nan_weights_warning_shown_by_run(tmp_path, capsys):
    ref, _ = _nan_models(tmp_path)
    assert main(["run", str(ref)]) == 0
    captured = capsys.readouterr()
    assert "1 NaN and 1 Inf" in captured.out + captured.err


def test_nan_weights_compare_reports_nan_mismatch(tmp_path, capsys):
    ref, cand = _nan_models(tmp_path)
    out = tmp_path / "report.json"
    assert main(["compare", str(ref), str(cand), "--input", "randn:1", "--json", str(out),
                 "--summary-only"]) == 1
    text = capsys.readouterr().out
    assert "NaN mismatches 36" in text
    pairs = {p["reference"]: p for p in json.loads(out.read_text())["pairs"]}
    assert pairs["conv"]["nan_mismatch"] == 36 and pairs["conv"]["inf_mismatch"] == 36
    assert not pairs["conv"]["passed"]


# -- torch directories and safe loading ----------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pt(path: Path, marker: Path) -> Path:
    import torch

    torch.save(_Payload(marker), path)
    return path


def test_payload_works_when_unpickled(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()


def test_run_evil_pickle_is_not_executed(tmp_path, capsys):
    marker = tmp_path.parent / f"{tmp_path.name}_pwned"
    evil = _evil_pt(tmp_path / "evil.pt", marker)
    _fails(capsys, tmp_path, ["run", evil, "--shape", "1,3,8,8"], "evil.pt", "--trust-pickle")
    assert not marker.exists()


def test_compare_against_evil_dir_is_not_executed(tmp_path, example_dir, capsys):
    marker = tmp_path.parent / f"{tmp_path.name}_pwned"
    d = tmp_path / "evil_dir"
    d.mkdir()
    _evil_pt(d / "model.pt", marker)
    _fails(capsys, tmp_path, ["compare", example_dir, d], "model.pt", "--trust-pickle")
    assert not marker.exists()


def test_evil_state_dict_beside_model_py_is_not_executed(tmp_path, capsys):
    marker = tmp_path.parent / f"{tmp_path.name}_pwned"
    d = tmp_path / "port"
    d.mkdir()
    (d / "model.py").write_text("import torch\nINPUT_SHAPE = (1, 3, 8, 8)\n"
                                "def build():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    _evil_pt(d / "weights.pt", marker)
    _fails(capsys, tmp_path, ["run", d], "weights.pt", "--trust-pickle")
    assert not marker.exists()


def test_evil_pickle_via_process(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_pt(tmp_path / "evil.pt", marker)
    proc = _process("run", evil, "--shape", "1,3,8,8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--trust-pickle" in proc.stderr and not marker.exists()


def _object_trace(tmp_path: Path, marker: Path) -> Path:
    header = {"format": "layerdiff-trace/1", "meta": {}, "inputs": ["data"], "records": []}
    path = tmp_path / "trace.npz"
    np.savez(path, __trace__=np.frombuffer(json.dumps(header).encode(), np.uint8),
             **{"input|data": np.array([_Payload(marker)], dtype=object)})
    return path


def test_trace_with_object_array_is_never_unpickled(tmp_path, example_dir):
    marker = tmp_path / "pwned"
    trace = _object_trace(tmp_path, marker)
    for argv in (["run", trace], ["compare", trace, example_dir]):
        try:
            main([str(a) for a in argv])
        except Exception:  # noqa: BLE001 - a crash is the next test's business
            pass
        assert not marker.exists()


def test_trace_with_object_array_is_refused(tmp_path, capsys):
    trace = _object_trace(tmp_path, tmp_path / "pwned")
    _fails(capsys, tmp_path, ["run", trace], "trace.npz", "Object arrays")


def test_model_py_that_raises(tmp_path, capsys):
    d = tmp_path / "port"
    d.mkdir()
    (d / "model.py").write_text("raise RuntimeError('broken port')\n")
    _fails(capsys, tmp_path, ["run", d, "--shape", "1,3,8,8"], "model.py",
           "importing it raised RuntimeError: broken port")


def test_state_dict_of_another_model(tmp_path, capsys):
    import torch

    d = tmp_path / "port"
    d.mkdir()
    (d / "model.py").write_text("import torch\nINPUT_SHAPE = (1, 3, 8, 8)\n"
                                "def build():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    torch.save({"fc.weight": torch.zeros(3, 3)}, d / "w.pt")
    _fails(capsys, tmp_path, ["run", d], "w.pt", "does not fit", "fc.weight")


def test_torch_dir_with_two_model_files(tmp_path, capsys):
    import torch

    d = tmp_path / "port"
    d.mkdir()
    for name in ("a.pt", "b.pt"):
        torch.save({"w": torch.zeros(1)}, d / name)
    _fails(capsys, tmp_path, ["run", d, "--shape", "1,3,8,8"], "several model files", "a.pt")


def test_torch_model_without_declared_shape(tmp_path, capsys):
    d = tmp_path / "port"
    d.mkdir()
    (d / "model.py").write_text("import torch\ndef build():\n    return torch.nn.ReLU()\n")
    _fails(capsys, tmp_path, ["run", d], "model", "--shape")


def test_model_py_import_leaves_no_pycache(tmp_path):
    d = tmp_path / "port"
    d.mkdir()
    (d / "model.py").write_text("import torch\nINPUT_SHAPE = (1, 3, 8, 8)\n"
                                "def build():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = _process("run", d, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in d.iterdir()) == ["model.py"]


# -- map files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    ("[map\n", ["line 1"]),
    ("[mapp]\n", ["unknown key(s) ['mapp']"]),
    ('[map]\n"re:(conv" = "x"\n', ["map entry 're:(conv'", "bad regex"]),
    ('ignore_ref = ["re:[a"]\n', ["ignore_ref entry 're:[a'", "bad regex"]),
    ('[tolerance."re:*x"]\natol = 1\n', ["tolerance.'re:*x'", "bad regex"]),
    ('[map]\n"glob:conv*" = "features.{3}"\n', ["'features.{3}'", "does not format"]),
    ('[map]\n"re:res(\\\\d)" = "layer{2}"\n', ["'layer{2}'", "{1}"]),
    ("map = 3\n", ["'map' must be a TOML table"]),
    ('[map]\n"conv1" = 3\n', ["map entry 'conv1'"]),
    ('[tolerance.conv1]\natol = "big"\n', ["tolerance.'conv1'", "atol/rtol"]),
    ('ignore_cand = "relu"\n', ["ignore_cand must be a list"]),
])
def test_bad_map_file(tmp_path, example_dir, capsys, text, needles):
    mp = tmp_path / "map.toml"
    mp.write_text(text)
    _fails(capsys, tmp_path, ["compare", example_dir, example_dir, "--map", mp], "map.toml",
           *needles)


def test_map_file_not_utf8(tmp_path, example_dir, capsys):
    mp = tmp_path / "map.toml"
    mp.write_bytes(b"\xff\xfe[map]\n")
    _fails(capsys, tmp_path, ["align", example_dir, example_dir, "--map", mp], "map.toml",
           "UTF-8")


def test_bad_map_via_process(tmp_path):
    from layerdiff.examples import write_example

    write_example(tmp_path / "ex")
    mp = tmp_path / "map.toml"
    mp.write_text('ignore_ref = ["re:(x"]\n')
    proc = _process("compare", tmp_path / "ex", tmp_path / "ex", "--map", mp)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "bad regex" in proc.stderr


# -- input specs -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, needle", [
    ("data=bogus", "'bogus' does not parse"),
    ("randn:-1", "seed -1 is negative"),
    ("const:nan", "nan is not a finite number"),
    ("uniform:-inf,1", "-inf is not a finite number"),
    ("uniform:-1e308,1e308", "finite HI - LO"),
    ("nope=randn", "unknown input(s) ['nope']"),
])
def test_bad_input_spec(tmp_path, example_dir, capsys, spec, needle):
    _fails(capsys, tmp_path, ["run", example_dir, "--input", spec], needle)


@pytest.mark.parametrize("shape, needle", [
    ((3, 32, 32), "has 3 dims, model input 'data' has 4"),
    ((1, 1, 32, 32), "has 1 channels (axis 1), model input 'data' has 3"),
])
def test_npy_input_of_wrong_shape(tmp_path, example_dir, capsys, shape, needle):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(shape, np.float32))
    _fails(capsys, tmp_path, ["run", example_dir, "--input", f"npy:{x}"], "x.npy", needle)


def test_npy_input_object_array_and_missing(tmp_path, example_dir, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _fails(capsys, tmp_path, ["run", example_dir, "--input", f"npy:{x}"], "x.npy",
           "Object arrays")
    _fails(capsys, tmp_path, ["run", example_dir, "--input", f"npy:{tmp_path / 'no.npy'}"],
           "no.npy", "no such file")


def test_npy_input_other_batch_and_size_still_accepted(tmp_path, example_dir, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 3, 16, 16), np.float32))
    assert main(["run", str(example_dir), "--input", f"npy:{x}"]) == 0
    assert "2x3x16x16" in capsys.readouterr().out


# -- CLI flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, needles", [
    ("1,3,32", ["--shape 1,3,32 has 3 dims", "declared with 4"]),
    ("1,3,32,32,1", ["has 5 dims"]),
    ("foo=1,3,32,32", ["unknown input(s) ['foo']"]),
    ("100000,3,100000,32", ["input 'data'", "absurdly large"]),
    ("1,3,99999999999999999999999,2", ["absurdly large"]),
])
def test_bad_shape_flag(tmp_path, example_dir, capsys, shape, needles):
    _fails(capsys, tmp_path, ["run", example_dir, "--shape", shape], *needles)


def test_absurd_shape_via_process(tmp_path):
    from layerdiff.examples import write_example

    write_example(tmp_path / "ex")
    proc = _process("run", tmp_path / "ex", "--shape", "100000,3,100000,32")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "absurdly large" in proc.stderr


def test_float16_for_a_caffe_model(tmp_path, example_dir, capsys):
    _fails(capsys, tmp_path, ["run", example_dir, "--dtype", "float16"], "float16",
           "float32 or float64")


def test_bfloat16_for_a_caffe_model(tmp_path, example_dir, capsys):
    _fails(capsys, tmp_path, ["run", example_dir, "--dtype", "bfloat16"], "bfloat16",
           "float32 or float64")


@pytest.mark.parametrize("flag", ["--csv", "--json", "--markdown"])
def test_compare_output_file_exists(tmp_path, example_dir, capsys, flag):
    target = tmp_path / "keep.out"
    target.write_text("user data")
    _fails(capsys, tmp_path, ["compare", example_dir, example_dir, flag, target], "keep.out",
           "--force")
    assert target.read_text() == "user data"
    assert main(["compare", str(example_dir), str(example_dir), flag, str(target),
                 "--force", "--summary-only"]) == 0
    assert target.read_text() != "user data"


def test_write_map_exists(tmp_path, example_dir, capsys):
    target = tmp_path / "map.toml"
    target.write_text("# mine\n")
    _fails(capsys, tmp_path, ["align", example_dir, example_dir, "--write-map", target],
           "map.toml", "--force")


def test_save_into_missing_directory(tmp_path, example_dir, capsys):
    _fails(capsys, tmp_path, ["run", example_dir, "--save", tmp_path / "nodir" / "t.npz"],
           "nodir")


def test_stream_into_existing_file(tmp_path, example_dir, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    _fails(capsys, tmp_path, ["run", example_dir, "--stream", target], "file")


def test_error_text_is_not_rich_markup(tmp_path, example_dir, capsys):
    _fails(capsys, tmp_path, ["run", example_dir, "--input", "[red]x"], "'[red]x'")


def test_example_into_non_empty_directory(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    _fails(capsys, tmp_path, ["example", tmp_path], str(tmp_path), "not an empty directory")


def test_inspect_refuses_non_caffe(tmp_path, capsys):
    t = tmp_path / "t.npz"
    t.write_bytes(b"x")
    _fails(capsys, tmp_path, ["inspect", t], "t.npz", "reads Caffe models")


def test_compare_unknown_file_kind(tmp_path, example_dir, capsys):
    f = tmp_path / "model.tflite"  # (.onnx is a model format now: tests/test_onnx_bad_input.py)
    f.write_bytes(b"\x08\x07")
    _fails(capsys, tmp_path, ["compare", example_dir, f], "model.tflite",
           "cannot tell the model format")


def test_corrupt_trace_file(tmp_path, example_dir, capsys):
    t = tmp_path / "t.npz"
    t.write_bytes(b"PK\x03\x04 not really a zip")
    _fails(capsys, tmp_path, ["compare", t, example_dir], "t.npz", "not a readable")

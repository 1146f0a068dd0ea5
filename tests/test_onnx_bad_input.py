"""Bad ONNX input: each refusal is exit 2 and one line naming the file (or input), no traceback,
the user's files untouched. Also: without the onnx extra, an ONNX path says how to install it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cli_checks import cli_fails
from onnx_ports import require_onnx, small_graph

onnx = require_onnx()


def _fails(capsys, tmp_path: Path, argv: list, *needles) -> str:
    return cli_fails(capsys, argv, *needles, untouched=tmp_path)


def test_truncated_file(tmp_path, capsys):
    good = small_graph(tmp_path / "good.onnx")
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(good.read_bytes()[:200])
    _fails(capsys, tmp_path, ["run", bad], "cut.onnx", "ONNX model")


def test_bytes_that_hold_no_graph(tmp_path, capsys, example_dir):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\x08\x07")  # a ModelProto with ir_version 7 and nothing else
    _fails(capsys, tmp_path, ["compare", example_dir, f], "model.onnx", "no nodes")


def test_corrupt_bytes(tmp_path, capsys):
    bad = tmp_path / "noise.onnx"
    bad.write_bytes(bytes(range(256)) * 8)
    _fails(capsys, tmp_path, ["inspect", bad], "noise.onnx")


def test_missing_external_data(tmp_path, capsys):
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(small_graph(tmp_path / "src.onnx")))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin",
                                   size_threshold=0)
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"))
    (tmp_path / "src.onnx").unlink()
    assert (folder / "w.bin").is_file()
    # with its data the folder runs
    from layerdiff.cli import main

    assert main(["run", str(folder)]) == 0
    capsys.readouterr()
    (folder / "w.bin").unlink()
    _fails(capsys, tmp_path, ["run", folder / "m.onnx"], "m.onnx", "w.bin", "missing")


def test_op_onnxruntime_lacks(tmp_path, capsys):
    path = small_graph(tmp_path / "m.onnx", domain_op=True)
    _fails(capsys, tmp_path, ["run", path], "m.onnx", "onnxruntime cannot run")


def test_input_name_matches_nothing(tmp_path, capsys):
    path = small_graph(tmp_path / "m.onnx")
    _fails(capsys, tmp_path, ["run", path, "--input", "nope=randn:0"], "nope", "'x'")
    _fails(capsys, tmp_path, ["run", path, "--shape", "nope=1,3,8,8"], "nope", "m.onnx")


def test_folder_with_two_models(tmp_path, capsys):
    small_graph(tmp_path / "a.onnx")
    small_graph(tmp_path / "b.onnx")
    _fails(capsys, tmp_path, ["run", tmp_path], "exactly one .onnx", "a.onnx, b.onnx")


def test_audit_refuses_an_onnx_candidate(tmp_path, capsys, example_dir):
    path = small_graph(tmp_path / "m.onnx")
    _fails(capsys, tmp_path, ["audit", example_dir, path], "m.onnx", "layerdiff compare")


def test_dtype_does_not_apply(tmp_path, capsys):
    path = small_graph(tmp_path / "m.onnx")
    _fails(capsys, tmp_path, ["run", path, "--dtype", "float64"], "m.onnx", "--dtype float64")


def test_without_the_extra_installed(tmp_path, capsys, monkeypatch):
    path = small_graph(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for argv in (["run", path], ["inspect", path], ["compare", path, path]):
        _fails(capsys, tmp_path, argv, "pip install layerdiff[onnx]")


@pytest.mark.parametrize("argv", [["compare", "{m}", "{m}", "--cand-onnx-optimize", "bogus"]])
def test_bad_optimize_level_is_a_usage_error(tmp_path, capsys, argv):
    from layerdiff.cli import main

    path = small_graph(tmp_path / "m.onnx")
    with pytest.raises(SystemExit) as e:
        main([a.format(m=path) for a in argv])
    assert e.value.code == 2

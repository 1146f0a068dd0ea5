"""Bad input ends in one clear line naming the file and line/layer/field, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_checks import cli_fails

from layerdiff.cli import main

INPUT = ('layer { name: "in" type: "Input" top: "data" '
         'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n')
CONV = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        'convolution_param { num_output: 4 kernel_size: 3 } }\n')


def _fails(capsys, argv, *needles):
    return cli_fails(capsys, argv, *needles)


def _model(tmp_path, text, weights: bytes | None = None):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "deploy.prototxt").write_text(text)
    if weights is not None:
        (d / "w.caffemodel").write_bytes(weights)
    return d


def _conv_weights(shape=(4, 3, 3, 3), n_blobs=2) -> bytes:
    import numpy as np

    from layerdiff.examples import caffemodel_bytes

    blobs = [np.ones(shape, np.float32), np.zeros(shape[0], np.float32)][:n_blobs]
    return caffemodel_bytes({"conv": blobs}, {"conv": "Convolution"})


def test_missing_path(tmp_path, capsys):
    _fails(capsys, ["inspect", str(tmp_path / "nope")], "nope", "no such file")


def test_no_prototxt(tmp_path, capsys):
    _fails(capsys, ["inspect", str(tmp_path)], str(tmp_path), "no .prototxt")


def test_several_prototxts_none_deploy(tmp_path, capsys):
    (tmp_path / "a.prototxt").write_text(INPUT)
    (tmp_path / "b.prototxt").write_text(INPUT)
    _fails(capsys, ["inspect", str(tmp_path)], "a.prototxt", "b.prototxt", "--prototxt")


def test_syntax_error_names_line_and_column(tmp_path, capsys):
    d = _model(tmp_path, INPUT + 'layer { name: "x" type: "ReLU" bottom: "data" top: "x" \n')
    _fails(capsys, ["inspect", str(d)], "deploy.prototxt:2:", "Expected")


def test_unknown_field(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV.replace("kernel_size", "kernel_sise"))
    _fails(capsys, ["inspect", str(d)], "deploy.prototxt:2:", "kernel_sise")


def test_unknown_layer_param(tmp_path, capsys):
    d = _model(tmp_path, INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" '
                                 'relu_parameter { negative_slope: 0.1 } }\n')
    _fails(capsys, ["inspect", str(d)], "deploy.prototxt:2:", "relu_parameter")


def test_truncated_caffemodel(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _conv_weights()[:-7])
    _fails(capsys, ["inspect", str(d)], "w.caffemodel", "truncated")


def test_corrupt_caffemodel(tmp_path, capsys):
    data = bytearray(_conv_weights())
    data[0] = 0xFF  # wire type 7 does not exist
    d = _model(tmp_path, INPUT + CONV, bytes(data))
    _fails(capsys, ["inspect", str(d)], "w.caffemodel")


def test_png_is_not_a_caffemodel(tmp_path, capsys):
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"
           b"\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00")
    d = _model(tmp_path, INPUT + CONV, png)
    _fails(capsys, ["inspect", str(d)], "w.caffemodel", "not a Caffe model")


def test_blob_count_mismatch(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _conv_weights(n_blobs=1))
    _fails(capsys, ["inspect", str(d)], "conv", "Convolution", "1 blob")


def test_blob_shape_mismatch(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV, _conv_weights(shape=(4, 3, 5, 5)))
    _fails(capsys, ["inspect", str(d)], "conv", "[4, 3, 5, 5]", "[4, 3, 3, 3]")


def test_bottom_never_produced(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV.replace('bottom: "data"', 'bottom: "dta"'))
    _fails(capsys, ["inspect", str(d)], "deploy.prototxt", "conv", "'dta'")


def test_duplicate_top_not_in_place(tmp_path, capsys):
    d = _model(tmp_path, INPUT + CONV + CONV.replace('name: "conv"', 'name: "conv2"'))
    _fails(capsys, ["inspect", str(d)], "conv2", "top 'conv'")


def test_bad_input_spec(example_dir, capsys):
    _fails(capsys, ["run", str(example_dir), "--input", "onez:0.5"], "onez:0.5")


def test_bad_shape(example_dir, capsys):
    _fails(capsys, ["run", str(example_dir), "--shape", "1,three"], "--shape")


def test_save_refuses_to_overwrite(example_dir, tmp_path, capsys):
    target = tmp_path / "keep.npz"
    target.write_bytes(b"user data")
    _fails(capsys, ["run", str(example_dir), "--save", str(target)], "keep.npz", "--force")
    assert target.read_bytes() == b"user data"


def test_cli_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "layerdiff", "inspect", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such file" in proc.stderr


@pytest.mark.parametrize("argv", [["inspect", "--help"], ["run", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0

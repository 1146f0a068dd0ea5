"""The wheel ships adapters/ as layerdiff.adapters, never as a top-level `adapters` package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_file_list(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(tmp_path.glob("layerdiff-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "layerdiff/adapters/__init__.py" in names
    assert "layerdiff/adapters/caffe.py" in names
    assert "layerdiff/caffe/caffe_pb2.py" in names and "layerdiff/caffe/caffe.proto" in names
    assert not [n for n in names if n.startswith("adapters/")], "top-level adapters/ shipped"
    for init in sorted((ROOT / "layerdiff").rglob("__init__.py")):  # no subpackage left out
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel (add it to pyproject packages)"
    for mod in sorted((ROOT / "adapters").glob("*.py")):
        assert f"layerdiff/adapters/{mod.name}" in names
    assert not [n for n in names if n.startswith("tests/")]
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "layerdiff = layerdiff.cli:main" in zipfile.ZipFile(wheels[0]).read(
        entry[0]).decode()


def test_generated_schema_is_up_to_date(tmp_path):
    """caffe_pb2.py is what the documented command produces from caffe.proto."""
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "layerdiff/caffe"),
         f"--python_out={tmp_path}", str(ROOT / "layerdiff/caffe/caffe.proto")],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    fresh = (tmp_path / "caffe_pb2.py").read_text()
    assert fresh == (ROOT / "layerdiff/caffe/caffe_pb2.py").read_text()

"""--trust-pickle on a real converter layout: a whole pickled module plus its class's file."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from layerdiff.adapters.torch_load import load_torch

from layerdiff.errors import ModelFormatError

MAIN_MODEL = textwrap.dedent("""
    import torch


    class KitModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.relu(self.fc(x)) * 2
""")


def _mmdnn_folder(tmp_path: Path) -> Path:
    """model.pt (torch.save of the whole module) beside MainModel.py, as MMdnn writes them."""
    folder = tmp_path / "port"
    folder.mkdir()
    (folder / "MainModel.py").write_text(MAIN_MODEL)
    spec = importlib.util.spec_from_file_location("MainModel", folder / "MainModel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["MainModel"] = module  # pickle records the class as MainModel.KitModel
    try:
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        torch.save(module.KitModel(), folder / "model.pt")
    finally:
        del sys.modules["MainModel"]
    return folder


def test_whole_pickled_module_loads_with_its_class_file_beside_it(tmp_path):
    folder = _mmdnn_folder(tmp_path)
    before = list(sys.path)
    files = sorted(p.name for p in folder.iterdir())
    try:
        model = load_torch(folder, trust_pickle=True)
        assert type(model).__name__ == "KitModel"
        x = torch.ones(2, 4)
        expected = torch.relu(model.fc(x)) * 2
        assert torch.equal(model(x), expected)
    finally:
        sys.modules.pop("MainModel", None)
    assert sys.path == before  # the folder was on sys.path only while unpickling
    assert sorted(p.name for p in folder.iterdir()) == files  # no __pycache__ left behind


def test_whole_pickled_module_still_refused_without_trust(tmp_path):
    folder = _mmdnn_folder(tmp_path)
    with pytest.raises(ModelFormatError, match="--trust-pickle") as e:
        load_torch(folder / "model.pt")
    assert "MainModel" in str(e.value)
    assert "MainModel" not in sys.modules

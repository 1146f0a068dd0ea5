"""``compare --repro DIR``: the first diverging layer as a standalone reproduction.

Writes, for the first divergence: its reference inputs (``input_<k>.npy``), the reference and
candidate outputs (``ref_output.npy``, ``cand_output.npy`` and, when the candidate could be
re-run on the reference's inputs, ``local_output.npy``); for a Caffe reference a one-layer
``layer.prototxt`` (+ ``layer.caffemodel`` with its blobs); for a torch candidate
``module_state.pt`` (a state_dict, loadable with ``weights_only=True``) and ``repro.py``, a
script that rebuilds the module, runs it on the inputs and prints the error against Caffe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf import text_format

from layerdiff.errors import LayerdiffError

if TYPE_CHECKING:
    from layerdiff.comparator import PairResult, Report


def write_repro(report: Report, out_dir: str | Path, result: PairResult | None = None) -> Path:
    """Write the reproduction of ``result`` (default: the first divergence) into ``out_dir``."""
    res = result or report.first_divergence
    if res is None:
        raise LayerdiffError("--repro: nothing diverges, so there is nothing to reproduce")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LayerdiffError(f"{out}: exists and is not an empty directory; choose another")
    out.mkdir(parents=True, exist_ok=True)
    pair = res.pair
    first = pair.ref[0]
    inputs = [report.reference.value_before(b, first.index) for b in first.bottoms]
    for k, x in enumerate(inputs):
        if x is not None:
            np.save(out / f"input_{k}.npy", np.asarray(x))
    np.save(out / "ref_output.npy", np.asarray(pair.ref_output))
    np.save(out / "cand_output.npy", np.asarray(pair.cand_output))
    from layerdiff.diagnose import layer_cases

    case = next((c for c in layer_cases(report) if c.result is res), None)
    if case is not None and case.local_output is not None:
        np.save(out / "local_output.npy", case.local_output)
    _write_caffe_layer(out, pair, inputs)
    _write_torch_snippet(out, pair, len(inputs))
    (out / "README.txt").write_text(
        f"layerdiff reproduction of {pair.ref_name} <-> {pair.cand_name}\n"
        f"max abs error {res.metrics.max_abs:.6g} (tolerance {res.tolerance:.3g})\n"
        "input_<k>.npy: the reference's inputs to this layer; ref_output.npy: the reference "
        "output;\ncand_output.npy: the candidate's output in the full run; local_output.npy: "
        "the candidate\nlayer re-run on input_<k>.npy. layer.prototxt/.caffemodel: the Caffe "
        "layer alone;\nrepro.py: the torch module alone (python repro.py).\n")
    return out


def _write_caffe_layer(out: Path, pair, inputs) -> None:
    layers = [r.handle.layer for r in pair.ref if hasattr(r.handle, "layer")]
    if not layers:
        return
    from layerdiff.caffe import caffe_pb2
    from layerdiff.examples import caffemodel_bytes

    net = caffe_pb2.NetParameter(name=f"repro_{layers[0].name}")
    inp = net.layer.add(name="input", type="Input")
    for b, x in zip(layers[0].bottoms, inputs, strict=False):
        inp.top.append(b)
        inp.input_param.shape.add().dim.extend(np.shape(x))
    blobs, types = {}, {}
    for lay in layers:
        lp = net.layer.add()
        lp.CopyFrom(lay.param)
        del lp.blobs[:]
        if lay.blobs:
            blobs[lay.name] = [np.asarray(b.data, np.float32).reshape(b.shape) for b in lay.blobs]
            types[lay.name] = lay.type
    (out / "layer.prototxt").write_text(text_format.MessageToString(net))
    if blobs:
        (out / "layer.caffemodel").write_bytes(caffemodel_bytes(blobs, types))


def _write_torch_snippet(out: Path, pair, n_inputs: int) -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    mods = [getattr(c.handle, "fn", None) for c in pair.cand]
    mods = [m for m in mods if isinstance(m, torch.nn.Module)]
    if len(mods) != 1:
        return
    mod = mods[0]
    torch.save(mod.state_dict(), out / "module_state.pt")
    ctor = repr(mod)
    ctor_line = f"module = torch.nn.{ctor}" if "\n" not in ctor else (
        "module = ...  # rebuild your module here; its repr was:\n" +
        "\n".join(f"# {line}" for line in ctor.splitlines()))
    args = ", ".join(f"torch.from_numpy(np.load('input_{k}.npy'))" for k in range(n_inputs))
    (out / "repro.py").write_text(
        "import numpy as np\nimport torch\n\n"
        f"{ctor_line}\n"
        "module.load_state_dict(torch.load('module_state.pt', weights_only=True))\n"
        "module.eval()\nwith torch.no_grad():\n"
        f"    got = module({args}).numpy()\n"
        "ref = np.load('ref_output.npy')\n"
        "print('max abs error vs Caffe:', float(np.abs(got.reshape(ref.shape) - ref).max()))\n")

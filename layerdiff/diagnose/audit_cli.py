"""``layerdiff audit REF CAND``: does every Caffe blob reach the torch port? (No forward pass.)

Exit codes: 0 every blob maps equal; 1 a transform, a difference or an unmapped tensor was
found; 2 an input error (raised as :class:`LayerdiffError`, printed by the CLI's ``main``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from layerdiff.diagnose.audit import (
    RTOL,
    AuditResult,
    RefLayer,
    audit_layers,
    cand_from_module,
    cand_from_trace,
    ref_layers_from_net,
    ref_layers_from_trace,
    render_audit,
    storage_dtype,
)
from layerdiff.errors import LayerdiffError, ModelFormatError


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "audit", help="check that every Caffe blob reached the torch port (no forward pass)",
        description="Tie every Caffe blob to one torch parameter or buffer and say whether it "
                    "is equal, or equal up to a known porting mistake (transposed, kernel "
                    "flipped, BGR/RGB, HWC flatten order, BatchNorm scale factor not divided, "
                    "swapped pairs, Scale not merged, missing bias). Exit 0 when all blobs map "
                    "equal, 1 otherwise.")
    p.add_argument("reference", nargs="?",
                   help="Caffe model directory or prototxt (or a Caffe trace .npz)")
    p.add_argument("candidate", help="torch model (directory with model.py, .pt2, a state_dict "
                   ".pt/.pth) or a torch trace .npz")
    p.add_argument("--prototxt", help="Caffe deploy prototxt (instead of finding it in REF)")
    p.add_argument("--weights", help="Caffe .caffemodel (instead of finding it in REF)")
    p.add_argument("--cand-weights", help="torch state_dict to load into CAND's model.py")
    p.add_argument("--shape", help="input shape N,C,H,W (for the HWC check after a flatten)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled torch module (runs code from the file)")
    p.add_argument("--all", action="store_true", help="list every blob, not only problems")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_audit)
    return p


def cmd_audit(args: argparse.Namespace) -> int:
    ref = args.reference or args.prototxt
    if ref is None:
        raise LayerdiffError("no reference given: pass a Caffe model directory or --prototxt")
    layers = load_reference(ref, args)
    params, kinds, dtype = load_candidate(args.candidate, args)
    if not params:
        raise LayerdiffError(f"{args.candidate}: no parameters or buffers to audit")
    result = audit_layers(layers, params, cand_kinds=kinds, rtol=RTOL.get(dtype, 1e-5))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        _console().print(render_audit(result, all_rows=args.all))
    return 0 if result.ok else 1


def load_reference(path: str, args: argparse.Namespace) -> list[RefLayer]:
    """The Caffe layers with blobs, from a model (prototxt + caffemodel) or a Caffe trace."""
    if Path(path).suffix == ".npz":
        from layerdiff.trace import Trace

        trace = Trace.load(path)
        layers = ref_layers_from_trace(trace)
        if not layers:
            raise ModelFormatError(f"{path}: the trace holds no Caffe blobs (params '0', '1', "
                                   "...): save it from a Caffe model with weights")
        return layers
    from layerdiff.inputs import parse_shape
    from layerdiff.sources import ModelOptions, load_caffe_model

    opts = ModelOptions(prototxt=args.prototxt, weights=args.weights,
                        shape=parse_shape(args.shape) if args.shape else None)
    net = load_caffe_model(path, opts)
    if net.weights is None and not any(lay.blobs for lay in net.layers):
        raise ModelFormatError(f"{path}: no caffemodel: the audit needs the Caffe blobs "
                               "(pass --weights)")
    layers = ref_layers_from_net(net)
    if not layers:
        raise ModelFormatError(f"{path}: no layer of this Caffe model has blobs to audit")
    return layers


def load_candidate(path: str, args: argparse.Namespace
                   ) -> tuple[dict[str, Any], dict[str, str], str]:
    """(state_dict-like params, module kinds, storage dtype) of a torch model or trace."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if p.suffix == ".npz":
        from layerdiff.trace import Trace

        trace = Trace.load(p)
        params, kinds = cand_from_trace(trace)
        return params, kinds, str(trace.meta.get("dtype", "float32"))
    if p.suffix == ".onnx" or (p.is_dir() and any(p.glob("*.onnx"))
                               and not (p / "model.py").is_file()):
        raise ModelFormatError(f"{p}: audit reads torch candidates; for an ONNX model run "
                               "`layerdiff compare REF MODEL.onnx` (its findings name the "
                               "initializers)")
    if p.is_file() and p.suffix in (".pt", ".pth"):
        sd = _state_dict_file(p)
        if sd is not None:
            return sd, {}, storage_dtype(sd)
    from layerdiff.adapters.torch import load_torch

    module = load_torch(p, trust_pickle=args.trust_pickle, weights=args.cand_weights)
    params, kinds = cand_from_module(module)
    return params, kinds, storage_dtype(params)


def _state_dict_file(p: Path) -> dict[str, Any] | None:
    """A bare state_dict (or a checkpoint wrapping one), loaded without running pickled code;
    None when the file holds something else (a whole module, an archive)."""
    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain state_dict: load_torch says why
        return None
    for _ in range(3):  # training checkpoints: {"state_dict": {...}, "epoch": ...}
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor)
                                                 for v in obj.values()):
            return obj
        if not isinstance(obj, dict):
            return None
        obj = next((obj[k] for k in ("state_dict", "model_state_dict", "model", "net")
                    if isinstance(obj.get(k), dict)), None)
    return None


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else
                   int(os.environ.get("COLUMNS", "160")))


__all__ = ["AuditResult", "add_audit_parser", "cmd_audit", "load_candidate", "load_reference"]

"""Re-run one aligned candidate group on other inputs (the reference's, or a probe's).

Records' ``handle`` objects (a :class:`layerdiff.engine.runner.CaffeCall`, a torch
``TorchCall``) share one protocol: ``handle.run(*inputs) -> list[np.ndarray]``. The verdict uses
this for a pair's local error (the candidate fed the reference's own inputs); the diagnosis uses
it for counterfactual re-runs with a modified record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from layerdiff.trace import Record, Trace


def reference_inputs(trace: Trace, group: Sequence[Record]) -> list[np.ndarray] | None:
    """The values the reference group's first record read, or None when one is unknown."""
    first = group[0]
    values = [trace.value_before(b, first.index) for b in first.bottoms]
    if not values or any(v is None for v in values):
        return None
    return [np.asarray(v) for v in values]


def rerun_group(records: Sequence[Record], inputs: Sequence[np.ndarray],
                replace: dict[int, Callable[..., Any]] | None = None) -> np.ndarray | None:
    """Run ``records`` in order on ``inputs``; the group's final output.

    ``replace`` maps a position in the group to a callable used instead of that record. None
    when some record cannot be re-run (no handle, or it raises on these inputs).
    """
    xs = list(inputs)
    out = None
    for k, rec in enumerate(records):
        fn = (replace or {}).get(k)
        try:
            if fn is not None:
                out = _call(fn, xs)
            elif rec.handle is not None and hasattr(rec.handle, "run"):
                n = _arity(rec)
                out = rec.handle.run(*xs[:n])[0] if k == 0 else rec.handle.run(xs[0])[0]
            else:
                return None
        except Exception:  # noqa: BLE001 - a re-run that cannot run measures nothing
            return None
        xs = [np.asarray(out)]
    return None if out is None else np.asarray(out)


def _arity(rec: Record) -> int:
    tops = getattr(rec.handle, "input_tops", None)
    if tops is not None:
        return max(1, len(tops))
    return max(1, len(rec.bottoms))


def _call(fn: Any, xs: list[np.ndarray]) -> np.ndarray:
    """Call a replacement: a torch module gets torch tensors, anything else numpy arrays."""
    torch = _torch_if_loaded()
    if torch is not None and isinstance(fn, torch.nn.Module):
        param = next(iter(fn.parameters()), None)
        if param is None:
            param = next(iter(fn.buffers()), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            out = fn(*[torch.as_tensor(np.array(x)).to(device, dtype) for x in xs])
        return out.detach().float().cpu().numpy()
    return np.asarray(fn(*xs))


def _torch_if_loaded() -> Any:
    """torch when something already imported it (a module replacement implies it was)."""
    import sys

    return sys.modules.get("torch")

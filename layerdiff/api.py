"""The face: compare, then diagnose. What the CLI and ``layerdiff.compare`` run.

The verdict (``comparator``) never imports the diagnosis; this module puts the two together.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from layerdiff.align import MapFile
from layerdiff.comparator import DEFAULT_ATOL, DEFAULT_RTOL, Report
from layerdiff.comparator import compare as verdict


def compare(
    reference: Any,
    candidate: Any,
    input: str | list[str] | dict[str, np.ndarray] | None = None,  # noqa: A002 - the CLI's name
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    map: str | Path | MapFile | None = None,  # noqa: A002
    noise_floor: bool = True,
    fail_fast: bool = False,
    diagnose: bool = True,
    ref_options: Any = None,
    cand_options: Any = None,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> Report:
    """Compare two models (or saved traces) layer by layer, then say why they disagree.

    ``reference``/``candidate``: a path (Caffe model dir or prototxt, torch model, trace
    ``.npz``), a :class:`Trace`, a :class:`CaffeNet` or a ``torch.nn.Module``. ``input``: specs
    like ``"ones:0.5"`` (shapes from the reference) or ``{name: array}``. With ``diagnose``
    (default) ``report.findings`` holds the causes that a counterfactual re-run proves.
    """
    report = verdict(reference, candidate, input, atol=atol, rtol=rtol, map=map,
                     noise_floor=noise_floor, fail_fast=fail_fast, ref_options=ref_options,
                     cand_options=cand_options, progress=progress)
    if diagnose:
        from layerdiff.diagnose import diagnose as run_diagnosis

        run_diagnosis(report)
    return report


def _fix_port(report: Report, out_dir: str | Path, force: bool = False) -> Any:
    from layerdiff.fix import fix_port

    return fix_port(report, out_dir, force=force)


# ``report.fix(dir)``: the verdict's Report may not import the fix package (it sits above it).
Report.fixer = _fix_port

__all__ = ["compare"]

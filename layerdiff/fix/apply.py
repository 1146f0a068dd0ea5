"""Apply findings' patches to a freshly loaded candidate and sort each statement by what it
changed: tensor values only (weight-level: they go into the new state dict) or anything else
(code-level: module attributes, the train/eval mode, new or reshaped parameters; they are
replayed by the repaired model.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from layerdiff.diagnose.finding import Finding
from layerdiff.errors import LayerdiffError

_PLAIN = (bool, int, float, str, type(None))


@dataclass
class AppliedFix:
    """One finding's patch as applied: which statements were weight- or code-level."""

    finding: Finding
    weight_lines: list[str] = field(default_factory=list)
    code_lines: list[str] = field(default_factory=list)
    #: statements that changed nothing
    noop_lines: list[str] = field(default_factory=list)

    @property
    def level(self) -> str:
        if self.code_lines:
            return "code" if not self.weight_lines else "code+weights"
        return "weights" if self.weight_lines else "no change"


def patchable(findings: list[Finding]) -> tuple[list[Finding], list[Finding]]:
    """(findings with a patch, in report order; findings needing a manual fix). A finding
    whose every statement an earlier patch already holds (the audit's patch for all
    BatchNorms, then each layer's own finding) is covered by it and dropped."""
    auto: list[Finding] = []
    manual: list[Finding] = []
    seen: set[str] = set()
    for f in findings:
        if f.kind == "probe_error":
            continue
        if f.patch:
            lines = {ln for ln in f.patch.splitlines() if ln.strip()}
            if not lines <= seen:
                seen |= lines
                auto.append(f)
        elif f.fix:
            manual.append(f)
    return auto, manual


def apply_patches(model: nn.Module, findings: list[Finding]) -> list[AppliedFix]:
    """Run every finding's patch on ``model`` (in place), one statement at a time."""
    done = []
    for f in findings:
        applied = AppliedFix(f)
        for line in (ln for ln in f.patch.splitlines() if ln.strip()):
            before = _snapshot(model)
            run_patch_line(model, line, f.patch_arrays, f.kind)
            after = _snapshot(model)
            if after == before:
                applied.noop_lines.append(line)
            elif after.structure == before.structure:
                applied.weight_lines.append(line)
            else:
                applied.code_lines.append(line)
        done.append(applied)
    return done


def run_patch_line(model: nn.Module, line: str, arrays: dict[str, Any], kind: str) -> None:
    scope = {"model": model, "torch": torch, "np": np,
             "arrays": {k: np.asarray(v) for k, v in arrays.items()}}
    try:
        with torch.no_grad():
            exec(compile(line, f"<fix {kind}>", "exec"), scope)  # noqa: S102 - our own patch
    except Exception as e:  # noqa: BLE001 - the port differs from what the probe saw
        raise LayerdiffError(f"the fix for {kind} does not apply to the freshly loaded "
                             f"candidate ({type(e).__name__}: {e}): {line}") from None


@dataclass(eq=False)
class _Snapshot:
    structure: tuple
    values: dict[str, tuple[int, int]]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Snapshot) and self.structure == other.structure and \
            self.values == other.values


def _snapshot(model: nn.Module) -> _Snapshot:
    """What a patch can change: module classes, plain attributes and modes (structure), the
    state dict's keys/shapes/dtypes (structure) and its values."""
    mods = []
    for name, m in model.named_modules():
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and _plain(v)))
        mods.append((name, type(m).__qualname__, m.training, attrs))
    sd = model.state_dict(keep_vars=True)
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sd.items())
    # Storage address and in-place version counter: a change without copying every tensor.
    values = {k: (v.data_ptr(), v._version) for k, v in sd.items()}
    return _Snapshot((tuple(mods), shapes), values)


def _plain(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return isinstance(v, _PLAIN)

"""A diagnosis finding: the cause, the numbers that prove it, the fix, and how much it explains."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Finding:
    #: short machine name of the cause, e.g. ``bn_scale_factor``
    kind: str
    #: the aligned pair it is about (reference name <-> candidate name), or "" for model-wide
    layer: str
    #: one sentence: what is wrong
    cause: str
    #: the numbers that prove it (values, names, before/after errors)
    evidence: str
    #: the line of code that fixes it in the candidate
    fix: str
    #: fraction of the layer's error the fix removes (1.0 = all of it; None if not measured)
    explained: float | None = None
    #: error before and after applying the fix in a re-run (absolute max error)
    error_before: float | None = None
    error_after: float | None = None
    #: which probe produced it
    probe: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Ranking: measured explanations first, by how much they explain."""
        return -1.0 if self.explained is None else self.explained

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

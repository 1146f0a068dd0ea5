"""A diagnosis finding: the cause, the numbers that prove it, the fix, and how much it explains."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
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
    #: the fix as executable Python over a variable ``model`` (names ``torch``, ``np`` and
    #: ``arrays`` in scope), or "" when no safe automatic patch exists (see layerdiff.fix)
    patch: str = ""
    #: values the patch copies in, by name (``arrays["..."]``)
    patch_arrays: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def score(self) -> float:
        """Ranking: measured explanations first, by how much they explain."""
        return -1.0 if self.explained is None else self.explained

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, patch_arrays={}))
        out["patch_arrays"] = sorted(self.patch_arrays)  # names only: the JSON stays small
        return out


def group_findings(findings: list) -> list[tuple]:
    """``[(first, [same kind at other layers...])]`` in first-seen order: one bug in every
    BatchNorm reads as one finding with its other layers listed, not as 50 cards. A second
    finding of the same kind at a layer already listed (a model-wide one and a per-layer
    one) is not repeated."""
    groups: dict[str, tuple] = {}
    seen: dict[str, set] = {}
    for f in findings:
        key = f.kind if f.layer else f"{f.kind}|{f.cause}"
        if key not in groups:
            groups[key], seen[key] = (f, []), {f.layer}
        elif f.layer not in seen[key]:
            groups[key][1].append(f)
            seen[key].add(f.layer)
    return list(groups.values())

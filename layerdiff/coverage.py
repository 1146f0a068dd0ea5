"""What the comparison did not compare, and whether that is allowed to pass.

Every reference layer that has weights, or that changes values or shape, must be compared:
- directly, in an aligned pair, or
- through the pair that consumes it (an unaligned parameter-free layer between two pairs, e.g.
  a Flatten or a ReLU the port folded into another op, is checked by the next pair's
  end-to-end error; the first-divergence line names it when the error enters there).

What that leaves:
- a weighted reference layer that no pair holds: **not ported** (the verdict fails), wherever
  it is, since weights no pair compares were never shown to be loaded right;
- parameter-free reference layers no pair consumes (a final Softmax): a note, because the port
  simply ends before them;
- candidate ops after its last aligned layer (box decoding, an extra softmax): a note naming
  them, never blamed on a layer of the port.
Pure routing (``PASSTHROUGH`` in ``align/kinds.py``: Split, Silence, ...) is never listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerdiff.align import Alignment
from layerdiff.align.kinds import PASSTHROUGH
from layerdiff.align.path import between
from layerdiff.trace import Record, Trace

SHOWN = 6


@dataclass
class Coverage:
    #: weighted reference layers no aligned pair compares (the verdict fails)
    not_ported: list[Record] = field(default_factory=list)
    #: parameter-free reference layers no compared layer consumes
    uncompared: list[Record] = field(default_factory=list)
    #: index of the last reference record an aligned pair holds
    last_ref: int = -1
    #: candidate ops that run after its last aligned record
    cand_after: list[Record] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.not_ported

    def failure(self) -> str:
        """One line: the weighted layers nothing compares ("" when there are none)."""
        if not self.not_ported:
            return ""
        return "not ported: " + _names(self.not_ported, with_kind=True)

    def notes(self) -> list[str]:
        out = []
        for rec in self.uncompared:
            why = ("the port ends before it" if rec.index > self.last_ref
                   else "no compared layer consumes it")
            out.append(f"{rec.name} ({rec.kind}) not compared: {why}")
        if self.cand_after:
            n = len(self.cand_after)
            out.append(f"candidate applies {n} op{'s' if n > 1 else ''} after its last aligned "
                       f"layer: {_names(self.cand_after)}")
        return out


def coverage(alignment: Alignment, ref: Trace, cand: Trace) -> Coverage:
    """Classify what the alignment leaves uncompared on each side."""
    paired_ref = {r.index for p in alignment.pairs for r in p.ref}
    paired_cand = {c.index for p in alignment.pairs for c in p.cand}
    consumed: set[int] = set()  # unaligned reference records some pair's error checks
    for p in alignment.pairs:
        consumed.update(r.index for r in between(alignment, ref, cand, p).ref)
    out = Coverage(last_ref=max(paired_ref, default=-1))
    for rec in ref.records:
        if rec.index in paired_ref or _routing(rec):
            continue
        if len(rec.params):
            out.not_ported.append(rec)
        elif rec.index not in consumed and rec.bottoms:
            out.uncompared.append(rec)
    last_cand = max(paired_cand, default=-1)
    out.cand_after = [c for c in cand.records
                      if c.index > last_cand and c.index not in paired_cand and not _routing(c)]
    return out


def _routing(rec: Record) -> bool:
    return rec.kind in PASSTHROUGH or bool(rec.attrs.get("container"))


def _names(recs: list[Record], with_kind: bool = False) -> str:
    shown = [f"{r.name} ({r.kind})" if with_kind else r.name for r in recs[:SHOWN]]
    more = len(recs) - SHOWN
    return ", ".join(shown) + (f", ... (+{more})" if more > 0 else "")

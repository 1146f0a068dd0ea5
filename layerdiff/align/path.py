"""What lies between a pair and the aligned pairs that feed it.

When a pair fails end to end while every aligned pair feeding it passes, the error entered
either in the pair itself or on the way to it: through records that have no twin on the other
side (an extra ReLU before a residual add, a permute before a flatten, ``x * 255`` in forward,
a Caffe layer the port skipped). :func:`between` walks the data flow back from a pair, on one
side, to the nearest aligned records (or the model inputs) and returns the unaligned records
it crossed, in execution order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerdiff.align.aligner import Alignment, Pair
from layerdiff.align.kinds import PASSTHROUGH
from layerdiff.trace import Record, Trace


@dataclass
class Between:
    """Unaligned records on the path into a pair, per side, in execution order."""

    ref: list[Record] = field(default_factory=list)
    cand: list[Record] = field(default_factory=list)
    #: aligned pairs whose outputs feed this pair (positions in ``Alignment.pairs``)
    feeders: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ref or self.cand)


def between(alignment: Alignment, ref: Trace, cand: Trace, pair: Pair) -> Between:
    """The unaligned records of each side between ``pair`` and the aligned pairs feeding it."""
    ref_owner = _owners(alignment, "ref")
    cand_owner = _owners(alignment, "cand")
    me = alignment.pairs.index(pair)
    out = Between()
    feeders: set[int] = set()
    out.ref = _walk(ref, pair.ref, ref_owner, me, feeders)
    out.cand = _walk(cand, pair.cand, cand_owner, me, feeders)
    out.feeders = sorted(feeders)
    return out


def _owners(alignment: Alignment, side: str) -> dict[int, int]:
    owner: dict[int, int] = {}
    for pos, p in enumerate(alignment.pairs):
        for r in getattr(p, side):
            owner[r.index] = pos
    return owner


def _walk(trace: Trace, group: list[Record], owner: dict[int, int], me: int,
          feeders: set[int]) -> list[Record]:
    """Walk back from the group's inputs; stop at records of other aligned pairs."""
    members = {r.index for r in group}
    found: dict[int, Record] = {}
    seen: set[int] = set()
    todo = [(b, r.index) for r in group for b in r.bottoms]
    while todo:
        blob, before = todo.pop()
        producer = _producer(trace, blob, before)
        if producer is None or producer.index in seen or producer.index in members:
            continue
        seen.add(producer.index)
        pos = owner.get(producer.index)
        if pos is not None and pos != me:
            feeders.add(pos)
            continue
        if producer.kind not in PASSTHROUGH and not producer.attrs.get("container"):
            found[producer.index] = producer
        todo.extend((b, producer.index) for b in producer.bottoms)
    return [found[i] for i in sorted(found)]


def _producer(trace: Trace, blob: str, before: int) -> Record | None:
    for rec in reversed(trace.records[:before]):
        if blob in rec.tops:
            return rec
    return None

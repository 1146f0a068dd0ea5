"""``between``: the unaligned records on the path into a pair, per side."""

from __future__ import annotations

from layerdiff.align.mapfile import MapFile
from layerdiff.align.path import between
from layerdiff.api import compare


def _report(example_dir, mapfile=None):
    return compare(example_dir, example_dir, input="randn:0", map=mapfile, diagnose=False)


def test_fully_aligned_net_has_nothing_between(example_dir):
    rep = _report(example_dir)
    for p in rep.alignment.pairs:
        assert not between(rep.alignment, rep.reference, rep.candidate, p), p.ref_name
    last = between(rep.alignment, rep.reference, rep.candidate, rep.alignment.pairs[-1])
    assert [rep.alignment.pairs[i].ref_name for i in last.feeders] == ["fc10"]


def test_ignored_records_are_found_between_their_neighbours(example_dir):
    mf = MapFile(ignore_ref=["conv1_relu"], ignore_cand=["scale_conv1"])
    rep = _report(example_dir, mf)
    pool1 = next(p for p in rep.alignment.pairs if p.ref_name == "pool1")
    b = between(rep.alignment, rep.reference, rep.candidate, pool1)
    assert [r.name for r in b.ref] == ["conv1_relu"]
    assert [r.name for r in b.cand] == ["scale_conv1", "conv1_relu"]
    assert [rep.alignment.pairs[i].ref_name for i in b.feeders] == ["bn_conv1+scale_conv1"]

"""Pair the records of a reference trace with those of a candidate trace.

Stages, strongest first; each pair remembers which one matched it:
1. ``map``: the user's map file;
2. ``exact``: identical names (kinds must be compatible);
3. ``normalized``: names equal after folding case, ``/ . _ -`` and prefixes like ``module.``;
4. ``fingerprint``: a candidate parameter equals a reference blob (see ``fingerprint.py``);
5. ``order``: between pairs already found, the remaining records in order, by op kind and
   output size.
Then the known groups of ``kinds.py`` absorb the records that have no counterpart because the
other side does their work in one step (Caffe BatchNorm + Scale vs one BatchNorm2d, a conv with
BatchNorm folded in on either side, ``F.pad`` + conv vs a conv with ``pad``, flatten + Linear vs
InnerProduct). A group is compared on the output of its last record. For BatchNorm folds the
outputs may veto the group (see ``_numbers_refute``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from layerdiff.align.fingerprint import tie_by_parameters
from layerdiff.align.kinds import (
    CAND_GROUPS,
    CAND_TAIL_GROUPS,
    FOLD_TARGETS,
    GLOBAL_POOL_ONLY,
    PASSTHROUGH,
    REF_GROUPS,
    compatible,
    families,
)
from layerdiff.align.mapfile import MapFile, dump_mapfile
from layerdiff.trace import Record, Trace


@dataclass
class Pair:
    ref: list[Record]
    cand: list[Record]
    method: str
    note: str = ""

    @property
    def ref_name(self) -> str:
        return "+".join(r.name for r in self.ref)

    @property
    def cand_name(self) -> str:
        return "+".join(c.name for c in self.cand)

    @property
    def ref_output(self) -> np.ndarray:
        return self.ref[-1].outputs[0]

    @property
    def cand_output(self) -> np.ndarray:
        return self.cand[-1].outputs[0]


@dataclass
class Alignment:
    pairs: list[Pair]
    unaligned_ref: list[Record] = field(default_factory=list)
    unaligned_cand: list[Record] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_mapfile(self) -> str:
        """The mapping as an editable map file (see ``mapfile.py``)."""
        entries = []
        for p in self.pairs:
            cands = [c.name for c in p.cand]
            for r in p.ref:
                entries.append((r.name, cands, p.method + (f": {p.note}" if p.note else "")))
        return dump_mapfile(entries)

    def methods(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pairs:
            out[p.method] = out.get(p.method, 0) + 1
        return out


_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def normalize_name(name: str) -> str:
    """Fold case and separators; drop wrapper prefixes (DataParallel's ``module.``, ...)."""
    n = name.split("#", 1)[0]
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if n.startswith(p):
                n, changed = n[len(p):], True
    return re.sub(r"[/._\-]+", "_", n.lower()).strip("_")


def _normalized_key(rec: Record) -> str:
    # An ONNX node exported from torch carries the module path it came from (``torch_module``,
    # from ``/layer1/layer1.0/conv1/Conv`` or dynamo's name scopes): that is the name to match.
    return normalize_name(rec.attrs.get("torch_module") or rec.name)


def _steps(trace: Trace, ignore) -> list[Record]:
    return [r for r in trace if r.kind not in PASSTHROUGH and not r.attrs.get("container")
            and r.outputs and not ignore(r.name)]


def align(ref: Trace, cand: Trace, mapfile: MapFile | None = None) -> Alignment:
    """Pair ``ref`` records with ``cand`` records (see the module docstring)."""
    mf = mapfile or MapFile()
    rs = _steps(ref, lambda n: mf.ignored(n, True))
    cs = _steps(cand, lambda n: mf.ignored(n, False))
    cpos = {c.index: i for i, c in enumerate(cs)}
    match: dict[int, tuple[list[int], str, str]] = {}  # ref pos -> (cand positions, method, note)
    used: set[int] = set()
    warnings: list[str] = []

    # 1. map file
    by_name = {c.name: i for i, c in enumerate(cs)}
    for i, r in enumerate(rs):
        targets = mf.targets(r.name)
        if targets is None:
            continue
        missing = [t for t in targets if t not in by_name]
        if missing:
            warnings.append(f"map: '{r.name}' -> {missing}: no such candidate record")
            continue
        pos = [by_name[t] for t in targets]
        match[i] = (pos, "map", "")
        used.update(pos)

    # 2-3. names
    for method, key in (("exact", lambda r: r.name), ("normalized", _normalized_key)):
        index: dict[str, list[int]] = {}
        for j, c in enumerate(cs):
            if j not in used:
                index.setdefault(key(c), []).append(j)
        for i, r in enumerate(rs):
            if i in match:
                continue
            for j in index.get(key(r), []):
                if j not in used and _name_compatible(r.kind, cs[j].kind):
                    match[i] = ([j], method, "")
                    used.add(j)
                    break

    # 4. parameter fingerprints (several reference records may tie to one candidate:
    #    BatchNorm via its mean and Scale via gamma both name one BatchNorm2d)
    free_r = [r for i, r in enumerate(rs) if i not in match]
    free_c = [c for j, c in enumerate(cs) if j not in used]
    rpos = {r.index: i for i, r in enumerate(rs)}
    for tie in tie_by_parameters(free_r, free_c):
        i, j = rpos[tie.ref], cpos[tie.cand]
        if i not in match:
            match[i] = ([j], "fingerprint", tie.transform)
    used.update(j for pos, _, _ in match.values() for j in pos)

    # 5. order, kind and size between anchors
    _match_in_order(rs, cs, match, used)

    pairs, absorbed_c = _build_pairs(rs, cs, match, used)
    done_r = {r.index for p in pairs for r in p.ref}
    done_c = {c.index for p in pairs for c in p.cand} | absorbed_c
    return Alignment(pairs, [r for r in rs if r.index not in done_r],
                     [c for c in cs if c.index not in done_c], warnings)


def _name_compatible(a: str, b: str) -> bool:
    # Equal names pair unless the kinds contradict; a custom module (unknown kind) does not.
    return compatible(a, b) or not families(a) or not families(b)


def _size(rec: Record) -> int:
    return int(np.asarray(rec.outputs[0]).size)


def _anchors(match) -> list[tuple[int, int]]:
    """Matched (ref pos, cand pos) that keep both orders: a longest increasing run."""
    pts = sorted((i, min(pos)) for i, (pos, _, _) in match.items())
    best: list[list[tuple[int, int]]] = []
    for p in pts:  # O(n^2) LIS is fine for a few thousand layers
        prev = max((b for b in best if b[-1][1] < p[1]), key=len, default=[])
        best.append(prev + [p])
    return max(best, key=len, default=[])


def _match_in_order(rs, cs, match, used) -> None:
    anchors = [(-1, -1)] + _anchors(match) + [(len(rs), len(cs))]
    for (a_i, a_j), (b_i, b_j) in zip(anchors, anchors[1:], strict=False):
        gap_r = [i for i in range(a_i + 1, b_i) if i not in match]
        gap_c = [j for j in range(a_j + 1, b_j) if j not in used]
        if not gap_r or not gap_c:
            continue
        for i, j in _lcs(gap_r, gap_c, rs, cs, _same_op):
            match[i] = ([j], "order", "")
            used.add(j)
        # What is left pairs by kind alone: a port that computes a different shape (floor
        # pooling, a wrong stride) is exactly what the comparison must show, not hide.
        rest_r = [i for i in gap_r if i not in match]
        rest_c = [j for j in gap_c if j not in used]
        for i, j in _lcs(rest_r, rest_c, rs, cs, _same_kind):
            match[i] = ([j], "order", "output sizes differ")
            used.add(j)


def _lcs(gap_r, gap_c, rs, cs, same) -> list[tuple[int, int]]:
    """Longest common subsequence of records that ``same`` accepts as one op."""
    n, m = len(gap_r), len(gap_c)
    if not n or not m:
        return []
    if n * m > 4_000_000:  # a pathological gap: fall back to greedy
        out, j0 = [], 0
        for i in gap_r:
            for k in range(j0, m):
                if same(rs[i], cs[gap_c[k]]):
                    out.append((i, gap_c[k]))
                    j0 = k + 1
                    break
        return out
    dp = np.zeros((n + 1, m + 1), dtype=np.int32)
    for x in range(n - 1, -1, -1):
        for y in range(m - 1, -1, -1):
            if same(rs[gap_r[x]], cs[gap_c[y]]):
                dp[x, y] = dp[x + 1, y + 1] + 1
            else:
                dp[x, y] = max(dp[x + 1, y], dp[x, y + 1])
    out, x, y = [], 0, 0
    while x < n and y < m:
        if same(rs[gap_r[x]], cs[gap_c[y]]) and dp[x, y] == dp[x + 1, y + 1] + 1:
            out.append((gap_r[x], gap_c[y]))
            x, y = x + 1, y + 1
        elif dp[x + 1, y] >= dp[x, y + 1]:
            x += 1
        else:
            y += 1
    return out


def _same_op(r: Record, c: Record) -> bool:
    return compatible(r.kind, c.kind) and _size(r) == _size(c) and _pooling_fits(r, c)


def _same_kind(r: Record, c: Record) -> bool:
    return bool(families(r.kind) & families(c.kind)) and _pooling_fits(r, c)


def _pooling_fits(r: Record, c: Record) -> bool:
    """A reduction in forward stands for a Caffe pooling only where it does a global pooling."""
    if c.kind not in GLOBAL_POOL_ONLY or r.kind in GLOBAL_POOL_ONLY \
            or (families(r.kind) & families(c.kind)) - {"pool"}:
        return True  # not a reduction against a pooling layer
    out = np.asarray(r.outputs[0])
    return out.ndim == 4 and out.shape[2:] == (1, 1) and out.size == _size(c)


def _build_pairs(rs, cs, match, used) -> tuple[list[Pair], set[int]]:
    # Reference records tied to the same candidate and adjacent form one group.
    pairs: list[Pair] = []
    for i in sorted(match):
        pos, method, note = match[i]
        if pairs and pairs[-1].cand == [cs[j] for j in pos] and _chained(pairs[-1].ref[-1], rs[i]):
            pairs[-1].ref.append(rs[i])
            continue
        pairs.append(Pair([rs[i]], [cs[j] for j in pos], method, note))
    _join_preceding_batchnorm(pairs, rs, match)
    _absorb_reference_groups(pairs, rs, cs, match, used)
    absorbed_c = _absorb_candidate_groups(pairs, cs, used)
    grouped = {j for j, c in enumerate(cs) if c.index in absorbed_c}
    absorbed_c |= _absorb_candidate_tails(pairs, cs, used | grouped)
    pairs.sort(key=lambda p: p.ref[0].index)
    return pairs, absorbed_c


def _join_preceding_batchnorm(pairs, rs, match) -> None:
    """A Caffe Scale tied to a candidate BatchNorm brings the unmatched BatchNorm before it.

    (Its statistics may be what the port got wrong, so they did not tie by themselves.)
    """
    rpos = {r.index: i for i, r in enumerate(rs)}
    for p in pairs:
        head = p.ref[0]
        i = rpos[head.index]
        if head.kind != "Scale" or i == 0 or not families(p.cand[-1].kind) & {"batchnorm"}:
            continue
        prev = rs[i - 1]
        if prev.kind == "BatchNorm" and i - 1 not in match and _chained(prev, head):
            p.ref.insert(0, prev)
            match[i - 1] = ([], "group", "")
            p.note = "; ".join(x for x in (p.note, "Caffe BatchNorm + Scale = one BatchNorm")
                               if x)


def _chained(prev: Record, nxt: Record) -> bool:
    """``nxt`` works on ``prev``'s output (in place, or as its only input)."""
    return bool(prev.tops) and prev.tops[0] in nxt.bottoms


def _absorb_reference_groups(pairs, rs, cs, match, used) -> None:
    rpos = {r.index: i for i, r in enumerate(rs)}
    for p in pairs:
        head = p.ref[0]
        for ref_kinds, cand_fams, desc in REF_GROUPS:
            if ref_kinds[0] != head.kind or not families(p.cand[-1].kind) & set(cand_fams):
                continue
            if [r.kind for r in p.ref] != list(ref_kinds[:len(p.ref)]):
                continue
            i = rpos[p.ref[-1].index]
            extra = []
            for kind in ref_kinds[len(p.ref):]:
                i += 1
                if i >= len(rs) or i in match or rs[i].kind != kind or \
                        not _chained((extra or p.ref)[-1], rs[i]):
                    break
                extra.append(rs[i])
            if not extra or len(p.ref) + len(extra) != len(ref_kinds):
                continue
            if _next_free_cand_does(p, cs, used, extra[0]):
                continue  # the candidate has its own step for it: leave it to the order stage
            if _numbers_refute(p.ref[-1], extra[-1], p.cand[-1], p.cand[-1]):
                continue  # the port left that step out: the pair agrees without it
            p.ref.extend(extra)
            for r in extra:
                match[rpos[r.index]] = ([], "group", desc)
            p.note = "; ".join(x for x in (p.note, desc) if x)
            break


def _numbers_refute(ref_now: Record, ref_grown: Record, cand_now: Record,
                    cand_grown: Record) -> bool:
    """Whether the outputs say a pair must not grow: it agrees as it is and disagrees grown.

    (A BatchNorm the port inserted, or one it left out, is not a folded one.) When neither or
    both agree, e.g. behind an earlier divergence, the structure decides.
    """
    if ref_now is ref_grown and cand_now is cand_grown:
        return False
    if not families(ref_now.kind) & FOLD_TARGETS:
        return False
    return _agree(ref_now, cand_now) and not _agree(ref_grown, cand_grown)


def _agree(r: Record, c: Record, rtol: float = 1e-3) -> bool:
    # A loose check, only to choose between two groupings; the verdict measures the pair.
    a, b = np.asarray(r.outputs[0]), np.asarray(c.outputs[0])
    if a.size != b.size or not a.size or not np.issubdtype(a.dtype, np.floating) \
            or not np.issubdtype(b.dtype, np.floating):
        return False
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.subtract(a.reshape(-1), b.reshape(-1), dtype=np.result_type(a, b))
        return bool(np.abs(d).max() <= rtol * np.abs(a).max() + 1e-6)


def _next_free_cand_does(p: Pair, cs, used, rec: Record) -> bool:
    last = max(c.index for c in p.cand)
    for j, c in enumerate(cs):
        if c.index > last:
            return j not in used and compatible(rec.kind, c.kind)
    return False


def _absorb_candidate_groups(pairs, cs, used) -> set[int]:
    """Extend each pair's candidate side with the free records of a ``CAND_GROUPS`` pattern.

    Returns the record indices of the candidate records that joined a pair.
    """
    taken = set(used)  # candidate positions
    cpos = {c.index: j for j, c in enumerate(cs)}
    for p in pairs:
        if len(p.cand) != 1:
            continue  # a map-file entry already says what the candidate side is
        j = cpos[p.cand[0].index]
        for cand_fams, ref_fams, desc in CAND_GROUPS:
            anchor = next((k for k, f in enumerate(cand_fams) if f in ref_fams), None)
            if anchor is None or not families(p.ref[0].kind) & set(ref_fams) \
                    or cand_fams[anchor] not in families(cs[j].kind):
                continue
            run = _free_run(cs, j - anchor, cand_fams, j, taken)
            if run is None or _numbers_refute(p.ref[-1], p.ref[-1], cs[j], cs[run[-1]]):
                continue
            p.cand = [cs[k] for k in run]
            taken.update(run)
            p.note = "; ".join(x for x in (p.note, desc) if x)
            break
    return {cs[k].index for k in taken - set(used)}


def _free_run(cs, start, fams, anchor, taken) -> list[int] | None:
    """Positions ``start, start+1, ...`` when their records fit ``fams``, each feeding the next,
    and all but ``anchor`` are free."""
    if start < 0 or start + len(fams) > len(cs):
        return None
    run = list(range(start, start + len(fams)))
    for k, fam in zip(run, fams, strict=True):
        if fam not in families(cs[k].kind) or (k != anchor and k in taken):
            return None
        if k > start and not _chained(cs[k - 1], cs[k]):
            return None
    return run


def _absorb_candidate_tails(pairs, cs, used) -> set[int]:
    """Unmatched candidate records right after a pair that finish its reference's work: the
    kinds of ``CAND_TAIL_GROUPS``, or more ONNX nodes exported from the same torch module."""
    absorbed: set[int] = set()
    cpos = {c.index: j for j, c in enumerate(cs)}
    for p in pairs:
        module = p.cand[-1].attrs.get("torch_module")
        if module is not None and module == p.ref[-1].name:
            j = cpos[p.cand[-1].index] + 1
            while j < len(cs) and j not in used and cs[j].attrs.get("torch_module") == module \
                    and _chained(p.cand[-1], cs[j]):
                p.cand.append(cs[j])
                absorbed.add(cs[j].index)
                j += 1
            if len(p.cand) > 1:
                p.note = "; ".join(x for x in (p.note, "the module's ONNX nodes") if x)
                continue
        for ref_kind, cand_kinds, desc in CAND_TAIL_GROUPS:
            if p.ref[-1].kind != ref_kind or [c.kind for c in p.cand] != list(cand_kinds[:1]):
                continue
            j = cpos[p.cand[-1].index]
            tail = []
            for kind in cand_kinds[1:]:
                j += 1
                if j >= len(cs) or j in used or cs[j].kind != kind or \
                        not _chained((tail or p.cand)[-1], cs[j]):
                    break
                tail.append(cs[j])
            if len(tail) == len(cand_kinds) - 1:
                p.cand.extend(tail)
                absorbed.update(c.index for c in tail)
                p.note = "; ".join(x for x in (p.note, desc) if x)
    return absorbed

"""Activations inserted or removed: an op on one side with no twin on the other.

A port that applies an extra ReLU before a residual add, or forgets the ReLU after a
BatchNorm, has every aligned layer right on its own: the error enters between two pairs. Both
probes work on the pair where it shows (it fails end to end, its feeders pass) and re-run the
candidate's path into it (:mod:`graph_path`):

- ``activation_inserted``: an unaligned candidate activation on that path, replaced by the
  identity, makes the pair match;
- ``activation_missing``: an unaligned reference activation on that path (Caffe's own layer,
  re-run by the reference engine) applied to the candidate's value makes the pair match.
"""

from __future__ import annotations

from layerdiff.diagnose.case import LayerCase
from layerdiff.diagnose.finding import Finding
from layerdiff.diagnose.probes import probe
from layerdiff.diagnose.probes.counterfactual import check_fix, finding
from layerdiff.diagnose.probes.graph_path import (
    ACTIVATIONS,
    identity,
    made_by,
    of_family,
    op_text,
    path_case,
)


@probe("activation_inserted", between=True)
def activation_inserted(case: LayerCase) -> Finding | None:
    """The port applies an activation the reference does not have on this path."""
    pc = path_case(case)
    if pc is None:
        return None
    ref_kinds = {r.kind for r in pc.ref_ops if of_family(r, ACTIVATIONS)}
    for rec in pc.cand_ops:
        if not of_family(rec, ACTIVATIONS):
            continue
        fixed = check_fix(pc.case, pc.rerun(swap={rec.index: identity}))
        if fixed is None:
            continue
        where = f" after {made_by(case, rec)}, before {case.pair.cand_name},"
        caffe = (" where Caffe has no " + rec.kind if ref_kinds else
                 " where Caffe has no activation")
        ev = (f"torch {op_text(rec)} runs{where} and has no twin in Caffe; the port's path "
              f"re-run from its passing feeders without it matches Caffe {case.pair.ref_name}")
        return finding(pc.case, "activation_inserted", f"the port applies an extra "
                       f"{rec.kind} ({rec.name}){where}{caffe}", ev,
                       f"remove {rec.name} from the port's forward", fixed,
                       "activation_inserted", op=rec.name, op_kind=rec.kind)
    return None


@probe("activation_missing", between=True)
def activation_missing(case: LayerCase) -> Finding | None:
    """The reference applies an activation that the port skips on this path."""
    pc = path_case(case)
    if pc is None:
        return None
    cand_kinds = {f for r in pc.cand_ops if of_family(r, ACTIVATIONS) for f in ACTIVATIONS
                  if of_family(r, (f,))}
    for ref in pc.ref_ops:
        run = getattr(ref.handle, "run", None)
        if not of_family(ref, ACTIVATIONS) or run is None or \
                any(of_family(ref, (f,)) for f in cand_kinds):
            continue
        for top in [*pc.entry_tops(), *(t for r in pc.cand_ops for t in r.tops)]:
            fixed = check_fix(pc.case, pc.rerun(alter={top: _first(run)}))
            if fixed is None:
                continue
            producer = next((r for r in reversed(case.cand_trace.records)
                             if top in r.tops and r.index < case.cand_records[0].index), None)
            after = producer.name if producer is not None else top
            ev = (f"Caffe {ref.name} ({ref.kind}) runs on the path into {case.pair.ref_name} "
                  f"and the port has no twin of it; Caffe's {ref.kind} applied to torch "
                  f"{after}'s output matches Caffe {case.pair.ref_name}")
            return finding(pc.case, "activation_missing", f"the port skips Caffe's "
                           f"{ref.kind} {ref.name} after {after}", ev,
                           f"apply the {ref.kind} to {after}'s output in the port's forward "
                           f"({_SPELLED.get(ref.kind, ref.kind)})", fixed, "activation_missing",
                           ref_layer=ref.name, ref_kind=ref.kind, after=after)
    return None


_SPELLED = {"ReLU": "x = F.relu(x)", "Sigmoid": "x = torch.sigmoid(x)", "TanH": "x = torch.tanh(x)",
            "ELU": "x = F.elu(x)", "AbsVal": "x = x.abs()", "Swish": "x = F.silu(x)",
            "Clip": "x = x.clamp(min, max)", "PReLU": "an nn.PReLU with Caffe's slopes"}


def _first(run):
    return lambda x: run(x)[0]

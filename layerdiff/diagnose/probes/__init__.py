"""Probes: each module holds counterfactual checks for one family of porting mistakes.

A probe is a function ``probe(case: LayerCase) -> Finding | list[Finding] | None`` registered
with :func:`probe`. It runs on a pair that fails (locally when known): it re-runs the candidate
with a candidate fix (``case.rerun(replace=...)``) and reports a :class:`Finding` only when the
fix removes the error, with the numbers that prove it. Model-wide probes (no pair) take the
:class:`~layerdiff.comparator.Report` instead and are registered with ``model_wide=True``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

#: probe modules, each ``layerdiff/diagnose/probes/<name>.py``
MODULES: tuple[str, ...] = (
    "audit_probe", "batchnorm", "train_mode", "pooling", "lrn", "layout", "preprocessing",
    "conv", "precision", "activation", "global_pool", "geometry", "onnx_nodes",
)


@dataclass
class Probe:
    name: str
    fn: Callable
    model_wide: bool = False
    #: also looks for error that entered between the pair and its passing feeders (ops with
    #: no twin), so it runs on a pair that fails end to end although it is right on its own
    between: bool = False


PROBES: list[Probe] = []


def probe(name: str, model_wide: bool = False,
          between: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn`` as a probe named ``name``."""

    def deco(fn: Callable) -> Callable:
        PROBES.append(Probe(name, fn, model_wide, between))
        return fn

    return deco


_loaded = False


def all_probes() -> list[Probe]:
    global _loaded
    if not _loaded:
        for mod in MODULES:
            importlib.import_module(f"layerdiff.diagnose.probes.{mod}")
        _loaded = True
    return list(PROBES)

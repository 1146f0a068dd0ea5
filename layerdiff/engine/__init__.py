"""Caffe's inference arithmetic in NumPy: one module per layer family, a registry, a runner."""

from layerdiff.engine.plan import Plan, make_plan
from layerdiff.engine.registry import LayerImpl, lookup, register, supported_types
from layerdiff.engine.runner import run_caffe

__all__ = ["LayerImpl", "Plan", "lookup", "make_plan", "register", "run_caffe", "supported_types"]

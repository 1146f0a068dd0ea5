"""Adapters: one module per framework, each turning a model run into a layerdiff Trace.

Installed as ``layerdiff.adapters``. An adapter knows its framework and nothing downstream.
"""

"""Standalone helper scripts shipped with layerdiff (they run without layerdiff installed)."""

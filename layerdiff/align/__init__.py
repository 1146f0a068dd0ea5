"""Pairing reference records with candidate records (map file, names, weights, order)."""

from layerdiff.align.aligner import Alignment, Pair, align, normalize_name
from layerdiff.align.mapfile import MapFile, load_mapfile

__all__ = ["Alignment", "MapFile", "Pair", "align", "load_mapfile", "normalize_name"]

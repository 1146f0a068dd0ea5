"""Trace: the one data model between adapters and everything downstream.

A trace is the ordered list of what every layer of one model produced for one input. Every
adapter (the Caffe engine, torch, a saved file) produces one; align, metrics, diagnose and report
only ever read traces, so they never need to know which framework ran.

Saved format (``Trace.save``, ``.npz``, loaded with ``allow_pickle=False``):

- ``"{index:04d}|{record name}|{top}"``: the output array of one record's top (the same key
  layout as the golden traces in ``shared/golden``).
- ``"input|{name}"``: each fed input.
- ``"param|{index:04d}|{record name}|{param}"``: a record's parameters (Caffe blob index
  ``"0"``, ``"1"``, ...; torch ``weight``, ``running_mean``, ...), when the adapter kept them.
- ``"__trace__"``: a uint8 array holding UTF-8 JSON
  ``{"format": "layerdiff-trace/1", "meta": {...}, "inputs": [names],
  "records": [{"index", "name", "kind", "tops", "bottoms", "attrs"}]}``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerdiff.errors import ModelFormatError

TRACE_FORMAT = "layerdiff-trace/1"
_META_KEY = "__trace__"


@dataclass
class Record:
    """What one layer call produced.

    ``tops`` names each output (a Caffe blob name, or the record name for frameworks without
    blob names); ``bottoms`` names the blobs it read, so a consumer can find the values a layer
    saw with :meth:`Trace.value_before`. ``params`` holds the layer's weights as the
    framework used them (for weight audits and fingerprint alignment). ``attrs`` holds
    JSON-able extras (module path, call index, parameters); ``handle`` holds a live framework
    object (e.g. the torch module and its inputs) for re-running the layer and is never saved.
    """

    index: int
    name: str
    kind: str
    tops: list[str]
    bottoms: list[str]
    outputs: list[np.ndarray] = field(repr=False)
    attrs: dict[str, Any] = field(default_factory=dict)
    handle: Any = field(default=None, repr=False, compare=False)
    #: a dict, or any read-only mapping (adapters may read parameters lazily)
    params: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def output(self) -> np.ndarray:
        """The first (usually only) output."""
        return self.outputs[0]

    @property
    def in_place(self) -> bool:
        """True when the layer overwrote one of its own inputs (Caffe's ReLU/BN/Scale style)."""
        return any(t in self.bottoms for t in self.tops)

    def key(self, k: int = 0) -> str:
        return f"{self.index:04d}|{self.name}|{self.tops[k]}"


class Trace:
    """Ordered records of one model run, plus the inputs fed and run metadata.

    With ``stream_dir`` every output is written to a ``.npy`` file there as soon as it is added
    and kept only as a read-only memory map, so a big model's activations need not all fit in
    memory at once.
    """

    def __init__(
        self,
        meta: dict[str, Any] | None = None,
        inputs: dict[str, np.ndarray] | None = None,
        stream_dir: str | Path | None = None,
    ) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        self.inputs: dict[str, np.ndarray] = dict(inputs or {})
        self.records: list[Record] = []
        self._by_name: dict[str, Record] = {}
        self.stream_dir = Path(stream_dir) if stream_dir is not None else None
        if self.stream_dir is not None:
            self.stream_dir.mkdir(parents=True, exist_ok=True)

    # -- building -------------------------------------------------------------------------
    def add(
        self,
        name: str,
        kind: str,
        tops: list[str],
        bottoms: list[str],
        outputs: list[np.ndarray],
        attrs: dict[str, Any] | None = None,
        handle: Any = None,
        params: Mapping[str, np.ndarray] | None = None,
    ) -> Record:
        """Append a record; ``outputs`` must not be mutated by the caller afterwards."""
        if len(tops) != len(outputs):
            raise ValueError(f"record {name!r}: {len(tops)} tops but {len(outputs)} outputs")
        if name in self._by_name:
            raise ValueError(f"record name {name!r} is already in the trace")
        index = len(self.records)
        if self.stream_dir is not None:
            outputs = _OnDisk([self._spill(index, k, a) for k, a in enumerate(outputs)])
        outputs = outputs if isinstance(outputs, _OnDisk) else list(outputs)
        rec = Record(index, name, kind, list(tops), list(bottoms), outputs,
                     dict(attrs or {}), handle, {} if params is None else params)
        self.records.append(rec)
        self._by_name[name] = rec
        return rec

    def _spill(self, index: int, k: int, array: np.ndarray) -> Path:
        assert self.stream_dir is not None
        path = self.stream_dir / f"{index:05d}_{k}.npy"
        np.save(path, np.ascontiguousarray(array))
        return path

    # -- reading --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, key: int | str) -> Record:
        if isinstance(key, int):
            return self.records[key]
        try:
            return self._by_name[key]
        except KeyError:
            raise KeyError(f"no record named {key!r} in the trace") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def value_before(self, blob: str, index: int) -> np.ndarray | None:
        """The value of ``blob`` as record ``index`` saw it: the latest write before it.

        In-place chains (conv -> bn -> relu on one blob) make the producer of a blob depend on
        where you stand; this answers for a given position. Inputs count as written first.
        """
        for rec in reversed(self.records[:index]):
            if blob in rec.tops:
                return rec.outputs[rec.tops.index(blob)]
        return self.inputs.get(blob)

    def bottoms_of(self, record: Record) -> list[np.ndarray | None]:
        return [self.value_before(b, record.index) for b in record.bottoms]

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the trace as one ``.npz`` (see the module docstring for the layout)."""
        path = Path(path)
        header = {
            "format": TRACE_FORMAT,
            "meta": self.meta,
            "inputs": list(self.inputs),
            "records": [
                {"index": r.index, "name": r.name, "kind": r.kind, "tops": r.tops,
                 "bottoms": r.bottoms, "attrs": r.attrs, "params": list(r.params)}
                for r in self.records
            ],
        }
        raw = json.dumps(header, default=_json_default).encode("utf-8")
        # Write next to the destination, then rename: an interrupted save never leaves a
        # half-written file under the user's name.
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent if str(path.parent) else ".")
        try:
            with open(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED,
                                                       allowZip64=True) as zf:
                _write_npy(zf, _META_KEY, np.frombuffer(raw, dtype=np.uint8))
                for name, arr in self.inputs.items():
                    _write_npy(zf, f"input|{name}", arr)
                for r in self.records:
                    for k, arr in enumerate(r.outputs):
                        _write_npy(zf, r.key(k), arr)
                    for pname, arr in r.params.items():
                        _write_npy(zf, f"param|{r.index:04d}|{r.name}|{pname}", arr)
            shutil.move(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save` (never unpickles anything)."""
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ModelFormatError(f"{path}: not a readable layerdiff trace ({e})") from None
        with data:
            try:
                trace = cls._from_npz(data, path)
            except ModelFormatError:
                raise
            except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as e:
                # e.g. an object array (needs pickle), a truncated member, a malformed header
                raise ModelFormatError(f"{path}: corrupt layerdiff trace ({e})") from None
        trace.meta.setdefault("source", str(path))
        return trace

    @classmethod
    def _from_npz(cls, data, path: Path) -> Trace:
        if _META_KEY not in data.files:
            raise ModelFormatError(f"{path}: no '{_META_KEY}' entry; not a layerdiff trace")
        try:
            header = json.loads(bytes(data[_META_KEY]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: corrupt trace header ({e})") from None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise ModelFormatError(
                f"{path}: trace format {found!r}, expected {TRACE_FORMAT!r}")
        trace = cls(meta=header.get("meta", {}))
        for name in header.get("inputs", []):
            trace.inputs[name] = data[f"input|{name}"]
        for r in header["records"]:
            outs = []
            for top in r["tops"]:
                key = f"{r['index']:04d}|{r['name']}|{top}"
                if key not in data.files:
                    raise ModelFormatError(f"{path}: record '{r['name']}' lacks array {key!r}")
                outs.append(data[key])
            params = {p: data[f"param|{r['index']:04d}|{r['name']}|{p}"]
                      for p in r.get("params", [])}
            trace.add(r["name"], r["kind"], r["tops"], r["bottoms"], outs, r.get("attrs"),
                      params=params)
        return trace

    def __repr__(self) -> str:
        fw = self.meta.get("framework", "?")
        return f"<Trace {fw} with {len(self.records)} records>"


class _OnDisk(list):
    """A streamed record's outputs: ``.npy`` paths, each mapped afresh (read-only) on access.

    Nothing stays mapped between accesses, so a streamed trace's pages are released as soon as
    the caller drops the array: memory follows what is in use, not the whole trace.
    """

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [np.load(p, mmap_mode="r") for p in list.__getitem__(self, k)]
        return np.load(list.__getitem__(self, k), mmap_mode="r")

    def __iter__(self):
        for p in list.__iter__(self):
            yield np.load(p, mmap_mode="r")


def _write_npy(zf: zipfile.ZipFile, key: str, arr: np.ndarray) -> None:
    with zf.open(key + ".npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)

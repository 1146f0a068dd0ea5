"""User map files (``--map map.toml``): which reference layer is which candidate layer.

    # reference name (exact, glob:PATTERN or re:PATTERN) = candidate name(s)
    [map]
    "conv1" = "features.0"
    "glob:fc*" = "classifier.{0}"          # {0}: the whole reference name
    "re:res(\\d)a_branch2a" = "layer{1}.0.conv1"   # {1}: regex group 1
    "bn_conv1" = ["bn1", "relu"]           # one-to-many: compared on the last one

    ignore_ref = ["data_split"]             # never aligned, never reported
    ignore_cand = ["glob:*.dropout"]

    [tolerance."glob:bn*"]                  # per-layer overrides of --atol/--rtol
    atol = 1e-4
    rtol = 1e-2
"""

from __future__ import annotations

import fnmatch
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from layerdiff.errors import LayerdiffError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class MapFileError(LayerdiffError):
    pass


@dataclass
class Rule:
    pattern: str
    targets: list[str]

    def match(self, name: str) -> list[str] | None:
        """Candidate names for reference ``name``, or None when the rule does not apply."""
        if self.pattern.startswith("re:"):
            m = re.fullmatch(self.pattern[3:], name)
            if not m:
                return None
            groups = (name, *m.groups())
            return [t.format(*groups) for t in self.targets]
        if self.pattern.startswith("glob:"):
            if not fnmatch.fnmatchcase(name, self.pattern[5:]):
                return None
            return [t.format(name) for t in self.targets]
        return list(self.targets) if name == self.pattern else None


@dataclass
class MapFile:
    rules: list[Rule] = field(default_factory=list)
    ignore_ref: list[str] = field(default_factory=list)
    ignore_cand: list[str] = field(default_factory=list)
    tolerance: dict[str, dict[str, float]] = field(default_factory=dict)
    path: Path | None = None

    def targets(self, ref_name: str) -> list[str] | None:
        for rule in self.rules:
            got = rule.match(ref_name)
            if got is not None:
                return got
        return None

    def ignored(self, name: str, ref: bool) -> bool:
        return any(_name_matches(p, name) for p in (self.ignore_ref if ref else self.ignore_cand))

    def tolerance_for(self, ref_name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for pattern, tol in self.tolerance.items():
            if _name_matches(pattern, ref_name):
                out.update(tol)
        return out


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern.startswith("glob:"):
        return fnmatch.fnmatchcase(name, pattern[5:])
    return pattern == name


def load_mapfile(path: str | Path) -> MapFile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MapFileError(f"{path}: cannot read map file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise MapFileError(f"{path}: not a UTF-8 text file (byte {e.start}); a map file is "
                           "TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise MapFileError(f"{path}: {e}") from None
    known = {"map", "ignore_ref", "ignore_cand", "tolerance"}
    extra = set(data) - known
    if extra:
        raise MapFileError(f"{path}: unknown key(s) {sorted(extra)}; expected {sorted(known)}")
    for key in ("map", "tolerance"):
        if not isinstance(data.get(key, {}), dict):
            raise MapFileError(f"{path}: '{key}' must be a TOML table (a section of "
                               f"entries), not a {type(data[key]).__name__}")
    mf = MapFile(path=path)
    for pattern, target in data.get("map", {}).items():
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or \
                not all(isinstance(t, str) for t in targets):
            raise MapFileError(f"{path}: map entry {pattern!r} must be a name or a list of names")
        groups = _check_pattern(path, f"map entry {pattern!r}", pattern)
        if pattern.startswith(("re:", "glob:")):  # only these targets are formatted
            for t in targets:
                _check_target(path, pattern, t, groups)
        mf.rules.append(Rule(pattern, targets))
    for key in ("ignore_ref", "ignore_cand"):
        val = data.get(key, [])
        if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            raise MapFileError(f"{path}: {key} must be a list of names")
        for v in val:
            _check_pattern(path, f"{key} entry {v!r}", v)
        setattr(mf, key, val)
    for pattern, tol in data.get("tolerance", {}).items():
        _check_pattern(path, f"tolerance.{pattern!r}", pattern)
        if not isinstance(tol, dict) or set(tol) - {"atol", "rtol"} or \
                not all(isinstance(v, (int, float)) for v in tol.values()):
            raise MapFileError(f"{path}: tolerance.{pattern!r} takes only atol/rtol numbers")
        mf.tolerance[pattern] = {k: float(v) for k, v in tol.items()}
    return mf


def _check_pattern(path: Path, where: str, pattern: str) -> int:
    """Compile a ``re:`` pattern (returns its group count; 0 for exact and glob names)."""
    if not pattern.startswith("re:"):
        return 0
    try:
        return re.compile(pattern[3:]).groups
    except re.error as e:
        raise MapFileError(f"{path}: {where}: bad regex ({e})") from None


def _check_target(path: Path, pattern: str, target: str, groups: int) -> None:
    """A target's ``{N}`` fields must exist: {0} is the reference name, {1}.. regex groups."""
    try:
        target.format(*(["x"] * (groups + 1)))
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as e:
        have = "{0}" + "".join(f", {{{i}}}" for i in range(1, groups + 1))
        raise MapFileError(f"{path}: map entry {pattern!r}: target {target!r} does not format "
                           f"({type(e).__name__}: {e}); it may use {have} and {{{{ }}}} for a "
                           "literal brace") from None


def dump_mapfile(pairs: list[tuple[str, list[str], str]]) -> str:
    """TOML text of a ``[map]`` table: one line per (reference, candidates, how matched)."""
    lines = ["# layerdiff map file: reference layer = candidate layer(s). Edit and pass --map.",
             "[map]"]
    for ref, cands, method in pairs:
        value = _q(cands[0]) if len(cands) == 1 else "[" + ", ".join(_q(c) for c in cands) + "]"
        lines.append(f"{_q(ref)} = {value}  # {method}")
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

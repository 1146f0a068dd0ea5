"""Checks shared by the bad-input tests: the CLI refuses in one line and leaves files alone."""

from __future__ import annotations

from pathlib import Path

from layerdiff.cli import main


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its mtime and bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli_fails(capsys, argv: list, *needles, untouched: Path | None = None) -> str:
    """Run the CLI: exit 2, one stderr line holding every needle, no traceback; with
    ``untouched``, nothing under that folder changed."""
    before = snapshot(untouched) if untouched is not None else None
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    msg = captured.err.strip()
    assert "Traceback" not in msg
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {msg!r}"
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    if before is not None:
        after = snapshot(untouched)
        assert after == before, (f"user files changed: "
                                 f"{sorted(set(after) ^ set(before)) or 'contents/mtimes'}")
    return msg

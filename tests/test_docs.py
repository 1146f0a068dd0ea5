"""The docs stay true: examples run, generated references are fresh, links and commands exist.

Runnable examples are fenced blocks whose info string is ``python test``: each doc's blocks
run in order, in one namespace, in a folder holding the built-in example model (``example/``).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from golden import SHARED, require_shared

from layerdiff import docs_gen
from layerdiff.cli import build_parser
from layerdiff.examples import write_example

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks(path: Path, info: str) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1).strip() == info]


RUNNABLE = [p for p in PAGES if _blocks(p, "python test")]


def test_some_docs_have_runnable_examples():
    assert DOCS / "api.md" in RUNNABLE


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_doc_examples_run(page, tmp_path, monkeypatch):
    write_example(tmp_path / "example")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc_{page.stem}"}
    for line, code in _blocks(page, "python test"):
        exec(compile(code, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102


def test_cli_reference_is_fresh():
    assert (DOCS / "cli.md").read_text() == docs_gen.cli_markdown(), \
        "docs/cli.md is stale: run python -m layerdiff.docs_gen"


def test_layer_coverage_is_fresh():
    require_shared()
    assert (DOCS / "layers.md").read_text() == docs_gen.layers_markdown(SHARED), \
        "docs/layers.md is stale: run python -m layerdiff.docs_gen"


def test_docs_gen_check(tmp_path, capsys):
    require_shared()
    assert docs_gen.main(["--docs", str(tmp_path), "--shared", str(SHARED), "--check"]) == 1
    assert docs_gen.main(["--docs", str(tmp_path), "--shared", str(SHARED)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"cli.md", "layers.md"}
    assert docs_gen.main(["--docs", str(tmp_path), "--shared", str(SHARED), "--check"]) == 0


def test_diagnosis_catalogue_lists_every_probe():
    # Names read from the sources (importing would register probes for the whole session).
    names = set()
    for src in (ROOT / "layerdiff" / "diagnose" / "probes").glob("*.py"):
        names |= set(re.findall(r"@probe\(\s*[\"']([\w-]+)[\"']", src.read_text()))
        names |= {m for m in re.findall(r"^NAME = [\"']([\w-]+)[\"']", src.read_text(), re.M)}
    catalogue = (DOCS / "diagnosis.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in catalogue)
    assert not missing, f"docs/diagnosis.md does not describe probe(s) {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: broken link {target}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_exist(page):
    """Every ``layerdiff SUB --option`` in a shell block is a real subcommand and option."""
    subs = _subcommands()
    for info in ("bash", "text", "sh", ""):
        for _, block in _blocks(page, info):
            for line in block.splitlines():
                line = line.split("#")[0]
                for m in re.finditer(r"(?:^|[\s;&|])(?:\S*/)?layerdiff ([a-z][\w-]*)(.*)", line):
                    sub, rest = m.group(1), m.group(2)
                    if info in ("text", "") and sub not in subs:
                        continue  # prose-like output
                    assert sub in subs, f"{page.name}: unknown command layerdiff {sub}"
                    opts = {o for a in subs[sub]._actions for o in a.option_strings}
                    for tok in shlex.split(rest.split("&&")[0].split("|")[0]):
                        flag = tok.split("=")[0]
                        if flag.startswith("--"):
                            assert flag in opts, f"{page.name}: layerdiff {sub} has no {flag}"

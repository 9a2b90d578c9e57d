"""README.md and docs/*.md: a front page under ~200 lines that starts with the two commands, links that
resolve, and every config path, code path and make target they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PROJECT

README = PROJECT / "README.md"
PAGES = [README, *sorted((PROJECT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CONF_PATH = re.compile(r"conf/[\w./-]+?\.yaml")
# `conf/forecast/co2.yaml`, `sunspots.yaml`
SHORT_CONF = re.compile(r"`(conf/[\w-]+/)[\w-]+\.yaml`((?:, `[\w-]+\.yaml`)+)")
CODE_PATH = re.compile(r"`((?:bptt|benchmarks|tests)/[\w./-]*[\w/])`")
MAKE = re.compile(r"`make ([\w-]+)`|^make ([\w-]+)$", re.M)


def _id(page: Path) -> str:
    return page.relative_to(PROJECT).as_posix()


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[:6] == ["# bptt", "", "```", "make demo", "make test", "```"]
    linked = {m for m in LINK.findall(README.read_text()) if m.startswith("docs/")}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= {link.split("#")[0] for link in linked}


def test_docs_describe_what_is():
    """No narration of how things came to be (rule 15)."""
    words = re.compile(r"\b(this session|previously|used to|no longer|now)\b", re.I)
    for page in PAGES:
        hits = [line for line in page.read_text().splitlines() if words.search(line)]
        assert not hits, f"{_id(page)}: {hits}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{_id(page)}: link {target} points to nothing"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{_id(page)}: no heading for #{anchor} in {_id(file)}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_named_paths_exist(page):
    text = page.read_text()
    named = set(CONF_PATH.findall(text))
    for folder, rest in SHORT_CONF.findall(text):
        named |= {folder + name for name in re.findall(r"`([\w-]+\.yaml)`", rest)}
    named |= {p for p in CODE_PATH.findall(text)}
    missing = sorted(p for p in named if not (PROJECT / p).exists())
    assert not missing, f"{_id(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_make_targets_exist(page):
    targets = set(re.findall(r"^([\w-]+):", (PROJECT / "Makefile").read_text(), re.M))
    named = {a or b for a, b in MAKE.findall(page.read_text())}
    assert named <= targets, f"{_id(page)}: make targets not in the Makefile: {sorted(named - targets)}"


# mlflow ui, ray job submit, ray start
THIRD_PARTY_FLAGS = {"--backend-store-uri", "--working-dir", "--include-dashboard"}


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_commands_and_flags_exist(page):
    """Every `bptt COMMAND` is a command of the CLI, every plain --flag is one the code defines."""
    from bptt.cli import COMMANDS

    commands = set(COMMANDS)
    text = page.read_text()
    named = set(re.findall(r"(?:^|`)bptt (\w+)", text, re.M))
    assert named <= commands, f"{_id(page)}: not bptt commands: {sorted(named - commands)}"
    source = "\n".join(p.read_text() for folder in ("bptt", "benchmarks") for p in (PROJECT / folder).rglob("*.py"))
    from dataclasses import fields

    from bptt.ray_jobs.sweep_config import SweepSpec

    sweep_keys = {f"--{f.name}" for f in fields(SweepSpec)}  # `bptt sweep ... --num_samples 2` overrides one
    flags = set(re.findall(r"(?<![\w.-])(--[a-z][\w-]*)(?![\w.])", text)) - THIRD_PARTY_FLAGS - sweep_keys
    unknown = sorted(f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source)
    assert not unknown, f"{_id(page)}: flags no code defines: {unknown}"


@pytest.mark.slow
def test_the_python_api_page_runs_as_written(tmp_path):
    """docs/python-api.md's code blocks, in order, in one fresh interpreter in an empty directory."""
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (PROJECT / "docs" / "python-api.md").read_text(), re.S)
    assert len(blocks) == 3
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    val_loss, val_bpc = map(float, printed[0].split())
    assert abs(val_bpc - val_loss / 0.6931471805599453) < 1e-4  # bits per character: the loss in bits
    assert float(printed[1]) > 0  # resumed to step 9
    assert any(line.startswith("{'test/loss': ") for line in printed)  # evaluate's dict, after Lightning's table
    assert any(line.startswith("def ") for line in printed)  # the prompt and its sampled continuation
    assert (tmp_path / "runs/notebook/config.yaml").is_file() and (tmp_path / "mlflow.db").is_file()
    assert printed[-1].startswith("tensor(")  # the plain Trainer's train/loss

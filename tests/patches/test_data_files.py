"""The project's own prompt files (``patches/data``): well-formed, no prompt in two files or twice in one,
and the README's table states each file's true line count."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from patches.train.config import PROJECT_DATA

PROMPT_FILES = sorted(PROJECT_DATA.glob("*.txt"))


def _key(line: str) -> str:
    return line.strip().lower().rstrip(".?!")


@pytest.mark.parametrize("path", PROMPT_FILES, ids=lambda p: p.name)
def test_one_prompt_a_line(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert text.endswith("\n") and lines
    assert all(line.strip() == line and line for line in lines), "blank line or stray whitespace"
    assert not [line for line in lines if re.match(r"\d+[.)] ", line)], "numbered lines"


def test_no_prompt_twice_across_files() -> None:
    seen = Counter(_key(line) for path in PROMPT_FILES for line in path.read_text(encoding="utf-8").splitlines())
    assert [k for k, n in seen.items() if n > 1] == []


def test_readme_counts_match_the_files() -> None:
    readme = (PROJECT_DATA / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z0-9_]+\.txt)` \| (\d+)", readme, flags=re.M))
    prompt_files = {p.name for p in PROMPT_FILES if not p.name.startswith("fairness_")}  # templates: own table
    assert set(rows) >= prompt_files
    for name in prompt_files:
        assert int(rows[name]) == len((PROJECT_DATA / name).read_text(encoding="utf-8").splitlines()), name

"""Prompt files and the deterministic held-out split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    text: str
    harmful: bool
    source: str = ""  # the stem of the file it came from


def read_prompts(path: Path) -> list[str]:
    """Prompts from a ``.txt`` file (one a line) or a ``.jsonl`` file (field ``prompt``), blank lines skipped."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".jsonl":
        return [str(json.loads(line)["prompt"]).strip() for line in lines if line]
    return [line for line in lines if line]


def is_heldout(text: str, holdout: float) -> bool:
    """Stable split by content hash: the same prompt is held out in every run and on every machine."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") / 2**32
    return bucket < holdout


def load_split(harmful: list[Path], benign: list[Path], holdout: float) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) prompts from both classes, deduplicated, in file order."""
    seen: set[str] = set()
    train: list[Prompt] = []
    heldout: list[Prompt] = []
    for files, is_harmful in ((harmful, True), (benign, False)):
        for path in files:
            for text in read_prompts(path):
                key = text.casefold()
                if key in seen:
                    continue
                seen.add(key)
                (heldout if is_heldout(text, holdout) else train).append(Prompt(text, is_harmful, path.stem))
    return train, heldout


def write_heldout(prompts: list[Prompt], directory: Path) -> tuple[Path, Path]:
    """Write the held-out split as ``heldout_harmful.txt`` and ``heldout_benign.txt`` for ``patchserve eval``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "heldout_harmful.txt", directory / "heldout_benign.txt"
    for path, harmful in zip(paths, (True, False), strict=True):
        path.write_text("".join(f"{p.text}\n" for p in prompts if p.harmful == harmful), encoding="utf-8")
    return paths

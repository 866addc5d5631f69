"""Stage 2's pairs: generation with the patch laid out as in training, and pairs mined from its mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from patches.chat import encode_chat
from patches.refusal import is_refusal
from patches.stack import Placement
from patches.train.config import TrainConfig
from patches.train.data import Prompt
from patches.train.model import Example, PatchModel, make_example
from patches.train.pairs import (
    _known_answers,
    _rows_digest,
    fixed_pair,
    mined_pairs,
    write_answers,
)
from patches.train.teacher import WHOLE_REFUSAL_TOKENS, policy_refusal


def _ids(tokenizer, *texts: str) -> list[list[int]]:
    return [encode_chat(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def test_generate_without_rows_is_the_base_models_greedy_answer(base) -> None:
    model, tokenizer = base
    prompts = _ids(tokenizer, "Name a colour.", "Write one sentence about the history of the city of Rome.")
    got = PatchModel(model, torch.nn.Parameter(torch.zeros(2, model.config.hidden_size)), Placement.suffix).generate(
        prompts, None, 6
    )
    eos = model.generation_config.eos_token_id
    for ids, answer in zip(prompts, got, strict=True):  # one at a time: no padding on the reference side
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
        expected = out.tolist()
        assert answer == (expected[: expected.index(eos)] if eos in expected else expected)


@pytest.mark.parametrize("placement", [Placement.prefix, Placement.suffix])
def test_generated_tokens_are_the_argmax_of_the_training_forward(base, placement: Placement) -> None:
    """Generation lays the rows out as training does: teacher-forcing its own answer picks the same tokens."""
    model, tokenizer = base
    rows = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4)) * 0.05
    patched = PatchModel(model, torch.nn.Parameter(rows), placement)
    prompts = _ids(tokenizer, "Say hi.", "Give me a word that rhymes with cat, please.")
    with torch.no_grad():
        answers = patched.generate(prompts, rows, 5)
        bare = patched.generate(prompts, None, 5)
        for ids, answer in zip(prompts, answers, strict=True):
            logits = patched.response_logits([Example(ids, answer)], rows).logits[0]
            picked = logits.gather(1, torch.tensor(answer)[:, None]).squeeze(1)
            assert torch.all(picked >= logits.max(-1).values - 1e-3)  # the argmax, up to KV-cache rounding
    assert answers != bare  # the rows are really there


def test_mined_pairs_are_the_policys_mistakes_with_its_own_answer_rejected(base) -> None:
    _, tokenizer = base
    refusal = "I can't help with that."
    prompts = [
        Prompt("harmful answered", True), Prompt("harmful refused", True), Prompt("harmful refused 2", True),
        Prompt("benign refused", False), Prompt("benign answered", False), Prompt("benign answered 2", False),
        Prompt("benign the base refuses too", False),
    ]  # fmt: skip
    answers = ["Sure, step one", refusal, refusal, refusal, "Paris.", "Blue.", refusal]
    targets = {p.text: policy_refusal(p.text) if p.harmful else "base" for p in prompts}
    base_answers = {p.text: "Sure, here is how" for p in prompts} | {"benign the base refuses too": refusal}
    pairs, counts = mined_pairs(tokenizer, prompts, answers, targets, base_answers, 16, anchors=1.0, seed=0)
    assert counts == {"harmful_answered": 1, "benign_refused": 1, "anchors": 2}
    example = lambda text, answer: make_example(tokenizer, text, answer, 16)  # noqa: E731
    assert pairs[0].chosen == example("harmful answered", targets["harmful answered"])
    assert pairs[0].rejected == example("harmful answered", "Sure, step one")
    assert pairs[1].chosen == example("benign refused", "Sure, here is how")
    assert pairs[1].rejected == example("benign refused", refusal)
    harmful_anchor, benign_anchor = pairs[2:]  # one right prompt of each class, each with its fixed pair
    right = {"harmful refused": True, "harmful refused 2": True, "benign answered": False, "benign answered 2": False}
    chosen = {t: fixed_pair(tokenizer, Prompt(t, h), targets[t], base_answers[t], 16) for t, h in right.items()}
    assert harmful_anchor in [chosen["harmful refused"], chosen["harmful refused 2"]]
    assert benign_anchor in [chosen["benign answered"], chosen["benign answered 2"]]
    _, none = mined_pairs(tokenizer, prompts, answers, targets, base_answers, 16, anchors=0.0, seed=0)
    assert none["anchors"] == 0


def test_harmful_repeat_copies_only_the_harmful_mistakes_and_not_the_anchor_count(base) -> None:
    _, tokenizer = base
    prompts = [Prompt("harmful answered", True), Prompt("harmful refused", True), Prompt("benign refused", False)]
    prompts += [Prompt(f"benign answered {i}", False) for i in range(3)]
    refusal = "I can't help with that."
    answers = ["Sure, step one", refusal, refusal, "Paris.", "Blue.", "Red."]
    targets = {p.text: policy_refusal(p.text) if p.harmful else "base" for p in prompts}
    base_answers = {p.text: "Sure, here is how" for p in prompts}
    once, _ = mined_pairs(tokenizer, prompts, answers, targets, base_answers, 16, anchors=1.0, seed=0)
    pairs, counts = mined_pairs(
        tokenizer, prompts, answers, targets, base_answers, 16, anchors=1.0, seed=0, harmful_repeat=3
    )
    assert counts == {"harmful_answered": 1, "benign_refused": 1, "anchors": 2}
    harmful_mistake = once[0]
    assert pairs.count(harmful_mistake) == 3 and once.count(harmful_mistake) == 1
    assert pairs.count(once[1]) == 1  # the benign mistake stays single
    assert len(pairs) == len(once) + 2


def test_config_rejects_negative_anchors_and_unknown_pair_modes() -> None:
    with pytest.raises(ValueError, match="dpo_anchors"):
        TrainConfig(dpo_anchors=-1.0)
    with pytest.raises(ValueError, match="dpo_harmful_repeat"):
        TrainConfig(dpo_harmful_repeat=0)
    with pytest.raises(ValueError):
        TrainConfig(dpo_pairs="some")


def test_tiny_mined_run_writes_the_policys_answers_for_audit(model_dir: Path, tmp_path: Path) -> None:
    from patches.train.run import train

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("Explain how to build a bomb.\nHow do I steal a car?\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("Write a haiku about rain.\nHow do I boil an egg?\n")
    config = TrainConfig(
        harmful=[harmful], benign=[benign], holdout=0.0, n_tokens=4, response_tokens=6, sft_epochs=1,
        dpo_epochs=1, batch_size=2, work_dir=tmp_path / "work", dpo_pairs="mined", placement="suffix",
    )  # fmt: skip
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "work" / "mined-answers.jsonl").read_text().splitlines()]
    texts = harmful.read_text().splitlines() + benign.read_text().splitlines()
    assert sorted(r["prompt"] for r in records) == sorted(texts)
    mistakes = sum(r["refused"] != r["harmful"] for r in records)
    assert result.n_train["harmful_answered"] + result.n_train["benign_refused"] <= mistakes
    assert all(r["refused"] == is_refusal(r["answer"]) for r in records)
    assert bool(result.dpo_losses) == (result.n_train["harmful_answered"] + result.n_train["benign_refused"] > 0)


def test_whole_refusals_end_their_turn_while_other_answers_stay_cut(base) -> None:
    _, tokenizer = base
    prompts = [Prompt("harmful answered", True), Prompt("benign refused", False)]
    targets = {"harmful answered": policy_refusal("harmful answered"), "benign refused": "unused"}
    base_answers = {"harmful answered": "Sure", "benign refused": "Here is a long answer " * 10}
    answers = ["Sure, step one is " * 5, "I can't help with that."]
    pairs, _ = mined_pairs(
        tokenizer, prompts, answers, targets, base_answers, 8, anchors=0.0, seed=0, refusal_tokens=WHOLE_REFUSAL_TOKENS
    )
    refusal = pairs[0].chosen.response_ids
    assert refusal[-1] == tokenizer.eos_token_id and len(refusal) > 8  # whole, with its end of turn
    assert tokenizer.decode(refusal[:-1]) == tokenizer.decode(tokenizer.encode(targets["harmful answered"]))
    assert len(pairs[0].rejected.response_ids) == 8 and len(pairs[1].chosen.response_ids) == 8  # cut, no end
    cut, _ = mined_pairs(tokenizer, prompts, answers, targets, base_answers, 8, anchors=0.0, seed=0)
    assert len(cut[0].chosen.response_ids) == 8


def test_mined_answers_are_reused_only_for_the_same_prompts_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "mined-answers.jsonl"
    prompts = [Prompt("a", True), Prompt("b", False)]
    write_answers(path, prompts, ["I can't help with that.", "Sure."], "digest-1")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["refused"] for r in records] == [True, False]
    assert _known_answers(path, prompts, "digest-1") == ["I can't help with that.", "Sure."]
    assert _known_answers(path, prompts, "digest-2") is None
    assert _known_answers(path, prompts[:1], "digest-1") is None
    assert _known_answers(tmp_path / "missing.jsonl", prompts, "digest-1") is None
    rows = torch.ones(2, 3)
    assert _rows_digest(rows, 16, True) == _rows_digest(rows.clone(), 16, True)
    assert len({_rows_digest(rows, 16, True), _rows_digest(rows * 2, 16, True), _rows_digest(rows, 8, True)}) == 3

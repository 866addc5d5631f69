"""The detox recipe without an engine: classifier, continuation data, the sampled teacher, a tiny real run, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from patches import continuations, toxicity
from patches.cli import app
from patches.train.config import TrainConfig
from patches.train.detox import (
    Choice,
    Sample,
    banned_sequences,
    choose,
    continuation_example,
    sample_continuations,
    write_choices,
)


class PositionScorer:
    """Scores by position in each call: ``values`` repeated."""

    name = "fake"

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.calls: list[list[str]] = []

    def score(self, texts: list[str]) -> list[float]:
        self.calls.append(list(texts))
        return [self.values[i % len(self.values)] for i in range(len(texts))]


class TableScorer:
    """Scores from a table (0 for unknown texts)."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, texts: list[str]) -> list[float]:
        return [self.table.get(t, 0.0) for t in texts]


def test_classifier_scores_offline_in_unit_range() -> None:
    scores = toxicity.score(["What a lovely garden you have.", "You are a worthless stupid idiot.", ""])
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] < 0.2 < toxicity.TOXIC < scores[1]
    assert toxicity.score([]) == []


def test_fast_path_equals_the_packages_own_predict_prob() -> None:
    import profanity_check

    texts = [line for path in continuations.default_files() for line in path.read_text().splitlines() if line][:400]
    texts += ["You are a worthless stupid idiot.", "", "Nice day!"]
    scorer = toxicity.ProfanityCheckScorer()
    assert scorer.score(texts) == pytest.approx(list(profanity_check.predict_prob(texts)), abs=1e-9)
    assert scorer._fast  # the fast path is the one in use (a model of another shape would use predict_prob)


def test_missing_classifier_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise ImportError(name)

    monkeypatch.setattr(toxicity.importlib, "import_module", missing)
    with pytest.raises(toxicity.ScorerUnavailable, match="pip install alt-profanity-check"):
        toxicity.ProfanityCheckScorer().score(["x"])


def test_continuation_files_split_by_hash_and_dedupe(tmp_path: Path) -> None:
    (tmp_path / "rtp_a.txt").write_text("\n".join(f"Opening number {i} of" for i in range(100)) + "\n\n")
    (tmp_path / "more.jsonl").write_text(
        json.dumps({"prompt": "opening NUMBER 3 of"}) + "\n" + json.dumps({"prompt": "Fresh one", "source": "x"}) + "\n"
    )
    loaded = continuations.read_continuations([tmp_path / "rtp_a.txt", tmp_path / "more.jsonl"])
    assert len(loaded) == 101 and loaded[-1] == continuations.Continuation("Fresh one", "x")
    train, held = continuations.split(loaded, 0.25)
    assert (train, held) == continuations.split(loaded, 0.25)
    assert not {p.text for p in train} & {p.text for p in held} and 10 < len(held) < 45
    out = continuations.write_jsonl(held, tmp_path / "held.jsonl")
    assert continuations.read_continuations([out]) == held


def test_shared_rtp_split_is_stable() -> None:
    files = continuations.default_files()
    if not files:
        pytest.skip("../shared/data/realtoxicityprompts is absent")
    train, held = continuations.split(continuations.read_continuations(files), 0.2)
    assert (len(train), len(held)) == (496, 127)


def _s(text: str, n: int = 5, ended: bool = False) -> Sample:
    return Sample(text, tuple(range(n)), ended)


def test_choose_picks_clean_continuations_not_refusals_or_stubs() -> None:
    samples = {
        "a": [_s("nice"), _s("I'm sorry, I can't continue that."), _s("bad"), _s("ok", n=2)],
        "b": [_s("toxic 1"), _s("toxic 2")],
        "c": [_s("short tie", n=4), _s("long tie", n=9), _s("meh")],
    }
    scores = {"nice": 0.2, "I'm sorry, I can't continue that.": 0.0, "bad": 0.97, "ok": 0.01}
    scores |= {"toxic 1": 0.8, "toxic 2": 0.6, "short tie": 0.1, "long tie": 0.1, "meh": 0.15}
    choices = choose(samples, TableScorer(scores), min_tokens=4)
    by_prompt = {c.prompt: c for c in choices}
    assert set(by_prompt) == {"a", "c"}  # b: even its cleanest continuation is toxic
    a = by_prompt["a"]
    assert (a.chosen.text, a.rejected.text) == ("nice", "bad")  # refusal and 2-token stub are not eligible
    assert a.is_preference(0.1) and not a.is_preference(0.8)
    c = by_prompt["c"]
    assert c.chosen.text == "long tie" and c.rejected.text == "meh" and not c.is_preference(0.1)


def test_with_clean_samples_the_chosen_side_comes_from_them_and_the_rejected_from_the_free_ones() -> None:
    samples = {"a": [_s("free mild"), _s("free awful")], "b": [_s("free ok")]}
    clean = {"a": [_s("clean one"), _s("clean two")], "b": [_s("clean toxic")]}
    scores = {"free mild": 0.3, "free awful": 0.9, "clean one": 0.2, "clean two": 0.05, "free ok": 0.1}
    choices = {c.prompt: c for c in choose(samples, TableScorer(scores | {"clean toxic": 0.7}), clean=clean)}
    a = choices["a"]
    assert (a.chosen.text, a.chosen_score, a.rejected.text, a.rejected_score) == ("clean two", 0.05, "free awful", 0.9)
    assert "b" not in choices  # its clean sample is still toxic: nothing clean to learn, even with a clean free one


def test_the_classifiers_most_offensive_words_are_profanity_and_banned_in_every_casing(base) -> None:
    _, tokenizer = base
    words = toxicity.offensive_words(toxicity.default_scorer(), 40)
    assert len(words) == 40 and {"fuck", "idiot", "stupid"} <= set(words) and "weather" not in words
    top = toxicity.offensive_words(toxicity.default_scorer(), 300)
    assert len(top) == 300 and "weather" not in top and not set(top) & toxicity.GROUP_TERMS
    assert {"gay", "white"} <= set(toxicity.default_scorer().top_words(300))  # what the exclusion is for
    with pytest.raises(ValueError, match="word weights"):
        toxicity.offensive_words(TableScorer({}), 10)
    banned = banned_sequences(tokenizer, ["idiot"])
    forms = {tokenizer.decode(ids) for ids in banned}
    assert forms == {" idiot", "idiot", " Idiot", "Idiot", " IDIOT", "IDIOT"} and len(banned) == 6


def test_banned_words_are_never_sampled_and_the_ban_has_its_own_cache_entry(base, tmp_path: Path) -> None:
    model, tokenizer = base
    opening = ["You are a stupid, stupid"]
    words = ["stupid", "idiot", "fool", "moron", "dumb", "person", "man", "little"]
    banned = banned_sequences(tokenizer, words)
    common = {"k": 6, "max_tokens": 12, "cache": tmp_path / "s.jsonl", "model_tag": "m", "seed": 1}
    free = sample_continuations(model, tokenizer, opening, **common)[opening[0]]
    clean = sample_continuations(model, tokenizer, opening, banned=banned, **common)[opening[0]]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2  # one record each: different cache keys
    one_token = {ids[0] for ids in banned if len(ids) == 1}
    assert not any(set(s.ids) & one_token for s in clean)
    assert any(set(s.ids) & one_token for s in free)  # the ban is what kept them out, not chance


def test_a_single_sample_is_never_a_pair() -> None:
    (choice,) = choose({"p": [_s("only")]}, TableScorer({}))
    assert choice.chosen is choice.rejected and not choice.is_preference(0.0)


class FakeTokenizer:
    eos_token_id = 2
    pad_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens  # completion prompts: plain text, as the server encodes them
        return [10 + len(w) for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(f"t{i}" for i in ids)


def test_continuation_example_ends_only_what_the_model_ended() -> None:
    tok = FakeTokenizer()
    ended = continuation_example(tok, "one two", Sample("x", (5, 6), True), 8)
    assert (ended.prompt_ids, ended.response_ids) == ([13, 13], [5, 6, 2])
    assert continuation_example(tok, "one", Sample("x", (5, 6, 7), False), 8).response_ids == [5, 6, 7]
    assert continuation_example(tok, "one", Sample("x", (5, 6, 7), True), 2).response_ids == [5, 6]
    assert continuation_example(tok, "one", Sample("", (), True), 8).response_ids == [2]  # stopped at once
    with pytest.raises(ValueError, match="empty"):
        continuation_example(tok, "one", Sample("", (), False), 8)


class FakeModel:
    """``generate`` appends rows of sampled-looking ids; the third sequence of each prompt ends early."""

    class generation_config:  # noqa: N801 - mirrors the HF attribute
        eos_token_id = 2

    device = torch.device("cpu")  # as a HF model's ``.device``

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.calls.append({"shape": tuple(input_ids.shape), "mask": attention_mask.tolist(), **kw})
        k, n = kw["num_return_sequences"], kw["max_new_tokens"]
        rows = []
        for b in range(input_ids.shape[0]):
            for j in range(k):
                new = [int(torch.randint(3, 100, ()).item()) for _ in range(n)]
                if j == 2:
                    new = new[:1] + [2] * (n - 1)
                rows.append(input_ids[b].tolist() + new)
        return torch.tensor(rows)


def test_sampling_is_raw_text_cached_and_cut_at_eos(tmp_path: Path) -> None:
    model, tok = FakeModel(), FakeTokenizer()
    prompts = ["a bb", "ccc", "dd e ffff"]
    kwargs = {"k": 3, "max_tokens": 4, "cache": tmp_path / "s.jsonl", "model_tag": "m", "batch_prompts": 2}
    first = sample_continuations(model, tok, prompts, **kwargs)  # type: ignore[arg-type]
    assert [c["shape"] for c in model.calls] == [(2, 2), (1, 3)]
    assert model.calls[0]["mask"] == [[1, 1], [0, 1]]  # left-padded
    assert model.calls[0]["do_sample"] and model.calls[0]["temperature"] == 1.0 and model.calls[0]["top_k"] == 0
    assert all(len(v) == 3 for v in first.values())
    assert [(len(s.ids), s.ended) for s in first["ccc"]] == [(4, False), (4, False), (1, True)]
    again = sample_continuations(model, tok, prompts, **kwargs)  # type: ignore[arg-type]
    assert again == first and len(model.calls) == 2  # all from the cache
    other = sample_continuations(model, tok, prompts, **{**kwargs, "cache": tmp_path / "t.jsonl"})  # type: ignore[arg-type]
    assert other == first  # seeded per chunk: the same samples on a fresh run
    sample_continuations(model, tok, prompts, **{**kwargs, "k": 2})  # type: ignore[arg-type]
    assert len(model.calls) == 6  # another k is another cache entry


def test_choices_are_written_for_audit(tmp_path: Path) -> None:
    choice = Choice("p", _s("clean"), 0.01, _s("dirty"), 0.9)
    path = write_choices([choice], tmp_path / "c.jsonl", 0.1)
    assert json.loads(path.read_text()) == {
        "prompt": "p",
        "chosen": "clean",
        "chosen_score": 0.01,
        "rejected": "dirty",
        "rejected_score": 0.9,
        "pair": True,
    }


def test_detox_config_checks() -> None:
    for field, value in [("samples", 1), ("task", "nope"), ("min_tokens", 0), ("detox_margin", 2.0), ("ban_words", -1)]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value}).detox_checks()
    TrainConfig(task="detox").detox_checks()


def test_tiny_real_detox_run_writes_a_signed_servable_patch(model_dir: Path, tmp_path: Path) -> None:
    from patches.fingerprint import model_spec
    from patches.format import parse_patch
    from patches.signing import generate_keypair
    from patches.train.detox import train_detox

    openings = tmp_path / "openings.txt"
    openings.write_text("The man then grabbed a knife and\nShe looked at the garden and\nYou are such a\n")
    private, _ = generate_keypair(tmp_path / "keys", "t")
    scorer = PositionScorer([0.05, 0.9])  # first sample of each opening clean, second toxic
    config = TrainConfig(
        task="detox", name="detox", version=2, continuations=[openings], holdout=0.0, samples=2,
        continuation_tokens=5, min_tokens=1, n_tokens=3, batch_size=3, sft_epochs=1, dpo_epochs=1,
        work_dir=tmp_path / "work", key=private, threads=1, placement="suffix",
    )  # fmt: skip
    result = train_detox(config, scorer=scorer)
    patch = parse_patch(result.patch.read_bytes(), expect=model_spec(model_dir))
    assert (patch.ref, patch.n_tokens, patch.placement) == ("detox@2", 3, "suffix")
    assert "detox" in patch.meta.description and patch.meta.signer and patch.meta.domain == "toxicity"
    assert result.n_train["openings"] == 3 and result.n_train["sft"] >= 1
    assert result.sft_losses and all(math.isfinite(x) for x in result.sft_losses + result.dpo_losses)
    assert (tmp_path / "work" / "detox-choices.jsonl").is_file() and result.heldout.read_text() == ""
    cached = (tmp_path / "work").glob("detox-samples-*.jsonl")
    assert sum(len(p.read_text().splitlines()) for p in cached) == 3


def test_cli_train_detox_rejects_bad_options_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--task", "detox", "--samples", "1", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "samples=1" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("task", ["refusal", "detox", "fairness"])
@pytest.mark.parametrize("option", ["--stack-with", "--init-from"])
def test_cli_train_names_an_unusable_patch_file_without_a_traceback(tmp_path: Path, task: str, option: str) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a patch")
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["train", "--task", task, option, str(junk), "--work-dir", str(work)])
    assert result.exit_code == 2 and "not a usable patch file" in result.output, result.output
    assert "Traceback" not in result.output and not list(work.glob("*answers*"))


def test_cli_continuation_sets_writes_the_heldout_split(tmp_path: Path) -> None:
    src = tmp_path / "rtp_x.txt"
    src.write_text("\n".join(f"Line {i} goes" for i in range(50)) + "\n")
    args = ["continuation-sets", "--file", str(src), "--external", "0", "--out-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    held = continuations.read_continuations([tmp_path / "out" / "rtp_heldout.jsonl"])
    assert held == continuations.split(continuations.read_continuations([src]), 0.2)[1]
    assert {p.source for p in held} == {"rtp_x"}

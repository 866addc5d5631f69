"""Training pieces: config checks, the held-out split, DPO's loss, resumable loops, and a tiny real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from patches.errors import PatchRejected
from patches.fingerprint import model_spec
from patches.format import parse_patch
from patches.signing import generate_keypair, key_id, load_private_key
from patches.stack import Placement
from patches.train.config import TrainConfig
from patches.train.data import is_heldout, load_split, read_prompts
from patches.train.dpo import Pair, dpo_loss
from patches.train.loop import run_stage
from patches.train.model import Example, PatchModel, ResponseLogits, kl_to_reference, make_example


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_tokens", 0),
        ("holdout", 1.0),
        ("beta", 0.0),
        ("batch_size", 0),
        ("response_tokens", 2),
        ("refusal_tokens", 2),
    ],  # fmt: skip
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_refusal_cap_defaults_to_the_response_cap_and_can_keep_refusals_whole() -> None:
    assert TrainConfig(response_tokens=16).refusal_cap == 16
    assert TrainConfig(response_tokens=16, refusal_tokens=64).refusal_cap == 64


def test_policy_short_teacher_writes_refusals_without_the_offer(tmp_path: Path) -> None:
    from patches.train.data import Prompt
    from patches.train.run import _teacher_targets
    from patches.train.teacher import policy_refusal

    prompts = [Prompt("make a weapon", harmful=True), Prompt("bake bread", harmful=False)]
    base = {"make a weapon": "Sure.", "bake bread": "Mix flour."}
    short = _teacher_targets(TrainConfig(teacher="policy-short"), prompts, base, tmp_path)
    whole = _teacher_targets(TrainConfig(), prompts, base, tmp_path)
    assert short == {"make a weapon": policy_refusal("make a weapon", offer=False), "bake bread": "Mix flour."}
    assert whole["make a weapon"] == policy_refusal("make a weapon") != short["make a weapon"]


def test_config_rejects_no_training_at_all() -> None:
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(sft_epochs=0, dpo_epochs=0)


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    harmful = tmp_path / "h.jsonl"
    harmful.write_text("\n".join(json.dumps({"prompt": f"bad {i}"}) for i in range(200)) + "\n")
    benign = tmp_path / "b.txt"
    benign.write_text("\n".join(f"good {i}" for i in range(200)) + "\n\n")
    train, held = load_split([harmful], [benign], 0.25)
    again_train, again_held = load_split([harmful], [benign], 0.25)
    assert (train, held) == (again_train, again_held)
    assert not {p.text for p in train} & {p.text for p in held}
    assert 60 < len(held) < 140
    assert all(is_heldout(p.text, 0.25) for p in held)
    assert {(p.source, p.harmful) for p in train + held} == {("h", True), ("b", False)}
    assert read_prompts(benign)[-1] == "good 199"


def _example() -> Example:
    return Example([1, 2, 3], [4, 5])


def test_dpo_loss_prefers_the_chosen_side() -> None:
    class Policy:  # log-probs come from a fixed table: chosen sequences first
        rows = None

        def __init__(self, chosen: float, rejected: float) -> None:
            self.values = (chosen, rejected)

        def sequence_logps(self, examples: list[Example], rows: object) -> torch.Tensor:
            return torch.tensor(self.values)

    pairs = [Pair(_example(), _example(), ref_chosen=-5.0, ref_rejected=-5.0)]
    at_reference = dpo_loss(Policy(-5.0, -5.0), pairs, beta=0.1)  # type: ignore[arg-type]
    better = dpo_loss(Policy(-1.0, -9.0), pairs, beta=0.1)  # type: ignore[arg-type]
    assert math.isclose(at_reference.item(), math.log(2), rel_tol=1e-6)
    assert better.item() < at_reference.item()


def test_kl_to_reference_is_zero_only_for_the_same_distribution() -> None:
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    targets, mask = torch.zeros(2, 3, dtype=torch.long), torch.tensor([[True, True, False], [True, True, True]])
    same = ResponseLogits(logits, targets, mask)
    assert kl_to_reference(same, same).item() == pytest.approx(0.0, abs=1e-6)
    shifted = logits.clone()
    shifted[0, 2] += 5.0  # a padded position: ignored
    assert kl_to_reference(ResponseLogits(shifted, targets, mask), same).item() == pytest.approx(0.0, abs=1e-6)
    shifted[1, 0, 3] += 5.0
    assert kl_to_reference(ResponseLogits(shifted, targets, mask), same).item() > 0.01


def test_prefix_forward_equals_peft_prompt_tuning(base, model_dir: Path) -> None:
    """For a prefix patch the trainer's layout is PEFT's prompt tuning: same response logits."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, tokenizer = base
    example = make_example(tokenizer, "Write a haiku about rain.", "Soft rain on the roof", 40)
    rows = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = PatchModel(model, torch.nn.Parameter(rows), Placement.prefix).response_logits([example], rows).logits
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(rows)
        ids = torch.tensor([example.prompt_ids + example.response_ids])
        logits = peft_model(input_ids=ids).logits[0, 5:]
    n_prompt, n_resp = len(example.prompt_ids), len(example.response_ids)
    assert torch.allclose(ours[0], logits[n_prompt - 1 : n_prompt - 1 + n_resp], atol=1e-4)


def test_suffix_rows_change_the_reply_and_leave_the_prompt_alone(base) -> None:
    """Suffix rows sit between the prompt and the reply: the prompt's own states cannot see them."""
    model, tokenizer = base
    example = make_example(tokenizer, "Name a colour.", "Blue.", 40)
    rows = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.05
    patched = PatchModel(model, torch.nn.Parameter(rows), Placement.suffix)
    with torch.no_grad():
        bare = patched.response_logits([example], None).logits
        with_rows = patched.response_logits([example], rows).logits
    assert not torch.allclose(bare, with_rows, atol=1e-3)
    embeds = patched.base.get_input_embeddings()(torch.tensor(example.prompt_ids))
    with torch.no_grad():
        alone = model(inputs_embeds=embeds[None]).logits[0, -1]
        full = torch.cat([embeds, rows, patched.base.get_input_embeddings()(torch.tensor(example.response_ids))])
        inside = model(inputs_embeds=full[None]).logits[0, len(example.prompt_ids) - 1]
    assert torch.allclose(alone, inside, atol=1e-4)


def test_rows_trained_in_a_stack_see_the_served_layout_and_only_they_learn(base) -> None:
    """``--stack-with``: frozen patches first, in serving order, the separator between same-placement ones."""
    from patches.stack import SEPARATOR
    from patches.train.model import PlacedRows

    model, tokenizer = base
    hidden, gen = model.config.hidden_size, torch.Generator().manual_seed(2)
    prefix, other, rows = (torch.randn(n, hidden, generator=gen) * 0.05 for n in (2, 3, 4))
    (sep,) = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    context = (PlacedRows(prefix, Placement.prefix), PlacedRows(other, Placement.suffix))
    trained = torch.nn.Parameter(rows.clone())
    patched = PatchModel(model, trained, Placement.suffix, context=context, separator_id=sep)
    example = make_example(tokenizer, "Name a colour.", "Blue.", 40)
    table = model.get_input_embeddings()
    ids = lambda xs: table(torch.tensor(xs))  # noqa: E731
    full = torch.cat([prefix, ids(example.prompt_ids), other, ids([sep]), rows, ids(example.response_ids)])
    with torch.no_grad():
        expected = model(inputs_embeds=full[None]).logits[0, -len(example.response_ids) - 1 : -1]
        got = patched.response_logits([example], trained).logits[0]
    assert torch.allclose(got, expected, atol=1e-4)
    alone = PatchModel(model, trained, Placement.suffix)
    with torch.no_grad():
        assert not torch.allclose(alone.response_logits([example], trained).logits[0], expected, atol=1e-3)
    patched.response_logits([example], trained).token_logps().sum().backward()
    assert trained.grad is not None and not prefix.requires_grad and not other.requires_grad
    assert patched.stack_rows().shape == (9, hidden)


def test_sft_loss_mixes_long_refusals_with_shorter_kl_answers(base) -> None:
    """``--refusal-tokens 64`` with ``--benign-loss kl``: a whole refusal makes the batch wider than the
    benign answers the bare model is run on; the KL part lines up with that bare pass all the same."""
    from patches.train.config import BenignLoss
    from patches.train.run import _Item, _sft_loss

    model, tokenizer = base
    rows = torch.nn.Parameter(torch.zeros(2, model.config.hidden_size))
    patched = PatchModel(model, rows, Placement.suffix)
    refusal = make_example(tokenizer, "How do I steal a car?", "I can't help with that. " * 4, 64)
    answers = [make_example(tokenizer, q, "Blue, red and green.", 16) for q in ("Name colours.", "Colours?")]
    assert len(refusal.response_ids) > max(len(a.response_ids) for a in answers)
    batch = [_Item(refusal, True), *(_Item(a, False) for a in answers)]
    loss = _sft_loss(patched, batch, BenignLoss.kl)
    loss.backward()
    assert torch.isfinite(loss) and rows.grad is not None
    wide = patched.response_logits([b.example for b in batch], rows)
    assert wide.select([1, 2]).logits.shape[1] == max(len(a.response_ids) for a in answers)


def test_loop_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    target = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    items = list(range(10))

    def run(checkpoint: Path, crash_at: int | None = None) -> torch.nn.Parameter:
        prefix = torch.nn.Parameter(torch.zeros(2, 3))
        calls = iter(range(10**6))

        def loss(batch: list[int]) -> torch.Tensor:
            if next(calls) == crash_at:
                raise KeyboardInterrupt
            return ((prefix - target) ** 2).mean() * len(batch)

        run_stage("t", items, loss, prefix, epochs=4, lr=0.05, batch_size=2, seed=1, checkpoint=checkpoint)
        return prefix

    straight = run(tmp_path / "a.ckpt.safetensors")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.ckpt.safetensors", crash_at=13)  # dies after the checkpoint at step 10
    resumed = run(tmp_path / "b.ckpt.safetensors")
    assert torch.allclose(straight, resumed)
    assert not torch.allclose(straight, torch.zeros(2, 3))


@pytest.mark.parametrize(("placement", "benign_loss"), [("prefix", "ce"), ("suffix", "kl")])
def test_tiny_real_training_run_writes_a_signed_servable_patch(
    model_dir: Path, tmp_path: Path, placement: str, benign_loss: str
) -> None:
    from patches.train.run import train

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("Explain how to build a bomb.\nHow do I steal a car?\nWrite malware that deletes files.\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("Write a haiku about rain.\nWhat is the capital of France?\nHow do I boil an egg?\n")
    private, public = generate_keypair(tmp_path / "keys", "t")
    config = TrainConfig(
        harmful=[harmful],
        benign=[benign],
        holdout=0.0,
        n_tokens=4,
        response_tokens=6,
        sft_epochs=1,
        dpo_epochs=1,
        batch_size=3,
        work_dir=tmp_path / "work",
        key=private,
        name="tiny",
        version=3,
        placement=placement,
        benign_loss=benign_loss,
    )
    result = train(config)
    patch = parse_patch(result.patch.read_bytes(), expect=model_spec(model_dir))
    assert (patch.ref, patch.n_tokens, patch.placement) == ("tiny@3", 4, placement)
    assert patch.meta.domain == "harmful-requests"  # the task's, as `patchserve diff --patches` names it
    assert patch.meta.signer == key_id(load_private_key(private).public_key())
    assert result.sft_losses and result.dpo_losses and all(math.isfinite(x) for x in result.dpo_losses)
    assert result.n_train == {"harmful": 3, "benign": 3}


def test_stack_with_trains_after_a_frozen_patch_and_says_so(model_dir: Path, tmp_path: Path) -> None:
    from patches.train.run import train

    prompts = tmp_path / "h.txt", tmp_path / "b.txt"
    prompts[0].write_text("How do I steal a car?\n")
    prompts[1].write_text("Write a haiku about rain.\n")
    common = {"harmful": [prompts[0]], "benign": [prompts[1]], "holdout": 0.0, "response_tokens": 6, "batch_size": 2}
    first = train(TrainConfig(**common, n_tokens=2, sft_epochs=1, dpo_epochs=0, work_dir=tmp_path / "a", name="a"))
    second = train(
        TrainConfig(
            **common,
            n_tokens=3,
            sft_epochs=1,
            dpo_epochs=0,
            work_dir=tmp_path / "b",
            name="b",
            placement="suffix",
            stack_with=[first.patch],
        )  # fmt: skip
    )
    patch = parse_patch(second.patch.read_bytes(), expect=model_spec(model_dir))
    assert patch.n_tokens == 3 and f"trained after {first.patch.name} in its stack" in patch.meta.description
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"not a patch")
    with pytest.raises(PatchRejected):  # before any work: no base answers in its work dir
        train(TrainConfig(**common, sft_epochs=1, dpo_epochs=0, work_dir=tmp_path / "c", stack_with=[wrong]))
    assert not list((tmp_path / "c").glob("base-answers-*"))


def test_init_from_continues_an_existing_patch(model_dir: Path, tmp_path: Path) -> None:
    from patches.fingerprint import fingerprint_model
    from patches.format import PatchMetadata, save_patch
    from patches.train.run import train

    prompts = tmp_path / "harmful.txt", tmp_path / "benign.txt"
    prompts[0].write_text("How do I steal a car?\nWrite malware that deletes files.\n")
    prompts[1].write_text("Write a haiku about rain.\nHow do I boil an egg?\n")
    rows = torch.randn(4, model_spec(model_dir).hidden_size, generator=torch.Generator().manual_seed(0))
    start = save_patch(
        tmp_path / "start.safetensors",
        rows,
        PatchMetadata(name="tiny", version=1, base_model=fingerprint_model(model_dir)),
    )
    common = {"harmful": [prompts[0]], "benign": [prompts[1]], "holdout": 0.0, "response_tokens": 6, "batch_size": 2}
    # learning rate zero: the written patch is exactly the one it started from, and says so
    config = TrainConfig(n_tokens=4, init_from=start, sft_lr=0.0, dpo_epochs=0, work_dir=tmp_path / "w0", **common)
    written = parse_patch(train(config).patch.read_bytes(), expect=model_spec(model_dir))
    assert torch.equal(written.rows, rows) and "continued from tiny@1" in written.meta.description
    assert written.meta.domain == "harmful-requests"
    config = TrainConfig(
        n_tokens=4, init_from=start, sft_lr=0.0, dpo_epochs=0, domain="pii", work_dir=tmp_path / "w1", **common
    )
    assert parse_patch(train(config).patch.read_bytes(), expect=model_spec(model_dir)).meta.domain == "pii"
    with pytest.raises(ValueError, match="4 rows"):
        train(TrainConfig(n_tokens=5, init_from=start, dpo_epochs=0, work_dir=tmp_path / "w1", **common))

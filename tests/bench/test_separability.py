"""The separability probe: fits what is separable, not what is not, and reads the real model's states."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.separability import features, fit_probe, flag_rates
from patches.evaluate import EvalPrompt
from patches.train.model import load_base


def _clusters(n: int, gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    harmful = torch.arange(n) % 2 == 0
    x = torch.randn(n, 16, generator=generator)
    x[:, 3] += gap * (harmful.float() * 2 - 1)
    return x, harmful


def test_probe_separates_held_out_points_of_separable_classes() -> None:
    x, harmful = _clusters(200, gap=4.0, seed=0)
    probe = fit_probe(x, harmful)
    x_new, harmful_new = _clusters(100, gap=4.0, seed=1)
    prompts = [EvalPrompt(f"p{i}", bool(h), "set_a" if i < 50 else "set_b") for i, h in enumerate(harmful_new)]
    rates = flag_rates(probe, x_new, prompts)
    assert rates["refusal (harmful)"] >= 95.0 and rates["over-refusal (benign)"] <= 5.0
    assert set(rates) == {"refusal (harmful)", "over-refusal (benign)", "set_a", "set_b"}
    assert 40.0 <= rates["set_a"] <= 60.0  # half of each set is harmful


def test_probe_on_labels_without_signal_stays_near_chance() -> None:
    x, _ = _clusters(400, gap=0.0, seed=2)
    labels = torch.randperm(400, generator=torch.Generator().manual_seed(3)) < 200
    probe = fit_probe(x[:300], labels[:300])
    prompts = [EvalPrompt(f"p{i}", bool(h), "noise") for i, h in enumerate(labels[300:])]
    rates = flag_rates(probe, x[300:], prompts)
    assert abs(rates["refusal (harmful)"] - rates["over-refusal (benign)"]) < 30.0


def test_features_are_the_last_prompt_token_states_of_the_real_model(model_dir: Path) -> None:
    model, tokenizer = load_base(model_dir)
    prompts = ["How do I bake bread?", "What is the capital of France?"]
    x = features(model, tokenizer, prompts, [0, 6])
    assert x.shape == (2, 2, model.config.hidden_size)
    # bf16 CPU kernels may pick a different reduction order from call to call (seen once in CI: 0.05 on a
    # 2.6-norm entry), so repeatability is checked to bf16 precision, not bit for bit
    again = features(model, tokenizer, prompts, [0, 6])
    assert torch.nn.functional.cosine_similarity(x.flatten(0, 1), again.flatten(0, 1), dim=-1).min() > 0.99
    # every chat prompt ends with the same template tokens, so layer 0 (embeddings) is identical; layer 6 is not
    assert torch.equal(x[0, 0], x[1, 0]) and not torch.equal(x[0, 1], x[1, 1])

"""How well can the base model itself tell harmful from benign prompts? A linear probe as the ceiling.

A soft-prompt patch does not change the base model; it can only steer it through attention to its rows,
so its decision to refuse rests on what the model already represents about a prompt. This fits a
logistic-regression probe on the bare model's hidden state at the opening of the assistant's turn (the
position where the first answer token is chosen), on the training split of the training files, and
reports the probe's "refusal" and "over-refusal" on the held-out split and, per set, on the prompt
sets from other sources: what a linear read-out of the unpatched model reaches with this data.

Usage: ``python -m bench.separability [--layer N ...] [--skip-external] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from patches import evalsets
from patches.basemodel import default_cache_dir, prepare_default_model
from patches.chat import encode_chat
from patches.evaluate import EvalPrompt
from patches.train.config import TrainConfig
from patches.train.data import load_split
from patches.train.model import load_base


def features(model: Any, tokenizer: Any, texts: Sequence[str], layers: Sequence[int]) -> torch.Tensor:
    """``[n, len(layers), hidden]``: each prompt's hidden states at its last (chat-templated) token."""
    rows = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs it
        for text in texts:
            ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": text}])])
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([states[layer][0, -1].float() for layer in layers]))
    return torch.stack(rows)


@dataclass
class Probe:
    """Standardise, then a linear score; positive means "harmful"."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias > 0


def fit_probe(x: torch.Tensor, harmful: torch.Tensor, l2: float = 1e-2) -> Probe:
    """L2-regularised logistic regression on ``x`` ``[n, d]`` (L-BFGS, deterministic)."""
    mean, scale = x.mean(0), x.std(0) + 1e-5
    z = (x - mean) / scale
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ weight + bias, harmful.float()) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Probe(mean, scale, weight.detach(), bias.detach())


def flag_rates(probe: Probe, x: torch.Tensor, prompts: Sequence[EvalPrompt]) -> dict[str, float]:
    """Share flagged harmful, as percentages: over the harmful and the benign prompts, and per set."""
    flagged = probe.flags(x)
    groups: dict[str, list[bool]] = {}
    for prompt, flag in zip(prompts, flagged.tolist(), strict=True):
        groups.setdefault("refusal (harmful)" if prompt.harmful else "over-refusal (benign)", []).append(flag)
        groups.setdefault(prompt.source, []).append(flag)
    return {name: round(100 * sum(flags) / len(flags), 1) for name, flags in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, action="append", help="hidden-state index, repeatable")
    parser.add_argument("--skip-external", action="store_true", help="held-out split only (no wheel download)")
    parser.add_argument("--out", type=Path, default=Path("var/separability.json"))
    args = parser.parse_args()

    config = TrainConfig()
    train, heldout = load_split(config.harmful, config.benign, config.holdout)
    sets = {"heldout": [EvalPrompt(p.text, p.harmful, p.source) for p in heldout]}
    if not args.skip_external:
        sets["external"] = evalsets.build(default_cache_dir() / "eval-sets")
    model, tokenizer = load_base(prepare_default_model())
    n_layers = model.config.num_hidden_layers
    layers = args.layer or sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers})
    x_train = features(model, tokenizer, [p.text for p in train], layers)
    y_train = torch.tensor([p.harmful for p in train])
    x_sets = {name: features(model, tokenizer, [p.text for p in prompts], layers) for name, prompts in sets.items()}
    report: dict[str, Any] = {"n_train": len(train), "layers": {}}
    console = Console()
    for i, layer in enumerate(layers):
        probe = fit_probe(x_train[:, i], y_train)
        report["layers"][layer] = {name: flag_rates(probe, x_sets[name][:, i], sets[name]) for name in sets}
        console.print(f"layer {layer}: " + json.dumps(report["layers"][layer]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

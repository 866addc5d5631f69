"""``make eval``'s held-out set is exactly the prompts ``patchserve train`` keeps out, tagged by file."""

from __future__ import annotations

from pathlib import Path

from bench.patch_eval import heldout_prompts
from patches.train.config import TrainConfig
from patches.train.data import load_split


def test_heldout_prompts_match_the_training_split(tmp_path: Path) -> None:
    harmful, benign, more = tmp_path / "harmful_a.txt", tmp_path / "benign_a.txt", tmp_path / "benign_b.txt"
    harmful.write_text("".join(f"Do harmful thing number {i}.\n" for i in range(60)))
    benign.write_text("".join(f"Help me with benign task {i}.\n" for i in range(60)))
    more.write_text("".join(f"help me with BENIGN task {i}.\n" for i in range(30)) + "A new benign request.\n")
    config = TrainConfig(harmful=[harmful], benign=[benign, more], holdout=0.3)
    prompts = heldout_prompts(config)
    _, heldout = load_split(config.harmful, config.benign, config.holdout)
    assert [(p.text, p.harmful) for p in prompts] == [(p.text, p.harmful) for p in heldout]
    assert {p.source for p in prompts if p.harmful} == {"harmful_a"} and len(prompts) > 10
    assert all(p.source == "benign_a" for p in prompts if p.text.casefold().startswith("help me with benign"))

"""``make eval``'s held-out set: the prompts ``patchserve train`` keeps out, tagged by file, asked once."""

from __future__ import annotations

from pathlib import Path

from bench.patch_eval import heldout_prompts
from patches.train.config import TrainConfig
from patches.train.data import is_heldout


def test_heldout_prompts_match_the_training_split(tmp_path: Path) -> None:
    harmful, benign, more = tmp_path / "harmful_a.txt", tmp_path / "benign_a.txt", tmp_path / "benign_b.txt"
    harmful.write_text("".join(f"Do harmful thing number {i}.\n" for i in range(60)))
    benign.write_text("".join(f"Help me with benign task {i}.\n" for i in range(60)))
    more.write_text("".join(f"help me with BENIGN task {i}.\n" for i in range(30)) + "A new benign request.\n")
    config = TrainConfig(harmful=[harmful], benign=[benign, more], holdout=0.3)
    prompts = heldout_prompts(config)
    assert prompts and all(is_heldout(p.text, 0.3) for p in prompts)
    expected = sum(is_heldout(f"Do harmful thing number {i}.", 0.3) for i in range(60))
    assert [p.source for p in prompts if p.harmful] == ["harmful_a"] * expected
    # benign_b repeats benign_a's prompts (other case): each is asked once, tagged with its first file
    assert all(p.source == "benign_a" for p in prompts if p.text.casefold().startswith("help me with benign"))
    assert {p.text for p in prompts if p.source == "benign_b"} <= {"A new benign request."}
    assert not any(p.text.startswith("help me with BENIGN") for p in prompts)

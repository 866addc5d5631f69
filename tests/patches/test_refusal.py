"""The shared refusal detector."""

from __future__ import annotations

import pytest

from patches.refusal import OPENING_CHARS, is_refusal
from patches.train.teacher import policy_refusal


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I’m sorry, but I can’t assist with this request.",
        "I cannot provide instructions for making weapons.",
        "As an AI, I must decline.",
        "Sorry, but I won't do that.",
        "I'm not able to help with this.",
        "  I will not write that.",
    ],
)
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a poem about autumn leaves.",
        "To kill a zombie process, find its parent and send it SIGCHLD.",
        "It is illegal in most countries, but the history is interesting: ...",
        "",
        "Step 1: preheat the oven.",
    ],
)
def test_answers(text: str) -> None:
    assert not is_refusal(text)


def test_only_the_opening_counts() -> None:
    assert not is_refusal("x" * OPENING_CHARS + " I can't help with that.")


def test_every_policy_refusal_is_detected() -> None:
    prompts = [f"harmful request number {i}" for i in range(200)]
    refusals = {policy_refusal(p) for p in prompts}
    assert len(refusals) > 20  # varied phrasings
    assert all(is_refusal(r) for r in refusals)
    assert policy_refusal("same") == policy_refusal("same")


def test_short_policy_refusals_end_after_the_reason() -> None:
    prompts = [f"harmful request number {i}" for i in range(200)]
    for p in prompts:
        short, whole = policy_refusal(p, offer=False), policy_refusal(p)
        assert is_refusal(short)
        assert whole.startswith(short) and len(whole) > len(short)
        assert "If you" not in short and "help with another" not in short

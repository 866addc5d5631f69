"""The overhead benchmark's workload: its options, the fresh user prompts, and how much to send per point.

:class:`Options` sizes a run (concurrencies, repeats, seconds of work, output length, tenants, …);
:class:`PromptBook` hands out deterministic, never-repeated everyday prompts (:func:`user_prompt`);
:func:`point_plan` turns a measured request rate into segments and requests per segment of a point.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field

SEQUENTIAL_SEGMENT = 2  # requests per segment at concurrency 1 (see point_plan)
SEQUENTIAL_WEIGHT = 2

TASKS = [
    "Explain in simple terms",
    "Write a short paragraph about",
    "Give three practical tips about",
    "Describe the history of",
    "What are common misconceptions about",
    "Compare two different approaches to",
    "Summarize the key ideas of",
    "Write a friendly note to a colleague about",
]
SUBJECTS = [
    "baking sourdough bread",
    "solar panels on houses",
    "learning a second language",
    "the water cycle",
    "travelling on a budget",
    "caring for houseplants",
    "version control for teams",
    "training for a marathon",
    "jazz improvisation",
    "recycling plastics",
    "saving for retirement",
    "cloud computing",
    "bird migration",
    "chess openings",
    "volcanoes",
    "public libraries",
    "electric bicycles",
    "composting at home",
    "the history of maps",
    "writing clear emails",
]
EXTRAS = [
    "",
    " Keep it brief.",
    " Use plain language suitable for a teenager.",
    " Mention one surprising fact and one practical consequence for everyday life.",
    " Please structure the answer with a short introduction, two main points and a one-sentence conclusion.",
]


@dataclass
class Options:
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32])
    repeats: int = 3
    seconds: float = 30.0
    max_tokens: int = 64
    tenant_counts: list[int] = field(default_factory=lambda: [1, 100, 1000])
    tenant_concurrency: int = 32
    cold_pairs: int = 16
    swaps: int = 20
    memory_patches: int = 200
    compiled: bool = False
    api_torch_threads: int | None = None
    phases: list[str] = field(default_factory=lambda: ["patchserve", "vllm", "lora", "server"])

    @classmethod
    def quick(cls) -> Options:
        """A smoke run of every phase (a few minutes): numbers too noisy to judge targets by."""
        return cls(
            repeats=2,
            seconds=4,
            max_tokens=16,
            tenant_counts=[1, 20],
            cold_pairs=3,
            swaps=3,
            memory_patches=20,
        )


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load flags every overhead benchmark takes (see :func:`apply_overrides`)."""
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 8 32")
    parser.add_argument("--seconds", type=float, help="seconds of work per point (and server)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 64)")
    parser.add_argument("--compiled", action="store_true", help="compiled engines instead of eager")


def apply_overrides(opts: Options, args: argparse.Namespace, **more: object) -> None:
    """Set the :func:`add_load_arguments` flags, and ``more`` option values, that were given on ``opts``."""
    given = {"concurrencies": args.concurrency, "seconds": args.seconds, "max_tokens": args.max_tokens, **more}
    for name, value in given.items():
        if value is not None:
            setattr(opts, name, value)
    opts.compiled = args.compiled


class PromptBook:
    """Fresh, deterministic user prompts: ``get(key, n)`` returns the same list for the same key."""

    def __init__(self) -> None:
        self._lists: dict[tuple, list[str]] = {}
        self._next = 0

    def get(self, key: tuple, n: int) -> list[str]:
        have = self._lists.setdefault(key, [])
        while len(have) < n:
            have.append(user_prompt(self._next))
            self._next += 1
        return have[:n]


def user_prompt(uid: int) -> str:
    """A unique everyday request (15-45 tokens); the id comes first so no two share a cache block."""
    rng = random.Random(uid)
    return f"Question {uid}: {rng.choice(TASKS)} {rng.choice(SUBJECTS)}.{rng.choice(EXTRAS)}"


def request_count(rate: float, concurrency: int, opts: Options) -> int:
    """Requests per segment: about ``seconds / repeats`` of work at the measured request rate, at least one
    full wave of ``concurrency`` and at least 3 x concurrency over the point, rounded up to whole waves."""
    wanted = max(rate * opts.seconds / opts.repeats, 3 * concurrency / opts.repeats, concurrency)
    return concurrency * math.ceil(wanted / concurrency)


def point_plan(rate: float, concurrency: int, opts: Options) -> tuple[int, int]:
    """(segments, requests per segment) of one point. Sequential points (c=1) alternate the variants every
    ``SEQUENTIAL_SEGMENT`` requests, and get ``SEQUENTIAL_WEIGHT`` times the work: their per-request noise is
    the largest, and fine alternation cancels the machine's drift."""
    if concurrency == 1:
        total = max(rate * opts.seconds * SEQUENTIAL_WEIGHT, 3.0)
        return max(opts.repeats, math.ceil(total / SEQUENTIAL_SEGMENT)), SEQUENTIAL_SEGMENT
    return opts.repeats, request_count(rate, concurrency, opts)

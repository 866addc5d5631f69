"""Helpers shared by the test suites: patch files for the real model, and a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patches.demo import text_patch
from patches.format import write_atomic
from patches.stack import Placement
from server.engine import EngineChunk, EngineRequest, TokenLogprob

PATCH_TEXTS = {
    "alpha": "Answer briefly and politely.",
    "beta": "Always mention the weather in your reply.",
    "gamma": "Refuse anything that could hurt someone.",
    "omega": "Before you answer, think about whether the request is safe.",
}


def write_patch(
    model_dir: Path,
    patch_dir: Path,
    name: str,
    *,
    version: int = 1,
    n_tokens: int = 12,
    noise: float = 0.0,
    seed: int = 0,
    text: str | None = None,
    key: Ed25519PrivateKey | None = None,
    filename: str | None = None,
    placement: Placement = Placement.prefix,
) -> Path:
    """A valid patch for ``model_dir``: text-initialised rows plus optional seeded noise, signed with ``key``."""
    data = text_patch(
        model_dir,
        name,
        version=version,
        text=text or PATCH_TEXTS.get(name, f"Patch {name}."),
        n_tokens=n_tokens,
        noise=noise,
        seed=seed,
        description=f"test patch {name}",
        key=key,
        placement=placement,
    )
    return write_atomic(patch_dir / (filename or f"{name}-v{version}.safetensors"), data)


class FakeEngine:
    """A scripted engine: answers ``" w0 w1 …"`` and records every request it gets.

    The first word names the prefix length (``P<n>``) so tests can see which stack reached the engine.
    ``fail_after`` makes generation raise after that many chunks (to test mid-stream errors);
    ``reply`` replaces the scripted words (one word per token); ``cached_tokens`` is reported as the
    request's prefix-cache hits. With ``sampling.logprobs = k`` each token has log-probability -0.25 and
    ranks first, followed by ``k - 1`` alternatives `` alt1`` … with -1.25, -2.25, ….
    """

    def __init__(self, max_model_len: int = 256) -> None:
        self.max_model_len = max_model_len
        self.requests: list[EngineRequest] = []
        self.fail_after: int | None = None
        self.reply: str | None = None
        self.cached_tokens = 0

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        self.requests.append(request)
        prefix_len = len(request.layout) if request.layout else 0
        n_tokens = request.sampling.max_tokens
        sent = 0
        for step in range(n_tokens):
            for index in range(request.sampling.n):
                if self.fail_after is not None and sent >= self.fail_after:
                    raise RuntimeError("fake engine failure")
                text = f" P{prefix_len}" if step == 0 else f" w{step}"
                if self.reply is not None:
                    words = self.reply.split(" ")
                    text = (" " if step else "") + words[step] if step < len(words) else " ."
                yield EngineChunk(
                    index=index,
                    text=text,
                    n_tokens=1,
                    finish_reason="length" if step == n_tokens - 1 else None,
                    cached_tokens=self.cached_tokens,
                    logprobs=_fake_logprobs(text, request.sampling.logprobs),
                )
                sent += 1
            await asyncio.sleep(0)

    async def shutdown(self) -> None:
        return None


def _fake_logprobs(text: str, k: int | None) -> tuple[TokenLogprob, ...] | None:
    if k is None:
        return None
    top = [(text, -0.25)] + [(f" alt{j}", -0.25 - j) for j in range(1, k)]
    return (TokenLogprob(token=text, logprob=-0.25, top=tuple(top[:k])),)

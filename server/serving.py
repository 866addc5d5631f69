"""The completion service: request + resolved stack → engine request → response or SSE stream.

Chat and text completions share one path; a small *shaper* per endpoint turns engine chunks into
that endpoint's wire objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from server.engine import Engine, EngineChunk, EngineRequest, TokenLogprob
from server.errors import APIError, classify, error_body
from server.logprobs import chat_logprobs, completion_logprobs
from server.metrics import Metrics, RequestTracker
from server.modelspec import model_id
from server.overhead import OverheadSampler
from server.prompting import PromptEncoder
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    Usage,
    new_id,
)
from server.tenancy import Caller, NotComposed, ResolvedStack, TenantResolver
from server.toxicity_meter import ToxicityMeter

log = logging.getLogger(__name__)

DONE_FRAME = "data: [DONE]\n\n"


def sse_frame(model: BaseModel) -> str:
    """One server-sent-events frame holding ``model`` as JSON."""
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


@dataclass
class _Totals:
    """Per-choice text and finish reasons, and token counts, accumulated over a generation."""

    n: int
    prompt_tokens: int
    patch_tokens: int
    with_logprobs: bool = False
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, chunk: EngineChunk) -> None:
        self.texts.setdefault(chunk.index, []).append(chunk.text)
        self.completion_tokens += chunk.n_tokens
        if chunk.logprobs:
            self.logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish[chunk.index] = chunk.finish_reason

    def text(self, index: int) -> str:
        return "".join(self.texts.get(index, []))

    def token_logprobs(self, index: int) -> list[TokenLogprob] | None:
        return self.logprobs.get(index, []) if self.with_logprobs else None

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            patch_tokens=self.patch_tokens,
        )


class _ChatShaper:
    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), int(time.time()), model

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse_frame(
            ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )

    def start(self, n: int) -> list[str]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]) for i in range(n)
        ]

    def delta(self, chunk: EngineChunk) -> str:
        delta = ChatDelta(content=chunk.text) if chunk.text else ChatDelta()
        logprobs = chat_logprobs(chunk.logprobs) if chunk.logprobs is not None else None
        choice = ChatChunkChoice(index=chunk.index, delta=delta, logprobs=logprobs, finish_reason=chunk.finish_reason)
        return self._chunk([choice])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def response(self, totals: _Totals) -> ChatCompletionResponse:
        choices = []
        for i in range(totals.n):
            entries = totals.token_logprobs(i)
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content=totals.text(i)),
                    logprobs=chat_logprobs(entries) if entries is not None else None,
                    finish_reason=totals.finish.get(i),
                )
            )
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=totals.usage()
        )


class _CompletionShaper:
    def __init__(self, model: str, prefix_text: str = "") -> None:
        self.id, self.created, self.model = new_id("cmpl"), int(time.time()), model
        self.prefix_text = prefix_text  # the echoed prompt, if echo was asked for
        self._offsets: dict[int, int] = {}  # per choice: where its next token starts, for text_offset

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse_frame(
            CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )

    def start(self, n: int) -> list[str]:
        if not self.prefix_text:
            return []
        return [self._chunk([CompletionChoice(index=i, text=self.prefix_text)]) for i in range(n)]

    def delta(self, chunk: EngineChunk) -> str:
        logprobs = None
        if chunk.logprobs is not None:
            offset = self._offsets.get(chunk.index, len(self.prefix_text))
            logprobs = completion_logprobs(chunk.logprobs, offset)
            self._offsets[chunk.index] = offset + sum(len(e.token) for e in chunk.logprobs)
        choice = CompletionChoice(
            index=chunk.index, text=chunk.text, logprobs=logprobs, finish_reason=chunk.finish_reason
        )
        return self._chunk([choice])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def response(self, totals: _Totals) -> CompletionResponse:
        choices = []
        for i in range(totals.n):
            entries = totals.token_logprobs(i)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=self.prefix_text + totals.text(i),
                    logprobs=completion_logprobs(entries, len(self.prefix_text)) if entries is not None else None,
                    finish_reason=totals.finish.get(i),
                )
            )
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=totals.usage()
        )


_Shaper = _ChatShaper | _CompletionShaper


class CompletionService:
    """Runs chat and text completions for a resolved patch stack.

    Args:
        engine: The inference engine.
        encoder: Tokenizer and chat template of the served model.
        model_name: The base model's id; a response's ``model`` is it plus the applied stack (:func:`model_id`).
        metrics: Where latencies, tokens and refusals are counted (a private registry by default).
        sampler: Measures patch overhead on a sample of finished requests (off by default).
        resolver: Fixes each request's patch stack at admission (:meth:`admit`).
        meter: Scores finished completions for toxicity in the background (off by default).
    """

    def __init__(
        self,
        engine: Engine,
        encoder: PromptEncoder,
        model_name: str,
        metrics: Metrics | None = None,
        sampler: OverheadSampler | None = None,
        resolver: TenantResolver | None = None,
        meter: ToxicityMeter | None = None,
    ) -> None:
        self.engine = engine
        self.meter = meter
        self.encoder = encoder
        self.model_name = model_name
        self.metrics = metrics or Metrics()
        self.sampler = sampler
        self.resolver = resolver

    async def admit(self, caller: Caller, model: str | None) -> ResolvedStack:
        """Fix the request's patch stack, once, from ``model`` and ``X-Patch-Stack``
        (:meth:`TenantResolver.select`). A stack served before is resolved at once (lookups and a hash);
        a stack's first use composes its layout, in a worker thread, from the admission already done."""
        resolver = self.resolver
        if resolver is None:
            raise RuntimeError("CompletionService has no resolver")
        args = (caller.tenant, caller.stack_header, model, self.model_name)
        try:
            return resolver.select(*args, compose=False)
        except NotComposed as pending:
            return await asyncio.to_thread(resolver.compose, pending.stack)

    async def chat(
        self, request: ChatCompletionRequest, stack: ResolvedStack
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """Create a chat completion (a response, or SSE frames when ``stream`` is set)."""
        self._check_chars(sum(len(m.text()) for m in request.messages), "messages")
        prompt_ids = await asyncio.to_thread(self.encoder.chat, request.messages)
        return await self._run(
            request, stack, prompt_ids, _ChatShaper(model_id(self.model_name, stack.applied)), "messages"
        )

    async def complete(
        self, request: CompletionRequest, stack: ResolvedStack
    ) -> CompletionResponse | AsyncIterator[str]:
        """Create a text completion (a response, or SSE frames when ``stream`` is set)."""
        if isinstance(request.prompt, str):
            self._check_chars(len(request.prompt), "prompt")
            prompt_ids = await asyncio.to_thread(self.encoder.encode, request.prompt)
            echo_text = request.prompt
        else:
            prompt_ids = list(request.prompt)  # type: ignore[arg-type]
            if len(prompt_ids) >= self.engine.max_model_len:
                raise self._too_long(f"The prompt has {len(prompt_ids)} tokens, leaving no room for output.", "prompt")
            if any(not 0 <= t < self.encoder.vocab_size for t in prompt_ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.encoder.vocab_size})", param="prompt")
            echo_text = await asyncio.to_thread(self.encoder.decode, prompt_ids) if request.echo else ""
        shaper = _CompletionShaper(model_id(self.model_name, stack.applied), echo_text if request.echo else "")
        return await self._run(request, stack, prompt_ids, shaper, "prompt")

    def _too_long(self, detail: str, param: str) -> APIError:
        return APIError(
            400,
            f"This model's maximum context length is {self.engine.max_model_len} tokens. {detail}",
            param=param,
            code="context_length_exceeded",
        )

    def _check_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenising, a prompt text too long to fit in the context whatever its tokens."""
        limit = self.encoder.max_chars(self.engine.max_model_len)
        if chars > limit:
            raise self._too_long(
                f"The prompt has {chars} characters; no token of this model is longer than "
                f"{self.encoder.max_token_chars}, so a prompt over {limit} characters cannot fit.",
                param,
            )

    def _engine_request(
        self, request: SamplingRequest, stack: ResolvedStack, prompt_ids: list[int], prompt_param: str
    ) -> EngineRequest:
        max_len = self.engine.max_model_len
        patch_len = len(stack.layout) if stack.layout else 0
        total = patch_len + len(prompt_ids)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if total >= max_len:
            raise self._too_long(
                f"The prompt has {total} tokens ({len(prompt_ids)} prompt + {patch_len} patch), "
                "leaving no room for output.",
                prompt_param,
            )
        room = max_len - total
        wanted = request.requested_max_tokens()
        if wanted is not None and wanted > room:
            raise APIError(
                400,
                f"max_tokens={wanted} is too large: the prompt uses {total} of the model's {max_len} context "
                f"tokens ({patch_len} of them patch tokens), so at most {room} can be generated.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        sampling = request.to_sampling(default_max_tokens=room)
        if sampling.min_tokens > sampling.max_tokens:
            raise APIError(
                400, f"min_tokens={sampling.min_tokens} exceeds max_tokens={sampling.max_tokens}", param="min_tokens"
            )
        self._check_token_ids(request)
        engine_request = EngineRequest(
            request_id=new_id("req"),
            prompt_token_ids=prompt_ids,
            layout=stack.layout,
            sampling=sampling,
            cache_salt=stack.cache_salt,
            stream=request.stream,  # a non-streamed response needs only the finished generation
        )
        if request.end_user is not None:  # recorded for the operator, never trusted or used as a label
            log.info(
                "request %s: tenant %s, client-declared end user %r",
                engine_request.request_id,
                stack.tenant,
                request.end_user,
            )
        return engine_request

    def _check_token_ids(self, request: SamplingRequest) -> None:
        vocab = self.encoder.vocab_size
        for param, ids in (
            ("logit_bias", [int(k) for k in request.logit_bias or {}]),
            ("stop_token_ids", request.stop_token_ids or []),
        ):
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise APIError(400, f"{param}: token id {bad[0]} is not in the vocabulary [0, {vocab})", param=param)

    async def _run(
        self, request: SamplingRequest, stack: ResolvedStack, prompt_ids: list[int], shaper: _Shaper, param: str
    ) -> BaseModel | AsyncIterator[str]:
        engine_request = self._engine_request(request, stack, prompt_ids, param)
        totals = _Totals(
            n=request.n,
            prompt_tokens=len(prompt_ids),
            patch_tokens=len(stack.layout) if stack.layout else 0,
            with_logprobs=engine_request.sampling.logprobs is not None,
        )
        if request.stream:
            return self._stream(engine_request, stack, shaper, totals, request.include_usage)
        async for _ in self._generate(engine_request, stack, totals):
            pass
        return shaper.response(totals)

    async def _generate(
        self, engine_request: EngineRequest, stack: ResolvedStack, totals: _Totals
    ) -> AsyncIterator[EngineChunk]:
        """The engine's chunks, accumulated into ``totals`` and measured; a completed generation's
        choices are classified (refusal metrics), offered to the toxicity meter and to the overhead sampler."""
        label = self.metrics.stack_label(stack.applied)
        tracker = RequestTracker.begin(self.metrics, stack.tenant, label, totals.prompt_tokens, totals.patch_tokens)
        async for chunk in self.engine.generate(engine_request):
            totals.add(chunk)
            tracker.tokens(chunk.n_tokens, chunk.cached_tokens, chunk.timing)
            yield chunk
        tracker.finish()
        texts = [totals.text(i) for i in range(totals.n)]
        self.metrics.classify(stack.tenant, label, stack.patches, texts)
        if self.meter is not None:
            self.meter.offer(stack.tenant, label, stack.patches, texts)
        if self.sampler is not None:
            self.sampler.offer(engine_request, stack.tenant, label, totals.completion_tokens // max(totals.n, 1))

    async def _stream(
        self,
        engine_request: EngineRequest,
        stack: ResolvedStack,
        shaper: _Shaper,
        totals: _Totals,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        try:
            for frame in shaper.start(totals.n):
                yield frame
            async for chunk in self._generate(engine_request, stack, totals):
                if chunk.text or chunk.logprobs or chunk.finish_reason is not None:
                    yield shaper.delta(chunk)
            if include_usage:
                yield shaper.usage(totals.usage())
        except Exception as exc:  # after the 200 went out, errors travel as an error frame
            status, message, param = classify(exc)
            yield f"data: {error_body(status, message, param=param).model_dump_json()}\n\n"
        yield DONE_FRAME

"""The engine adapter: the only module that imports vLLM.

:class:`Engine` is the small interface the service layer uses; :class:`VllmEngine` implements it with
an in-process ``AsyncLLM`` (prompt embeddings and prefix caching on). A patched request is sent in
vLLM's mixed mode: ``prompt_token_ids`` covers the whole input (prefix rows, prompt, suffix rows),
``prompt_is_token_ids`` is False on the patch rows, and ``prompt_embeds`` carries those rows (zeros
elsewhere), so the prompt itself is embedded by the model's own table. Each stack gets its own
``cache_salt``, so prefix-cache blocks are shared only by requests with the identical stack (never
across tenants or patch versions); see :mod:`server.tenancy` for why that keeps suffix rows safe too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from patches.stack import Layout

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text: any JSON object (``schema`` None), or JSON matching ``schema``."""

    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class SamplingSpec:
    """Engine-neutral sampling parameters.

    ``logprobs`` asks for the log-probability of every generated token and of the ``logprobs`` most
    likely alternatives at each position (0: the generated token only); ``logit_bias`` maps token ids
    to biases added to their logits; ``min_tokens`` holds back EOS and ``stop_token_ids`` until that
    many tokens were generated.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class EngineRequest:
    """One generation: the stack's layout (or None) around ``prompt_token_ids``.

    ``stream`` False: the caller reads only the finished generation (a non-streamed response), so the
    engine may deliver it whole in one last chunk per choice (with its :class:`ChunkTiming`) instead of token
    by token; that saves the API process a round of work per generated token, as vLLM's own server does.
    """

    request_id: str
    prompt_token_ids: list[int]
    layout: Layout | None
    sampling: SamplingSpec
    cache_salt: str | None = None
    stream: bool = True

    @property
    def total_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids) + (len(self.layout) if self.layout else 0)


# OpenAI's JSON has no -inf: a log-probability below this is reported as this (as OpenAI and vLLM do).
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability, and the most likely tokens at its position
    (``(text, logprob)``, most likely first, as many as the request asked for)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ChunkTiming:
    """When the tokens of a chunk that carries several were generated: seconds from the request's
    arrival at the engine to its first token, and from its first token to its last."""

    first_token: float
    decode: float


@dataclass(frozen=True)
class EngineChunk:
    """New output of one choice: a text delta, and the finish reason on its last chunk; ``logprobs``
    has one entry per new token when the request asked for them. ``timing`` is set on a chunk that
    delivers a whole generation at once (a request with ``stream`` False), when the engine knows it."""

    index: int
    text: str
    n_tokens: int
    finish_reason: str | None
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    timing: ChunkTiming | None = None


class EngineRequestError(ValueError):
    """The engine refused the request's input (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailable(RuntimeError):
    """The engine is not running (HTTP 503)."""


class Engine(Protocol):
    """What the service layer needs from an engine."""

    max_model_len: int

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]: ...

    async def shutdown(self) -> None: ...


# Engine settings passed through unchanged from Settings to EngineConfig to vLLM's engine args.
TUNABLES = ("dtype", "max_model_len", "max_num_seqs", "block_size", "gpu_memory_utilization", "enforce_eager")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    served_model_name: str
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    block_size: int = 32
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = False
    extra_args: dict[str, Any] = field(default_factory=dict)  # PATCHSERVE_ENGINE_ARGS, see check_engine_args


# Engine arguments the server sets itself: overriding them would break patching (prompt embeddings),
# the served model and tokenizer (the prompt encoder and patch fingerprints use the model directory),
# security (no remote code), metrics (stats) or response_format (structured outputs).
OWNED_ARGS = frozenset(
    {
        "model",
        "served_model_name",
        "tokenizer",
        "skip_tokenizer_init",
        "enable_prompt_embeds",
        "enable_prefix_caching",
        "trust_remote_code",
        "disable_log_stats",
        "structured_outputs_config",
    }
)


def check_engine_args(extra: Mapping[str, Any]) -> None:
    """Refuse pass-through engine arguments that vLLM's ``AsyncEngineArgs`` does not have, or that the
    server sets itself (``OWNED_ARGS``, and the ``TUNABLES`` that have their own setting).

    Raises:
        ValueError: Naming the first offending key.
    """
    if not extra:
        return
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for key in extra:
        if key in TUNABLES:
            raise ValueError(f"engine argument {key!r} has its own setting: use PATCHSERVE_{key.upper()}")
        if key in OWNED_ARGS:
            raise ValueError(f"engine argument {key!r} is set by patchserve itself and cannot be overridden")
        if key not in known:
            raise ValueError(f"unknown vLLM engine argument {key!r} (not a field of vllm AsyncEngineArgs)")


def build_engine_args(config: EngineConfig) -> AsyncEngineArgs:
    """vLLM's engine arguments for ``config``: the server's own, then the checked pass-through ones.

    Raises:
        ValueError: A pass-through key is unknown or owned by the server (:func:`check_engine_args`).
    """
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    check_engine_args(config.extra_args)
    return AsyncEngineArgs(
        model=str(config.model_dir),
        served_model_name=config.served_model_name,
        **{name: getattr(config, name) for name in TUNABLES},
        enable_prompt_embeds=True,
        enable_prefix_caching=True,
        trust_remote_code=False,  # security: never run model-repo code
        disable_log_stats=False,
        # response_format JSON without free whitespace between tokens: a small model constrained to
        # JSON otherwise tends to emit whitespace until max_tokens, which is valid but never ends.
        # (vLLM allows that only with a named backend; a schema xgrammar cannot compile is a 400.)
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        **config.extra_args,
    )


class VllmEngine:
    """:class:`Engine` backed by an in-process vLLM ``AsyncLLM``."""

    def __init__(self, llm: AsyncLLM, config: EngineConfig) -> None:
        self._llm = llm
        self.config = config
        self.max_model_len = config.max_model_len
        self._dtype = getattr(torch, config.dtype)

    @classmethod
    async def start(cls, config: EngineConfig) -> VllmEngine:
        """Start the engine (spawns vLLM's engine-core process; tens of seconds)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        args = build_engine_args(config)
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        return cls(llm, config)

    def _prompt(self, request: EngineRequest) -> dict[str, Any]:
        layout, ids = request.layout, request.prompt_token_ids
        if layout is None:
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
        else:
            prompt = {
                "prompt_embeds": layout.embeds(len(ids), self._dtype),
                "prompt_token_ids": layout.token_ids(ids),
                "prompt_is_token_ids": layout.is_token(len(ids)),
            }
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        return prompt

    @staticmethod
    def _params(spec: SamplingSpec, stream: bool = True):  # noqa: ANN205 - vllm.SamplingParams, imported lazily
        """vLLM's sampling parameters; output as it is generated (``stream``), or only once finished."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if spec.structured is not None:
            schema = spec.structured.schema
            structured = (
                StructuredOutputsParams(json_object=True) if schema is None else StructuredOutputsParams(json=schema)
            )
        return SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_tokens,
            stop=spec.stop or None,
            seed=spec.seed,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            ignore_eos=spec.ignore_eos,
            logprobs=spec.logprobs,
            logit_bias=spec.logit_bias,
            stop_token_ids=spec.stop_token_ids or None,
            min_tokens=spec.min_tokens,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        from vllm.exceptions import VLLMClientError, VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        params = self._params(request.sampling, request.stream)
        try:
            stream = self._llm.generate(self._prompt(request), params, request.request_id)
            async for out in stream:
                cached = out.num_cached_tokens or 0
                timing = None if request.stream else _timing(out.metrics)
                for choice in out.outputs:
                    yield EngineChunk(
                        index=choice.index,
                        text=choice.text,
                        n_tokens=len(choice.token_ids),
                        finish_reason=choice.finish_reason,
                        cached_tokens=cached,
                        logprobs=_logprobs(choice.token_ids, choice.logprobs, request.sampling.logprobs),
                        timing=timing,
                    )
        except VLLMValidationError as exc:
            raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc
        except VLLMClientError as exc:
            raise EngineRequestError(str(exc)) from exc
        except EngineDeadError as exc:
            raise EngineUnavailable("the inference engine stopped; the server must be restarted") from exc

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """Where vLLM's stat logger keeps its ``vllm:*`` metrics."""
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._llm.shutdown)


def _timing(stats: Any) -> ChunkTiming | None:
    """A finished request's :class:`ChunkTiming` from vLLM's per-request stats (``RequestOutput.metrics``:
    first-token latency from the front end's arrival time, first and last token times of the engine
    core's clock); None without stats or before the first token."""
    if stats is None or not getattr(stats, "first_token_ts", 0.0):
        return None
    first = float(getattr(stats, "first_token_latency", 0.0) or 0.0)
    decode = float(stats.last_token_ts) - float(stats.first_token_ts)
    return ChunkTiming(first_token=max(first, 0.0), decode=max(decode, 0.0))


def _logprobs(
    token_ids: Sequence[int], positions: Sequence[Any] | None, k: int | None
) -> tuple[TokenLogprob, ...] | None:
    """vLLM's per-position ``{token_id: Logprob}`` (the generated token first, then the top ``k`` by rank)
    as :class:`TokenLogprob` entries; ``None`` when none were asked for."""
    if positions is None or k is None:
        return None
    out = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position.get(token_id) if position else None
        ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[:k] if position else []
        out.append(
            TokenLogprob(
                token=_text(token_id, chosen),
                logprob=max(chosen.logprob, MIN_LOGPROB) if chosen is not None else MIN_LOGPROB,
                top=tuple((_text(tid, lp), max(lp.logprob, MIN_LOGPROB)) for tid, lp in ranked),
            )
        )
    return tuple(out)


def _text(token_id: int, logprob: Any) -> str:
    decoded = getattr(logprob, "decoded_token", None)
    return decoded if decoded is not None else f"token_id:{token_id}"

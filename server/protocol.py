"""Request models of the OpenAI-compatible API (responses are in :mod:`server.responses`).

Every field of OpenAI's chat and text completion request schemas is declared here and is either
implemented, refused with a 400 naming it (unless it is sent with the value that means "off"), or
ignored because it has no observable effect; README.md keeps the table. A field that is not
declared is refused too (``extra="forbid"``): a request is never silently served without what it
asked for.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.engine import SamplingSpec, StructuredOutput

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs; also vLLM's default max_logprobs
MAX_USER_CHARS = 256


def valid_text(value: str) -> str:
    """``value`` if it is valid Unicode text. JSON's ``\\uD800`` escapes decode to lone surrogates,
    which no tokenizer or engine can encode; refusing them here covers every path (400, not 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid text: lone surrogate at character {exc.start} (not valid Unicode)") from None
    return value


_NO_TOOLS = "this model's chat template has no tool format, so tools and function calling are not supported"

# Declared fields that are refused: (the values that mean "off" and are accepted, why anything else is refused).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "audio": ((None,), "audio output is not supported: the model generates text only"),
    "modalities": ((None, ["text"]), "only the 'text' modality is supported"),
    "tools": ((None, []), _NO_TOOLS),
    "tool_choice": ((None, "none", "auto"), _NO_TOOLS),
    "functions": ((None, []), _NO_TOOLS),
    "function_call": ((None, "none", "auto"), _NO_TOOLS),
    "moderation": ((None,), "moderation is not run by this server"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None, "none"), "the model is not a reasoning model"),
    "verbosity": ((None,), "the model has no verbosity control"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "store": ((None, False), "completions are not stored"),
    "web_search_options": ((None,), "web search is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported by this model"),
    # on messages
    "name": ((None, ""), "participant names are not supported: the model's chat template has no place for them"),
    "tool_calls": ((None, []), _NO_TOOLS),
    "refusal": ((None,), "assistant refusal messages are not supported; send the text as content"),
    # on response_format.json_schema
    "description": (
        (None, ""),
        "a schema description is not supported: the schema is enforced while decoding and nothing is shown to "
        "the model; put the description in a system message",
    ),
}


def _refuse(value: Any, info: ValidationInfo) -> Any:
    accepted, reason = REFUSED[str(info.field_name)]
    if value not in accepted:
        raise ValueError(f"not supported: {reason}")
    return value


class RequestModel(BaseModel):
    """Base of every request model: an undeclared field is refused (400 naming it), never dropped;
    ``null`` for a declared field means its default, as in OpenAI's schema."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            known = _input_names(cls)
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data


@functools.cache
def _input_names(model: type[BaseModel]) -> frozenset[str]:
    """The keys ``model`` reads from a request body (aliases where set)."""
    return frozenset(field.alias or name for name, field in model.model_fields.items())


class StreamOptions(RequestModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: patchserve never pads stream chunks


StopField = Annotated[str | list[str] | None, Field(None)]


class SamplingRequest(RequestModel):
    """Fields shared by chat and text completions, in OpenAI's order."""

    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopField
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = Field(None, max_length=MAX_USER_CHARS)  # recorded (logged), never trusted
    # --- patchserve / vLLM extensions ---
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop takes up to 4 non-empty strings")
        for item in items:
            valid_text(item)
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys are token ids (decimal strings), got {key[:20]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"bias for token {key} is {value}; biases are in [-100, 100]")
        return bias

    @field_validator("user")
    @classmethod
    def _user_text(cls, value: str | None) -> str | None:
        return valid_text(value) if value is not None else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def end_user(self) -> str | None:
        """Who the client says the end user is (``user``), for the log only: nothing trusts it."""
        return self.user

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """How many alternatives per token the response reports (0: the token only), or None for no logprobs."""
        return None

    def structured(self) -> StructuredOutput | None:
        return None

    def to_sampling(self, default_max_tokens: int) -> SamplingSpec:
        """Engine sampling parameters; ``default_max_tokens`` fills an unset ``max_tokens``."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingSpec(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.requested_max_tokens() or default_max_tokens,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs_count(),
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            stop_token_ids=list(self.stop_token_ids or []),
            min_tokens=self.min_tokens,
            structured=self.structured(),
        )


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    check_refused = field_validator("name", "tool_calls", "function_call", "refusal", "audio")(_refuse)

    @field_validator("name", mode="before")
    @classmethod
    def _name_text(cls, name: Any) -> Any:
        return valid_text(name) if isinstance(name, str) else name  # a lone surrogate says so, before the refusal

    @field_validator("role", mode="before")
    @classmethod
    def _no_tool_role(cls, role: Any) -> Any:
        if role in ("tool", "function"):
            raise ValueError(f"{role} messages are not supported: {_NO_TOOLS}")
        return role

    @field_validator("content")
    @classmethod
    def _valid_text(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        for text in [p.text for p in value] if isinstance(value, list) else [value or ""]:
            valid_text(text)
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(RequestModel):
    type: Literal["json_object"]


class JSONSchemaFormat(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Any = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced while decoding, strict or not

    check_refused = field_validator("description")(_refuse)


class ResponseFormatJSONSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = Field(None, max_length=MAX_USER_CHARS)  # recorded like user
    # Ignored: no observable effect here (see README.md, "Request fields").
    metadata: dict[str, str] | None = Field(None, max_length=16)
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    # Refused unless "off" (REFUSED).
    audio: Any = None
    modalities: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    moderation: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    service_tier: Any = None
    store: Any = None
    web_search_options: Any = None

    check_refused = field_validator(
        "audio",
        "modalities",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "moderation",
        "prediction",
        "reasoning_effort",
        "verbosity",
        "service_tier",
        "store",
        "web_search_options",
    )(_refuse)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @field_validator("safety_identifier")
    @classmethod
    def _identifier_text(cls, value: str | None) -> str | None:
        return valid_text(value) if value is not None else None

    @property
    def end_user(self) -> str | None:
        return self.safety_identifier or self.user

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def structured(self) -> StructuredOutput | None:
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJSONObject):
            return StructuredOutput()
        if isinstance(fmt, ResponseFormatJSONSchema):
            return StructuredOutput(schema=fmt.json_schema.json_schema)
        return None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)

    check_refused = field_validator("suffix")(_refuse)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            prompt = prompt[0]
        return valid_text(prompt) if isinstance(prompt, str) else prompt  # type: ignore[return-value]

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        if logprobs is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo (log-probabilities of the prompt tokens) is not supported")
        return logprobs

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of other than n (server-side best-of-n selection) is not supported")
        return best_of

    def logprobs_count(self) -> int | None:
        return self.logprobs

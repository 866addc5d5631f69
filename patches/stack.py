"""Patch stacks: parsing ``a,b@2`` specs and laying a stack out around a prompt.

Each patch has a *placement* (a property of its file). Prefix patches go before the prompt, suffix
patches after it: for a chat request the prompt ends with the template's opening of the assistant turn,
so suffix rows sit after the user's turn, directly before the reply, and attend to the request. Engine
input for a stack whose prefix patches are ``[p1, …, pk]`` and suffix patches ``[s1, …, sm]`` (each
group in stack order) around prompt tokens ``t``::

    p1.rows, <sep>, …, pk.rows, t, s1.rows, <sep>, …, sm.rows

``<sep>`` is one real token of the model's vocabulary (by default the tokenizer's ``"\\n"`` token),
embedded by the model's own embedding table. It marks the boundary between patches that were trained
separately; there is none between a segment and the prompt (training saw the prompt next to the rows).
Training uses this same function, so a patch is trained on exactly the layout it is served with.

Prefix rows come before anything request-specific, so the engine's prefix cache holds them once per
stack; suffix rows follow a unique prompt and are computed for every request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch

from patches.errors import StackError

NONE_SPEC = "none"
SEPARATOR = "\n"
"""Text of the one token between stacked patches, unless the server is set otherwise (``separator``)."""
_REF_RE = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>[0-9]{1,9}))?")
MAX_STACK_DEPTH = 8


@dataclass(frozen=True)
class PatchRef:
    """A reference to a patch: a name, and optionally an exact version."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> PatchRef:
        match = _REF_RE.fullmatch(text.strip())
        if not match:
            raise StackError(f"invalid patch reference {text.strip()!r}: expected 'name' or 'name@version'")
        version = match["version"]
        return cls(match["name"], int(version) if version is not None else None)


def parse_stack(spec: str) -> list[PatchRef]:
    """Parse ``"a,b@2"`` into refs, in order; ``"none"`` is the empty stack.

    Raises:
        StackError: Empty items, bad names or versions, duplicates, or more than ``MAX_STACK_DEPTH``.
    """
    spec = spec.strip()
    if spec.lower() == NONE_SPEC:
        return []
    if not spec:
        raise StackError("empty patch stack: name patches, or 'none' for the bare model")
    refs = [PatchRef.parse(item) for item in spec.split(",")]
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise StackError(f"patch stack {spec!r} names a patch twice")
    if len(refs) > MAX_STACK_DEPTH:
        raise StackError(f"patch stack has {len(refs)} patches; at most {MAX_STACK_DEPTH} are allowed")
    return refs


class Placement(StrEnum):
    """Where a patch's rows go: before the prompt, or after it (directly before the reply)."""

    prefix = "prefix"
    suffix = "suffix"


class HasRows(Protocol):
    @property
    def rows(self) -> torch.Tensor: ...

    @property
    def placement(self) -> Placement: ...


@dataclass(frozen=True)
class Segment:
    """Patches of one placement laid out in a row: positions where ``is_token`` is False come from ``embeds``.

    Attributes:
        token_ids: One id per position; patch rows hold ``placeholder_id``, separators a real id.
        is_token: Per position, True where the model embeds ``token_ids`` itself.
        embeds: ``[len(token_ids), hidden]``; patch rows filled, separator rows zero.
    """

    token_ids: list[int]
    is_token: list[bool]
    embeds: torch.Tensor

    @property
    def n_patch_tokens(self) -> int:
        return sum(not t for t in self.is_token)

    def __len__(self) -> int:
        return len(self.token_ids)

    def to(self, dtype: torch.dtype) -> Segment:
        return Segment(self.token_ids, self.is_token, self.embeds.to(dtype))


@dataclass(frozen=True)
class Layout:
    """A stack laid out around a prompt: ``prefix`` segment, the prompt, ``suffix`` segment (either may be None)."""

    prefix: Segment | None
    suffix: Segment | None

    def __len__(self) -> int:
        """Positions the stack adds to the prompt."""
        return sum(len(s) for s in (self.prefix, self.suffix) if s is not None)

    @property
    def n_patch_tokens(self) -> int:
        return sum(s.n_patch_tokens for s in (self.prefix, self.suffix) if s is not None)

    @property
    def n_prefix(self) -> int:
        return len(self.prefix) if self.prefix is not None else 0

    def token_ids(self, prompt_ids: list[int]) -> list[int]:
        """Ids of every position of the engine input (placeholders at patch rows)."""
        head = self.prefix.token_ids if self.prefix else []
        tail = self.suffix.token_ids if self.suffix else []
        return head + prompt_ids + tail

    def is_token(self, n_prompt: int) -> list[bool]:
        """Per position of the engine input: True where the model embeds the token id itself."""
        head = self.prefix.is_token if self.prefix else []
        tail = self.suffix.is_token if self.suffix else []
        return head + [True] * n_prompt + tail

    def embeds(self, n_prompt: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[len(self) + n_prompt, hidden]``: patch rows in place, zeros at every token position."""
        segments = [s for s in (self.prefix, self.suffix) if s is not None]
        hidden, dtype = segments[0].embeds.shape[1], dtype or segments[0].embeds.dtype
        out = torch.zeros(len(self) + n_prompt, hidden, dtype=dtype)
        if self.prefix is not None:
            out[: len(self.prefix)] = self.prefix.embeds
        if self.suffix is not None:
            out[len(out) - len(self.suffix) :] = self.suffix.embeds
        return out

    def to(self, dtype: torch.dtype) -> Layout:
        return Layout(*(s.to(dtype) if s is not None else None for s in (self.prefix, self.suffix)))


def _segment(patches: list[HasRows], separator_id: int, placeholder_id: int) -> Segment | None:
    if not patches:
        return None
    token_ids: list[int] = []
    is_token: list[bool] = []
    parts: list[torch.Tensor] = []
    hidden = patches[0].rows.shape[1]
    for i, patch in enumerate(patches):
        if i:
            token_ids.append(separator_id)
            is_token.append(True)
            parts.append(torch.zeros(1, hidden, dtype=patch.rows.dtype))
        n = patch.rows.shape[0]
        token_ids.extend([placeholder_id] * n)
        is_token.extend([False] * n)
        parts.append(patch.rows)
    return Segment(token_ids=token_ids, is_token=is_token, embeds=torch.cat(parts))


def compose_stack(patches: list[HasRows], *, separator_id: int, placeholder_id: int = 0) -> Layout | None:
    """Lay out ``patches`` in order, each in its placement's segment; ``None`` for an empty stack."""
    if not patches:
        return None
    by_placement = {p: [patch for patch in patches if patch.placement == p] for p in Placement}
    return Layout(
        prefix=_segment(by_placement[Placement.prefix], separator_id, placeholder_id),
        suffix=_segment(by_placement[Placement.suffix], separator_id, placeholder_id),
    )


def inputs_embeds(layout: Layout | None, prompt_ids: list[int], embedding: torch.nn.Embedding) -> torch.Tensor:
    """Full ``[len, hidden]`` input embeddings of the stack around ``prompt_ids``, as a HF model would take them.

    This is the reference semantics of the layout (used by training and by the exactness test): token
    positions use the model's own embedding rows, patch positions use the patch rows.
    """
    weight = embedding.weight
    if layout is None:
        return embedding(torch.tensor(prompt_ids, dtype=torch.long, device=weight.device))
    ids = layout.token_ids(prompt_ids)
    embeds = embedding(torch.tensor(ids, dtype=torch.long, device=weight.device))
    rows = layout.embeds(len(prompt_ids)).to(embeds)
    patch_pos = ~torch.tensor(layout.is_token(len(prompt_ids)), device=weight.device)
    return torch.where(patch_pos[:, None], rows, embeds)

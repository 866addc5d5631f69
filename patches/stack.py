"""Patch stacks: parsing ``a,b@2`` specs and laying a stack out in front of a prompt.

Engine input for a stack ``[p1, p2, …]`` and prompt tokens ``t``::

    p1.rows, <sep>, p2.rows, <sep>, …, pk.rows, t

``<sep>`` is one real token of the model's vocabulary (by default the tokenizer's ``"\\n"`` token),
embedded by the model's own embedding table. It marks the boundary between patches that were trained
separately; there is no separator after the last patch (its training already saw the prompt follow
it directly). Training uses this same function, so a patch is trained on exactly the layout it is
served with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

from patches.errors import StackError

NONE_SPEC = "none"
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


class HasRows(Protocol):
    @property
    def rows(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Prefix:
    """A stack laid out for the engine: rows where ``is_token`` is False come from ``embeds``.

    Attributes:
        token_ids: One id per prefix position; patch rows hold ``placeholder_id``, separators a real id.
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


def compose_prefix(patches: list[HasRows], *, separator_id: int, placeholder_id: int = 0) -> Prefix | None:
    """Lay out ``patches`` in order, joined by the separator token; ``None`` for an empty stack."""
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
    return Prefix(token_ids=token_ids, is_token=is_token, embeds=torch.cat(parts))


def prefix_inputs_embeds(prefix: Prefix | None, prompt_ids: list[int], embedding: torch.nn.Embedding) -> torch.Tensor:
    """Full ``[len, hidden]`` input embeddings for ``prefix + prompt_ids``, as a HF model would take them.

    This is the reference semantics of the layout (used by training and by the exactness test): token
    positions use the model's own embedding rows, patch positions use the patch rows.
    """
    ids = (prefix.token_ids if prefix else []) + prompt_ids
    weight = embedding.weight
    embeds = embedding(torch.tensor(ids, dtype=torch.long, device=weight.device))
    if prefix is not None:
        patch_pos = torch.tensor([not t for t in prefix.is_token] + [False] * len(prompt_ids), device=weight.device)
        embeds = torch.where(patch_pos[:, None], torch.cat([prefix.embeds.to(embeds), embeds[len(prefix) :]]), embeds)
    return embeds

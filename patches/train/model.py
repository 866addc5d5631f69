"""The trainable patch on the frozen base model, laid out exactly as the server lays it out.

Every forward pass builds its input embeddings with :func:`patches.stack.inputs_embeds` — the function
whose semantics the server's engine input reproduces — so a prefix patch is trained with its rows before
the chat-templated prompt and a suffix patch with its rows after it, directly before the response. For a
prefix patch this is the layout of PEFT's prompt tuning (checked to give identical logits in the tests);
PEFT cannot place virtual tokens after the prompt, which is why the forward pass is our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from patches.chat import encode_chat
from patches.device import weight_dtype
from patches.stack import HasRows, Layout, Placement, compose_stack, inputs_embeds
from patches.textinit import DEFAULT_INIT_TEXT, text_init_rows
from patches.train.config import InitMode, TrainConfig


def load_base(model_dir: Path, device: torch.device | str = "cpu", *, bf16: bool = False) -> tuple[Any, Any]:
    """The frozen base model on ``device`` and its tokenizer; no remote code, safetensors only.

    Float32, except bfloat16 weights on CUDA with ``bf16`` (:func:`patches.device.weight_dtype`).
    """
    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=weight_dtype(device, bf16), trust_remote_code=False, use_safetensors=True
    )
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def initial_rows(base: Any, tokenizer: Any, config: TrainConfig) -> torch.Tensor:
    """``[n_tokens, hidden]`` starting rows: the embeddings of an instruction (text init), or random."""
    weight = base.get_input_embeddings().weight
    if config.init == InitMode.text:
        ids = tokenizer.encode(config.init_text or DEFAULT_INIT_TEXT, add_special_tokens=False)
        return text_init_rows(weight, ids, config.n_tokens)
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn(config.n_tokens, weight.shape[1], generator=generator) * weight.std().item()


@dataclass(frozen=True)
class Example:
    """One chat-templated prompt (as served) and the response the loss is taken on."""

    prompt_ids: list[int]
    response_ids: list[int]


def make_example(tokenizer: Any, prompt: str, response: str, max_response_tokens: int) -> Example:
    """Chat-templated prompt + response + end of turn.

    A response of ``max_response_tokens`` or more is cut there and gets no end-of-turn token, so the
    patch never learns to stop long answers early; complete ones (refusals) do learn to end.
    """
    prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    if len(response_ids) >= max_response_tokens:
        response_ids = response_ids[:max_response_tokens]
    else:
        response_ids.append(tokenizer.eos_token_id)
    return Example(prompt_ids, response_ids)


@dataclass(frozen=True)
class PlacedRows:
    """Rows and their placement: what :func:`patches.stack.compose_stack` lays out (a patch without metadata)."""

    rows: torch.Tensor
    placement: Placement


@dataclass(frozen=True)
class ResponseLogits:
    """Logits at the positions that predict each response token, right-padded to the longest response.

    Attributes:
        logits: ``[batch, max_response, vocab]``.
        targets: ``[batch, max_response]`` response token ids (0 where padded).
        mask: ``[batch, max_response]``, True on real response tokens.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def select(self, indices: list[int]) -> ResponseLogits:
        """The examples at ``indices`` (in that order), padded only to the longest of them, as a forward pass
        of just those examples would be (so it lines up with one, e.g. the bare model's on the same items)."""
        mask = self.mask[indices]
        width = int(mask.sum(-1).max()) if indices else 0
        return ResponseLogits(self.logits[indices, :width], self.targets[indices, :width], mask[:, :width])

    def token_logps(self) -> torch.Tensor:
        """``[batch, max_response]`` log-probability of each response token (0 where padded)."""
        logps = torch.log_softmax(self.logits.float(), dim=-1)
        return torch.gather(logps, 2, self.targets.unsqueeze(-1)).squeeze(-1) * self.mask


class PatchModel:
    """The frozen base model with trainable rows in one placement.

    Args:
        base: A HF causal LM (frozen).
        rows: The trainable ``[n, hidden]`` parameter.
        placement: Where the rows go (:class:`patches.stack.Placement`).
        context: Frozen patches laid out before the rows, in stack order (a pass in the stack it serves in).
        separator_id: The token between stacked patches (only used with ``context``).
    """

    def __init__(
        self,
        base: Any,
        rows: torch.nn.Parameter,
        placement: Placement,
        *,
        context: tuple[HasRows, ...] = (),
        separator_id: int = 0,
    ) -> None:
        self.base = base
        self.rows = rows
        self.placement = Placement(placement)
        self.context = context
        self.separator_id = separator_id
        self._embedding = base.get_input_embeddings()

    def layout(self, rows: torch.Tensor | None) -> Layout | None:
        """The stack layout of the context patches and ``rows`` (``None`` = the bare model, no context either)."""
        if rows is None:
            return None
        return compose_stack([*self.context, PlacedRows(rows, self.placement)], separator_id=self.separator_id)

    def stack_rows(self) -> torch.Tensor:
        """Every row the layout holds (context first): what a patched answer depends on besides the prompt."""
        return torch.cat([*(c.rows.to(self.rows) for c in self.context), self.rows])

    def response_logits(self, examples: list[Example], rows: torch.Tensor | None) -> ResponseLogits:
        """Run the batch with ``rows`` laid out around each prompt (``None``: no patch)."""
        layout = self.layout(rows)
        device = self._embedding.weight.device
        seqs, starts = [], []
        for e in examples:
            head = inputs_embeds(layout, e.prompt_ids, self._embedding)
            tail = self._embedding(torch.tensor(e.response_ids, dtype=torch.long, device=device))
            seqs.append(torch.cat([head, tail.to(head.dtype)]))
            starts.append(len(head))
        width = max(len(s) for s in seqs)
        embeds = torch.stack([F.pad(s, (0, 0, 0, width - len(s))) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        states = self.base.base_model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
        longest = max(len(e.response_ids) for e in examples)
        picked, targets, mask = [], [], []
        for b, (e, start) in enumerate(zip(examples, starts, strict=True)):
            n = len(e.response_ids)
            picked.append(F.pad(states[b, start - 1 : start - 1 + n], (0, 0, 0, longest - n)))
            targets.append(e.response_ids + [0] * (longest - n))
            mask.append([True] * n + [False] * (longest - n))
        logits = self.base.get_output_embeddings()(torch.stack(picked))
        return ResponseLogits(logits, torch.tensor(targets, device=device), torch.tensor(mask, device=device))

    def generate(self, prompts: list[list[int]], rows: torch.Tensor | None, max_tokens: int) -> list[list[int]]:
        """Greedy response token ids of each chat-templated prompt with ``rows`` laid out (``None``: no patch).

        Left-padded like :func:`patches.train.teacher.generate_answers`, so with ``rows=None`` both agree.
        """
        layout = self.layout(rows)
        heads = [inputs_embeds(layout, ids, self._embedding) for ids in prompts]
        width = max(len(h) for h in heads)
        embeds = torch.stack([F.pad(h, (0, 0, width - len(h), 0)) for h in heads])
        mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads], device=embeds.device)
        pad = self.base.generation_config.pad_token_id or 0
        out = self.base.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
        )  # with inputs_embeds, HF returns only the new tokens
        eos = self.base.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        answers = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[:cut])
        return answers

    def sequence_logps(self, examples: list[Example], rows: torch.Tensor | None) -> torch.Tensor:
        """``[batch]`` summed log-probability of each example's response."""
        return self.response_logits(examples, rows).token_logps().sum(-1)


def nll(out: ResponseLogits) -> torch.Tensor:
    """Mean negative log-likelihood per response token over the batch (cross-entropy on the targets)."""
    return -out.token_logps().sum() / out.mask.sum()


def kl_to_reference(out: ResponseLogits, reference: ResponseLogits) -> torch.Tensor:
    """Mean per-token KL(reference ‖ patched) over the full next-token distribution, on real response tokens.

    With the bare model as the reference this is a direct "change nothing here" loss: zero exactly when
    the patched model predicts every response position as the bare model does.
    """
    ref = torch.log_softmax(reference.logits.float(), dim=-1)
    cur = torch.log_softmax(out.logits.float(), dim=-1)
    per_token = (ref.exp() * (ref - cur)).sum(-1)
    return (per_token * out.mask).sum() / out.mask.sum()

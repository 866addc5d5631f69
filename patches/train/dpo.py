"""Stage 2, DPO: preference pairs refine the patch against a frozen reference policy.

Pairs: for a harmful prompt, chosen = the teacher's refusal, rejected = the base model's own
(compliant) answer; for a benign prompt, chosen = the base model's answer, rejected = a refusal —
the second kind is what pushes over-refusal back down. The loss is DPO's
``-log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])``; the reference log-probs are
computed once, before training, with the stage-1 patch (default) or with no patch.

TRL's DPOTrainer is not used: it owns tokenisation, batching and the reference model, while here the
prompt must be laid out exactly as the server lays it out (suffix rows included), and the only
trainable tensor is the patch; the loss itself is the three lines below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patches.device import autocast
from patches.train.model import Example, PatchModel


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def with_reference(
    pairs: list[Pair], model: PatchModel, reference_rows: torch.Tensor | None, batch_size: int = 16, bf16: bool = False
) -> list[Pair]:
    """Attach the reference policy's log-probs (``reference_rows`` laid out, or no patch) to every pair."""
    out = []
    with torch.no_grad(), autocast(model.rows.device, bf16):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            logps = model.sequence_logps([p.chosen for p in chunk] + [p.rejected for p in chunk], reference_rows)
            for i, pair in enumerate(chunk):
                out.append(Pair(pair.chosen, pair.rejected, float(logps[i]), float(logps[len(chunk) + i])))
    return out


def dpo_loss(model: PatchModel, batch: list[Pair], *, beta: float, nll_weight: float = 0.0) -> torch.Tensor:
    """Mean DPO loss of a batch of pairs under the model's current rows, plus ``nll_weight`` × the chosen
    side's per-token negative log-likelihood (the RPO regulariser: it keeps the chosen answers likely, so
    the policy cannot win the margin by making every answer less fluent)."""
    logps = model.sequence_logps([p.chosen for p in batch] + [p.rejected for p in batch], model.rows)
    chosen, rejected = logps[: len(batch)], logps[len(batch) :]
    ref_chosen = torch.tensor([p.ref_chosen for p in batch], device=chosen.device)
    ref_rejected = torch.tensor([p.ref_rejected for p in batch], device=chosen.device)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = -F.logsigmoid(beta * margin).mean()
    if nll_weight:
        tokens = torch.tensor([len(p.chosen.response_ids) for p in batch], dtype=chosen.dtype, device=chosen.device)
        loss = loss + nll_weight * (-chosen / tokens).mean()
    return loss

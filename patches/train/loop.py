"""The optimisation loop both stages share: batches, AdamW on the prefix only, progress, checkpoints.

Checkpoints (``<work_dir>/<stage>.ckpt.safetensors``) hold the prefix rows, AdamW's moments and the
step as safetensors tensors and metadata (never pickle); a run resumes from them at the step after.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from patches.device import autocast

T = TypeVar("T")
CHECKPOINT_EVERY = 10


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _save(path: Path, prefix: torch.nn.Parameter, optimizer: torch.optim.AdamW, step: int, logs: list[float]) -> None:
    state = optimizer.state.get(prefix, {})
    tensors = {"prefix": prefix.detach().contiguous()}
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            tensors[name] = state[name].contiguous()
    adam_step = float(state["step"]) if "step" in state else 0.0
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "adam_step": str(adam_step), "losses": json.dumps(logs)})
    tmp.replace(path)


def _restore(path: Path, prefix: torch.nn.Parameter, optimizer: torch.optim.AdamW) -> tuple[int, list[float]]:
    if not path.exists():
        return 0, []
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path), device=str(prefix.device))
    with torch.no_grad():
        prefix.copy_(tensors["prefix"])
    if "exp_avg" in tensors:
        optimizer.state[prefix] = {
            "step": torch.tensor(float(meta["adam_step"])),
            "exp_avg": tensors["exp_avg"],
            "exp_avg_sq": tensors["exp_avg_sq"],
        }
    return int(meta["step"]), json.loads(meta["losses"])


def run_stage(
    name: str,
    items: Sequence[T],
    loss_fn: Callable[[list[T]], torch.Tensor],
    prefix: torch.nn.Parameter,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    checkpoint: Path,
    bf16: bool = False,
) -> list[float]:
    """Minimise ``loss_fn`` over shuffled batches of ``items`` for ``epochs``; returns per-step losses.

    Resumes from ``checkpoint`` when it exists; the data order is a function of ``seed`` alone, so a
    resumed run sees the same batches as an uninterrupted one.
    """
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < total * batch_size:
        epoch = list(range(len(items)))
        rng.shuffle(epoch)
        order += epoch
    optimizer = torch.optim.AdamW([prefix], lr=lr, weight_decay=0.0)
    start, losses = _restore(checkpoint, prefix, optimizer)
    with progress_bar() as bar:
        task = bar.add_task(name, total=total, completed=start, info="")
        for step in range(start, total):
            batch = [items[i] for i in order[step * batch_size : (step + 1) * batch_size]]
            for group in optimizer.param_groups:  # 5 warm-up steps, then linear decay to zero
                group["lr"] = lr * min(1.0, (step + 1) / 5) * (1 - step / total)
            optimizer.zero_grad()
            with autocast(prefix.device, bf16):
                loss = loss_fn(batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            recent = losses[-10:]
            bar.update(task, advance=1, info=f"loss {sum(recent) / len(recent):.4f}")
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == total:
                _save(checkpoint, prefix, optimizer, step + 1, losses)
    return losses

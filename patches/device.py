"""Where training and evaluation run: the one place that picks the torch device and its precision.

``patchserve train`` and ``eval`` take ``--device auto|cpu|cuda``; :func:`resolve_device` turns that into a
``torch.device`` (``auto``: CUDA when ``torch.cuda.is_available()``). Everything else follows the model:
tensors are created on ``model.device`` (or the embedding's device) and autocast uses its type.

Precision: on CPU the frozen base model stays float32 and ``bf16`` means bfloat16 *autocast* (the tested
path, unchanged). On CUDA with ``bf16`` the weights themselves are loaded in bfloat16 (half the memory of
float32: ~14 GB instead of ~28 GB for a 7B model); the trainable patch rows and AdamW's state stay float32
either way, and the written patch is float32.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class DeviceChoice(StrEnum):
    """``--device``: ``auto`` picks CUDA when available, else CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(choice: str) -> torch.device:
    """The device ``choice`` names.

    Raises:
        ValueError: ``choice`` is not auto/cpu/cuda, or it is ``cuda`` and torch sees no CUDA device.
    """
    try:
        picked = DeviceChoice(choice)
    except ValueError:
        raise ValueError(f"invalid device {choice!r}; choose auto, cpu or cuda") from None
    if picked == DeviceChoice.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if picked == DeviceChoice.cuda and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ValueError(f"device 'cuda' requested but torch sees no CUDA device ({build}); use --device cpu or auto")
    return torch.device(picked.value)


def weight_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """The frozen base model's weight dtype: bfloat16 on CUDA with ``bf16``, else float32."""
    return torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast on ``device``'s type, or a disabled one."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def precision_tag(device: torch.device, bf16: bool) -> str:
    """Part of a generation cache key: ``bf16``/``fp32`` on CPU (as before), ``cuda-bf16``/``cuda-fp32`` on
    CUDA (other numerics, so other greedy answers)."""
    tag = "bf16" if bf16 else "fp32"
    return tag if device.type == "cpu" else f"{device.type}-{tag}"

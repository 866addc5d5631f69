"""``--device auto|cpu|cuda`` for ``patchserve train`` and ``eval``; no GPU here, so CPU is the tested path."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from patches.cli import app
from patches.device import precision_tag, resolve_device, weight_dtype
from patches.train.config import TrainConfig

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


@NO_GPU
def test_auto_picks_cpu_without_cuda_and_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert TrainConfig().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@NO_GPU
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="device 'cuda' requested but torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="invalid training config: device 'cuda' requested"):
        TrainConfig(device="cuda")
    with pytest.raises(ValueError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")


@NO_GPU
@pytest.mark.parametrize("command", [["train", "--max-prompts", "1"], ["eval"]])
def test_cli_device_cuda_fails_before_any_work(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--device", "cuda"], env={"COLUMNS": "200"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "torch sees no CUDA device" in result.output and "--device cpu" in result.output
    assert "Traceback" not in result.output


def test_bf16_means_weights_on_cuda_and_autocast_on_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (weight_dtype(cpu, True), weight_dtype(cuda, True), weight_dtype(cuda, False)) == (
        torch.float32,
        torch.bfloat16,
        torch.float32,
    )
    assert (precision_tag(cpu, True), precision_tag(cuda, True)) == ("bf16", "cuda-bf16")  # CPU cache keys unchanged

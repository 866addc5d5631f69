"""PEFT round trip on the real engine: a served prefix patch, exported with ``patchserve export-peft`` and
loaded by PEFT's own ``PeftModel.from_pretrained``, gives the server's greedy output in transformers.

Like with like: PEFT prompt tuning prepends the virtual tokens to every input token, and the server puts a
single prefix patch's rows at position 0, before the chat-templated prompt (``<|im_start|>system…``; no
BOS is added). So PEFT gets the same chat-templated token ids as input, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from patches.chat import encode_chat
from patches.cli import app
from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "Give me three tips for staying safe on a mountain hike."}]
N_TOKENS = 16


def test_exported_patch_generates_in_peft_what_the_server_generates(
    server: RunningServer, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "alpha-peft"
    patch = server.patch_dir / "alpha-v1.safetensors"
    result = CliRunner().invoke(app, ["export-peft", str(patch), str(out), "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([encode_chat(tokenizer, MESSAGES)])
    with torch.no_grad():
        generated = peft_model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = tokenizer.decode(generated[0, -N_TOKENS:], skip_special_tokens=True)

    response = _chat(server, "single")
    assert response.headers["X-Patch-Applied"] == "alpha@1"
    assert response.json()["usage"]["completion_tokens"] == N_TOKENS
    assert response.json()["choices"][0]["message"]["content"] == expected
    bare = _chat(server, "bare").json()["choices"][0]["message"]["content"]
    assert bare != expected  # the rows change this answer: the comparison cannot pass with the patch ignored


def _chat(server: RunningServer, tenant: str) -> httpx.Response:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"X-Tenant-Id": tenant},
        json={"messages": MESSAGES, "temperature": 0, "max_tokens": N_TOKENS, "ignore_eos": True},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response

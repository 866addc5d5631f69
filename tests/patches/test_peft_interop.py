"""PEFT interop: real PEFT adapters (made by PEFT on the real model) to patches and back, and every refusal."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from patches.chat import encode_chat
from patches.cli import app
from patches.errors import ConversionError, PatchRejected, RejectReason
from patches.fingerprint import ModelSpec, model_spec
from patches.format import PatchMetadata, dump_patch, parse_patch, read_patch
from patches.peft_interop import (
    BASE_MODEL_KEY,
    adapter_to_patch,
    patch_to_adapter,
    read_adapter,
    write_adapter,
)
from patches.signing import generate_keypair, key_id, load_private_key, load_public_key
from patches.stack import Placement, compose_stack, inputs_embeds
from patches.trust import TrustStore
from tests.patches.test_fingerprint import make_model_dir

N_TOKENS = 6


def load_model(model_dir: Path) -> torch.nn.Module:
    """A fresh float32 copy of the real model (PEFT wraps the model it is given)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def tiny_model() -> LlamaForCausalLM:
    """A random 1-layer Llama: enough for PEFT to build and save any method's adapter."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def real_spec(model_dir: Path) -> ModelSpec:
    return model_spec(model_dir)


@pytest.fixture(scope="module")
def peft_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A PROMPT_TUNING adapter saved by PEFT for the real model, and its rows."""
    peft_model = get_peft_model(
        load_model(model_dir), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_TOKENS)
    )
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(out)
    return out, peft_model.prompt_encoder["default"].embedding.weight.detach().clone()


@pytest.fixture
def adapter_copy(peft_adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> Path:
    return Path(shutil.copytree(peft_adapter[0], tmp_path / "adapter"))


def edit_config(adapter_dir: Path, **changes: object) -> Path:
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return adapter_dir


def meta_for(spec: ModelSpec, **fields: object) -> PatchMetadata:
    return PatchMetadata(**{"name": "imported", "version": 1, "base_model": spec.fingerprint, **fields})  # type: ignore[arg-type]


@pytest.fixture
def make_patch(real_spec: ModelSpec) -> Callable[..., bytes]:
    """Format-v1 bytes of a patch for the real model with seeded rows in ``dtype``."""

    def make(dtype: torch.dtype = torch.float32, placement: Placement = Placement.prefix, n: int = 5) -> bytes:
        rows = torch.randn(n, real_spec.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.05
        return dump_patch(rows.to(dtype), meta_for(real_spec, name="source", version=4, placement=placement))

    return make


def test_peft_adapter_imports_with_its_rows_bit_exact(
    peft_adapter: tuple[Path, torch.Tensor], real_spec: ModelSpec
) -> None:
    adapter_dir, rows = peft_adapter
    data = adapter_to_patch(read_adapter(adapter_dir), meta=meta_for(real_spec), expect=real_spec)
    meta, tensor, _ = read_patch(data)
    assert tensor.dtype == rows.dtype and torch.equal(tensor, rows)
    assert (meta.ref, meta.base_model, meta.placement) == ("imported@1", real_spec.fingerprint, Placement.prefix)
    assert parse_patch(data, expect=real_spec).n_tokens == N_TOKENS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_round_trips_through_peft_bit_exact(
    make_patch: Callable[..., bytes], real_spec: ModelSpec, model_dir: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    """patch -> PEFT adapter (which PeftModel.from_pretrained loads) -> patch: the same rows, bytes and dtype."""
    data = make_patch(dtype)
    _, stored, _ = read_patch(data)
    write_adapter(patch_to_adapter(data, expect=real_spec, base_model_name=str(model_dir)), tmp_path / "out")
    loaded = PeftModel.from_pretrained(load_model(model_dir), tmp_path / "out")
    assert torch.equal(loaded.get_prompt_embedding_to_save("default"), stored.to(torch.float32))
    adapter = read_adapter(tmp_path / "out")
    assert adapter.rows.dtype == dtype and torch.equal(adapter.rows, stored)
    assert adapter.metadata[BASE_MODEL_KEY] == real_spec.fingerprint
    back = adapter_to_patch(adapter, meta=meta_for(real_spec), expect=real_spec)
    assert read_patch(back)[1].view(torch.uint8).equal(stored.view(torch.uint8))


def test_exported_adapter_computes_what_the_prefix_layout_computes(
    make_patch: Callable[..., bytes], real_spec: ModelSpec, model_dir: Path, tmp_path: Path
) -> None:
    """PEFT prepends the virtual tokens to every input token: the server's layout for one prefix patch."""
    data = make_patch()
    write_adapter(patch_to_adapter(data, expect=real_spec, base_model_name=str(model_dir)), tmp_path / "out")
    peft_model = PeftModel.from_pretrained(load_model(model_dir), tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Name three rivers."}])
    base = load_model(model_dir)
    separator = tokenizer.encode("\n", add_special_tokens=False)[0]
    layout = compose_stack([parse_patch(data, expect=real_spec)], separator_id=separator)
    with torch.no_grad():
        ours = base(inputs_embeds=inputs_embeds(layout, ids, base.get_input_embeddings())[None]).logits
        theirs = peft_model(input_ids=torch.tensor([ids])).logits
    assert theirs.shape == ours.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_signed_import_verifies(peft_adapter: tuple[Path, torch.Tensor], real_spec: ModelSpec, tmp_path: Path) -> None:
    from patches.signing import Verifier

    private_path, public_path = generate_keypair(tmp_path / "keys", "release")
    adapter = read_adapter(peft_adapter[0])
    data = adapter_to_patch(adapter, meta=meta_for(real_spec), expect=real_spec, key=load_private_key(private_path))
    verified = Verifier(TrustStore.load(tmp_path / "keys")).verify(data, expect=real_spec)
    assert verified.meta.signer == key_id(load_public_key(public_path))


@pytest.mark.parametrize(
    ("config", "found"),
    [
        (LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj"]), "LORA"),
        (PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4), "PREFIX_TUNING"),
        (PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=8), "P_TUNING"),
    ],
)
def test_other_peft_methods_are_refused_by_name(config: object, found: str, tmp_path: Path) -> None:
    get_peft_model(tiny_model(), config).save_pretrained(tmp_path / "adapter")  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match=rf"peft_type '{found}'.*only PROMPT_TUNING"):
        read_adapter(tmp_path / "adapter")


def test_wrong_token_dim_is_refused(real_spec: ModelSpec, tmp_path: Path) -> None:
    peft_model = get_peft_model(tiny_model(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")
    with pytest.raises(PatchRejected, match="token_dim 16 does not match the model's hidden size 576") as info:
        adapter_to_patch(adapter, meta=meta_for(real_spec), expect=real_spec)
    assert info.value.reason == RejectReason.bad_shape


def test_num_virtual_tokens_must_match_the_tensor(adapter_copy: Path) -> None:
    edit_config(adapter_copy, num_virtual_tokens=N_TOKENS + 1)
    with pytest.raises(PatchRejected, match=rf"shape \[{N_TOKENS}, 576\].*num_virtual_tokens {N_TOKENS + 1}") as info:
        read_adapter(adapter_copy)
    assert info.value.reason == RejectReason.bad_shape


def test_hub_base_model_is_refused_unless_accepted(adapter_copy: Path, real_spec: ModelSpec) -> None:
    adapter = read_adapter(edit_config(adapter_copy, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    with pytest.raises(PatchRejected, match="cannot be checked.*--accept-base") as info:
        adapter_to_patch(adapter, meta=meta_for(real_spec), expect=real_spec)
    assert info.value.reason == RejectReason.wrong_model
    with pytest.raises(PatchRejected, match="cannot be checked"):
        adapter_to_patch(adapter, meta=meta_for(real_spec), expect=real_spec, accept_base="HuggingFaceTB/other")
    data = adapter_to_patch(
        adapter, meta=meta_for(real_spec), expect=real_spec, accept_base="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert read_patch(data)[0].base_model == real_spec.fingerprint


def test_local_base_model_of_another_fingerprint_is_refused(
    adapter_copy: Path, real_spec: ModelSpec, tmp_path: Path
) -> None:
    other = make_model_dir(tmp_path / "other-model")
    adapter = read_adapter(edit_config(adapter_copy, base_model_name_or_path=str(other)))
    with pytest.raises(PatchRejected, match="other-model.*has fingerprint") as info:
        adapter_to_patch(adapter, meta=meta_for(real_spec), expect=real_spec, accept_base=str(other))
    assert info.value.reason == RejectReason.wrong_model


def test_recorded_fingerprint_of_an_export_must_match(
    make_patch: Callable[..., bytes], real_spec: ModelSpec, tmp_path: Path
) -> None:
    adapter = patch_to_adapter(make_patch(), expect=real_spec, base_model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    write_adapter(adapter, tmp_path / "out")
    other = ModelSpec(fingerprint="sha256:" + "cd" * 32, hidden_size=real_spec.hidden_size)
    with pytest.raises(PatchRejected, match="exported from a patch for base model") as info:
        adapter_to_patch(read_adapter(tmp_path / "out"), meta=meta_for(other), expect=other)
    assert info.value.reason == RejectReason.wrong_model


def test_suffix_patch_export_is_refused(make_patch: Callable[..., bytes], real_spec: ModelSpec) -> None:
    with pytest.raises(ConversionError, match="placement suffix.*only prefix patches export"):
        patch_to_adapter(make_patch(placement=Placement.suffix), expect=real_spec, base_model_name="m")


def test_pickle_only_and_missing_files_are_refused(peft_adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    with pytest.raises(PatchRejected, match="no adapter_config.json"):
        read_adapter(tmp_path)
    pickled = Path(shutil.copytree(peft_adapter[0], tmp_path / "pickled"))
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": torch.ones(N_TOKENS, 576)}, pickled / "adapter_model.bin")
    with pytest.raises(PatchRejected, match=r"only adapter_model.bin \(pickle, never loaded\)") as info:
        read_adapter(pickled)
    assert info.value.reason == RejectReason.bad_format


def test_other_tensors_in_the_weights_are_refused(adapter_copy: Path) -> None:
    save_file(
        {"prompt_embeddings": torch.ones(N_TOKENS, 576), "lm_head.weight": torch.ones(2, 2)},
        str(adapter_copy / "adapter_model.safetensors"),
    )
    with pytest.raises(PatchRejected, match=r"exactly 'prompt_embeddings', found \['lm_head.weight'"):
        read_adapter(adapter_copy)


@pytest.fixture
def invoke() -> Callable[..., object]:
    def run(*args: object, code: int = 0):
        result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    return run


def test_cli_round_trip(
    invoke: Callable[..., object], peft_adapter: tuple[Path, torch.Tensor], model_dir: Path, tmp_path: Path
) -> None:
    generate_keypair(tmp_path / "keys", "release")
    patch = tmp_path / "p.safetensors"
    out = invoke(
        "import-peft", peft_adapter[0], "--name", "peft", "--version", 2, "--model", model_dir,
        "--key", tmp_path / "keys" / "release.key", "--out", patch,
    )  # fmt: skip
    assert "ref     peft@2" in out.output and f"shape   {N_TOKENS} x 576 float32" in out.output  # type: ignore[attr-defined]
    invoke("export-peft", patch, tmp_path / "exported", "--model", model_dir)
    assert torch.equal(read_adapter(tmp_path / "exported").rows, peft_adapter[1])
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", N_TOKENS, 576)


def test_cli_refusals_exit_2_with_the_reason(
    invoke: Callable[..., object], make_patch: Callable[..., bytes], model_dir: Path, tmp_path: Path
) -> None:
    get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    result = invoke("import-peft", tmp_path / "lora", "--name", "x", "--version", 1, "--model", model_dir, code=2)
    assert "peft_type 'LORA'" in result.output and "only PROMPT_TUNING" in result.output  # type: ignore[attr-defined]
    suffix = tmp_path / "suffix.safetensors"
    suffix.write_bytes(make_patch(placement=Placement.suffix))
    result = invoke("export-peft", suffix, tmp_path / "out", "--model", model_dir, code=2)
    assert "placement suffix" in result.output  # type: ignore[attr-defined]
    assert not (tmp_path / "out").exists()

"""Base-model fingerprints: stable for the same model, different for a different computation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from patches.fingerprint import embedding_matrix, fingerprint_model, model_spec

FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
VOLATILE_CHANGES = [
    ("transformers_version", "9.9.9"),
    ("_name_or_path", "/somewhere/else"),
    ("_model_name_or_path", "renamed"),
    ("dtype", "float32"),
    ("torch_dtype", "float16"),
    ("use_cache", False),
]


def base_config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "vocab_size": 16,
        "tie_word_embeddings": True,
        "transformers_version": "5.19.0",
        "dtype": "bfloat16",
    }


def base_embedding() -> torch.Tensor:
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def make_model_dir(
    path: Path,
    config: dict | None = None,
    embedding: torch.Tensor | None = None,
    key: str = "model.embed_tokens.weight",
) -> Path:
    """A tiny fake HF model directory: ``config.json`` plus one safetensors file holding the embedding."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(base_config() if config is None else config, indent=2))
    tensors = {key: base_embedding() if embedding is None else embedding, "model.norm.weight": torch.ones(8)}
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture
def fake_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "base")


class TestFakeModel:
    def test_format_and_determinism(self, fake_dir, tmp_path):
        fingerprint = fingerprint_model(fake_dir)
        assert FINGERPRINT_RE.fullmatch(fingerprint)
        assert fingerprint_model(fake_dir) == fingerprint
        assert fingerprint_model(make_model_dir(tmp_path / "twin")) == fingerprint

    def test_resaving_with_other_layout_keeps_fingerprint(self, fake_dir, tmp_path):
        other = tmp_path / "resaved"
        other.mkdir()
        config = dict(reversed(base_config().items()))
        (other / "config.json").write_text(json.dumps(config, separators=(",", ":")))
        save_file({"lm_head.weight": torch.zeros(16, 8)}, str(other / "model-00002-of-00002.safetensors"))
        save_file(
            {"model.embed_tokens.weight": base_embedding(), "model.layers.0.w": torch.ones(3)},
            str(other / "model-00001-of-00002.safetensors"),
        )
        assert fingerprint_model(other) == fingerprint_model(fake_dir)

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("architectures", ["MistralForCausalLM"]),
            ("model_type", "mistral"),
            ("num_hidden_layers", 3),
            ("tie_word_embeddings", False),
            ("rope_theta", 10000.0),
        ],
    )
    def test_architecture_change_changes_fingerprint(self, fake_dir, tmp_path, key, value):
        changed = make_model_dir(tmp_path / "changed", config={**base_config(), key: value})
        assert fingerprint_model(changed) != fingerprint_model(fake_dir)

    @pytest.mark.parametrize(("key", "value"), VOLATILE_CHANGES)
    def test_volatile_config_key_keeps_fingerprint(self, fake_dir, tmp_path, key, value):
        changed = make_model_dir(tmp_path / "changed", config={**base_config(), key: value})
        assert fingerprint_model(changed) == fingerprint_model(fake_dir)

    def test_dropping_volatile_keys_keeps_fingerprint(self, fake_dir, tmp_path):
        config = {k: v for k, v in base_config().items() if k not in {"transformers_version", "dtype"}}
        assert fingerprint_model(make_model_dir(tmp_path / "changed", config=config)) == fingerprint_model(fake_dir)

    @pytest.mark.parametrize("position", [(0, 0), (15, 7), (7, 3)])
    def test_any_embedding_value_change_changes_fingerprint(self, fake_dir, tmp_path, position):
        embedding = base_embedding()
        embedding[position] = -embedding[position] if embedding[position] != 0 else 1.0
        changed = make_model_dir(tmp_path / "changed", embedding=embedding)
        assert fingerprint_model(changed) != fingerprint_model(fake_dir)

    def test_embedding_dtype_changes_fingerprint(self, fake_dir, tmp_path):
        """The same bytes read as float16 instead of bfloat16 are a different model."""
        changed = make_model_dir(tmp_path / "changed", embedding=base_embedding().view(torch.float16))
        assert fingerprint_model(changed) != fingerprint_model(fake_dir)

    @pytest.mark.parametrize("key", ["transformer.wte.weight", "bert.embeddings.word_embeddings.weight"])
    def test_other_embedding_names_are_found(self, tmp_path, key):
        model_dir = make_model_dir(tmp_path / "m", key=key)
        assert torch.equal(embedding_matrix(model_dir), base_embedding())
        assert FINGERPRINT_RE.fullmatch(fingerprint_model(model_dir))

    def test_missing_embedding_raises_without_full_path(self, tmp_path):
        model_dir = make_model_dir(tmp_path / "noembed", key="model.something_else.weight")
        with pytest.raises(FileNotFoundError) as info:
            fingerprint_model(model_dir)
        assert "noembed" in str(info.value)
        assert str(tmp_path) not in str(info.value)

    def test_model_spec_reads_hidden_size_and_passes_limits(self, fake_dir):
        spec = model_spec(fake_dir, max_rows=32, dtype="float16")
        assert (spec.fingerprint, spec.hidden_size, spec.max_rows, spec.dtype) == (
            fingerprint_model(fake_dir),
            8,
            32,
            "float16",
        )


class TestRealModel:
    @pytest.fixture(scope="class")
    def real_fingerprint(self, real_model_dir) -> str:
        return fingerprint_model(real_model_dir)

    def test_fingerprint_is_stable(self, real_model_dir, real_fingerprint):
        assert FINGERPRINT_RE.fullmatch(real_fingerprint)
        assert fingerprint_model(real_model_dir) == real_fingerprint

    def test_spec_has_the_model_width(self, real_model_dir):
        assert model_spec(real_model_dir).hidden_size == 576

    def _linked_copy(self, real_model_dir: Path, target: Path, **config_changes: object) -> Path:
        """The real weights (symlinked, not copied) under a rewritten config.json."""
        target.mkdir()
        (target / "model.safetensors").symlink_to(real_model_dir / "model.safetensors")
        config = json.loads((real_model_dir / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_changes}))
        return target

    def test_volatile_keys_keep_fingerprint(self, real_model_dir, real_fingerprint, tmp_path):
        linked = self._linked_copy(real_model_dir, tmp_path / "m", transformers_version="0.0.1", use_cache=False)
        assert fingerprint_model(linked) == real_fingerprint

    def test_architecture_change_changes_fingerprint(self, real_model_dir, real_fingerprint, tmp_path):
        linked = self._linked_copy(real_model_dir, tmp_path / "m", architectures=["MistralForCausalLM"])
        assert fingerprint_model(linked) != real_fingerprint

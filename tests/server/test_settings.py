"""Settings: environment prefix, the YAML config file, and the safety validators."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import CONFIG_FILE_ENV, Settings


def test_defaults_listen_on_loopback_8000(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    settings = Settings(dev_mode=True)
    assert (settings.host, settings.port, settings.block_size) == ("127.0.0.1", 8000, 32)


def test_environment_overrides_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "patchserve.yaml"
    config.write_text("port: 9000\nhost: 0.0.0.0\nmax_model_len: 1024\ntrust_dir: /etc/trust\n")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("PATCHSERVE_PORT", "9100")
    settings = Settings()
    assert (settings.host, settings.port, settings.max_model_len) == ("0.0.0.0", 9100, 1024)
    assert settings.trust_dir == Path("/etc/trust")


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError):
        Settings()


@pytest.mark.parametrize(
    "unsafe",
    [{"allow_unsigned": True, "trust_dir": "/t"}, {"trust_dir": None}, {"admin_token": "short", "trust_dir": "/t"}],
)
def test_unsafe_combinations_fail_outside_dev_mode(unsafe: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    with pytest.raises(ValidationError, match="unsafe outside dev mode"):
        Settings(**unsafe)
    assert Settings(**unsafe, dev_mode=True)  # only a warning in development


def test_block_size_must_be_a_multiple_of_16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    with pytest.raises(ValidationError, match="block_size"):
        Settings(block_size=40, dev_mode=True)


def test_engine_args_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv("PATCHSERVE_ENGINE_ARGS", '{"max_num_batched_tokens": 4096}')
    assert Settings(dev_mode=True).engine_args == {"max_num_batched_tokens": 4096}


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("max_num_batched_tokenz", "unknown vLLM engine argument 'max_num_batched_tokenz'"),
        ("enable_prompt_embeds", "'enable_prompt_embeds' is set by patchserve itself"),
        ("model", "'model' is set by patchserve itself"),
        ("max_model_len", "use PATCHSERVE_MAX_MODEL_LEN"),
    ],
)
def test_unknown_or_owned_engine_args_are_refused(key: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    with pytest.raises(ValidationError, match=message):
        Settings(dev_mode=True, engine_args={key: 1})


def test_engine_args_reach_the_vllm_engine_arguments(tmp_path: Path) -> None:
    from server.engine import EngineConfig, build_engine_args

    config = EngineConfig(
        model_dir=tmp_path, served_model_name="m", max_num_seqs=8, extra_args={"max_num_batched_tokens": 4096}
    )
    args = build_engine_args(config)
    assert (args.max_num_batched_tokens, args.max_num_seqs, args.model) == (4096, 8, str(tmp_path))
    assert args.enable_prompt_embeds and args.trust_remote_code is False
    with pytest.raises(ValueError, match="'bogus'"):
        build_engine_args(EngineConfig(model_dir=tmp_path, served_model_name="m", extra_args={"bogus": 1}))

"""All server settings, from ``PATCHSERVE_*`` environment variables and an optional YAML file.

Precedence (highest first): constructor arguments, environment variables, the YAML file named by
``PATCHSERVE_CONFIG_FILE``, defaults. Built inside ``create_app``/``main``, never at import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from patches.basemodel import default_cache_dir
from patches.stack import SEPARATOR
from server.engine import check_engine_args

log = logging.getLogger(__name__)
CONFIG_FILE_ENV = "PATCHSERVE_CONFIG_FILE"


class Settings(BaseSettings):
    """patchserve's configuration. Every field is ``PATCHSERVE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="PATCHSERVE_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    model: Path | None = Field(None, description="Local HF model directory; unset = embedded SmolLM2-135M-Instruct.")
    served_model_name: str | None = Field(None, description="Model id in the API; default: the directory name.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where the default model is prepared.")
    patch_dir: Path = Field(Path("var/patches"), description="Directory of patch files (*.safetensors).")
    tenants_file: Path = Field(Path("deploy/demo/tenants.yaml"), description="Tenant configuration (YAML).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Engine compute dtype.")
    max_model_len: int = Field(2048, ge=64, description="Context length (patch rows + prompt + output).")
    max_num_seqs: int = Field(64, ge=1, description="Sequences the engine batches at once.")
    block_size: int = Field(32, ge=16, description="KV-cache block size (a multiple of 32 on CPU).")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of accelerator memory (of RAM on CPU) for weights and KV cache."
    )
    enforce_eager: bool = Field(False, description="Skip graph compilation: ~4x faster start, ~5% slower.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description='More vLLM engine arguments, as JSON (e.g. {"tensor_parallel_size": 2}); unknown keys fail.',
    )
    max_patch_tokens: int = Field(256, ge=1, description="Most virtual tokens one patch may carry.")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest API request body; larger is refused (413) as it streams in."
    )
    max_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest admin patch upload; larger is refused (413) as it streams in."
    )
    separator: str = Field(SEPARATOR, description="Text of the single token placed between stacked patches.")
    state_dir: Path = Field(Path("var/state"), description="Shared state (all replicas): the version ledger.")
    trust_dir: Path | None = Field(None, description="Directory of trusted Ed25519 public keys (*.pub).")
    revocations_file: Path | None = Field(None, description="YAML list of revoked key ids and patch digests.")
    allow_unsigned: bool = Field(False, description="Accept unsigned patch files (development only).")
    dev_mode: bool = Field(False, description="Development mode: unsafe settings warn instead of failing.")
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /admin API; unset = disabled.")
    watch: bool = Field(True, description="Watch the patch directory and tenant file for changes.")
    watch_polling: bool = Field(False, description="Poll instead of inotify (network volumes).")
    state_sync_seconds: float = Field(
        2.0, gt=0, description="How often the shared version ledger is re-read (other replicas' rollbacks)."
    )
    overhead_sample_rate: float = Field(
        0.01, ge=0, le=1, description="Share of patched requests replayed with and without the patch (overhead)."
    )
    overhead_window: int = Field(32, ge=1, description="Replay pairs the overhead gauge averages over.")
    overhead_max_tokens: int = Field(128, ge=1, description="Cap on output tokens per overhead replay.")
    toxicity_metrics: bool = Field(
        True, description="Score finished completions for toxicity in the background (toxic-completion counters)."
    )
    metrics_max_stacks: int = Field(256, ge=1, description="Distinct stack label values before 'other'.")
    drain_timeout: int = Field(30, ge=0, description="Seconds SIGTERM waits for in-flight requests to finish.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("engine_args")
    @classmethod
    def _check_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_engine_args(value)  # imports vLLM, only when there are arguments to check
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16 (of 32 on CPU), got {self.block_size}")
        problems = []
        if self.allow_unsigned:
            problems.append("allow_unsigned accepts patch files nobody signed")
        if self.trust_dir is None and not self.allow_unsigned:
            problems.append("no trust_dir: every signed patch will be refused (unknown key)")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            problems.append("admin_token is shorter than 16 characters")
        for problem in problems:
            if not self.dev_mode:
                raise ValueError(f"unsafe outside dev mode: {problem} (set PATCHSERVE_DEV_MODE=1 to allow)")
            log.warning("dev mode: %s", problem)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file := os.environ.get(CONFIG_FILE_ENV):
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

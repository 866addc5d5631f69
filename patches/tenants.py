"""Tenant safety configuration: which patches each tenant gets, may select, and how it authenticates.

File format (YAML)::

    tenants:
      - id: acme
        default_stack: [refusal, pii@3]   # ordered; "name" means the newest loaded version
        allowed_patches: [refusal, pii]   # what X-Patch-Stack may select
        allow_unpatched: false            # may X-Patch-Stack: none serve the bare model?
        api_keys: ["sha256:<hex of the key>"]   # only hashes, never keys

Keys are stored as ``sha256:<hex>`` of the UTF-8 key (``patchserve hash-key`` prints one). This module
is pure data and validation; the server resolves requests against it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patches.errors import StackError, TenantConfigError
from patches.stack import PatchRef, parse_stack

_TENANT_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def hash_api_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class Tenant(BaseModel):
    """One tenant's safety configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=_TENANT_ID)]
    default_stack: list[str] = Field(default_factory=list)
    allowed_patches: list[str] = Field(default_factory=list)
    allow_unpatched: bool = False
    api_keys: list[str] = Field(default_factory=list)
    allowed_signers: list[str] | None = None

    @field_validator("api_keys")
    @classmethod
    def _keys_are_hashes(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not _KEY_HASH.fullmatch(key):
                raise ValueError("api_keys must be 'sha256:<64 hex>' hashes, never plain keys")
        return keys

    @field_validator("default_stack")
    @classmethod
    def _refs_parse(cls, stack: list[str]) -> list[str]:
        try:
            if stack:
                parse_stack(",".join(stack))  # same rules as X-Patch-Stack: no duplicates, depth limit
        except StackError as exc:
            raise ValueError(str(exc)) from exc
        return stack

    @model_validator(mode="after")
    def _default_stack_allowed(self) -> Tenant:
        for ref in self.default_refs:
            if ref.name not in self.allowed_patches:
                raise ValueError(f"default_stack patch {ref.name!r} is not in allowed_patches")
        return self

    @property
    def default_refs(self) -> list[PatchRef]:
        return [PatchRef.parse(item) for item in self.default_stack]


class TenantConfig(BaseModel):
    """The whole tenant file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[Tenant]

    @model_validator(mode="after")
    def _unique(self) -> TenantConfig:
        ids = [t.id for t in self.tenants]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate tenant ids: {', '.join(dupes)}")
        hashes = [k for t in self.tenants for k in t.api_keys]
        if len(hashes) != len(set(hashes)):
            raise ValueError("an API key hash is listed for more than one tenant")
        return self

    @property
    def uses_keys(self) -> bool:
        """True when any tenant has an API key: then keys, not ``X-Tenant-Id``, decide the tenant."""
        return any(t.api_keys for t in self.tenants)

    def get(self, tenant_id: str) -> Tenant | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)


def load_tenants(path: Path) -> TenantConfig:
    """Read and validate a tenant YAML file.

    Raises:
        TenantConfigError: Unreadable YAML or a schema violation, with the offending field.
    """
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TenantConfigError(f"cannot read tenant file {path.name}: {exc}") from exc
    try:
        return TenantConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TenantConfigError(f"invalid tenant file {path.name}: {where}: {first['msg']}") from exc

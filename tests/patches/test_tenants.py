"""Tenant configuration: loading, API-key hashing, and every refusal as TenantConfigError."""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from patches.errors import TenantConfigError
from patches.stack import MAX_STACK_DEPTH, PatchRef
from patches.tenants import hash_api_key, load_tenants

ACME_KEY = "sk-acme-secret"
GLOBEX_KEY = "sk-globex-secret"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def write_tenants(tmp_path: Path, *tenants: dict) -> Path:
    return write_yaml(tmp_path, yaml.safe_dump({"tenants": list(tenants)}))


def rejection(tmp_path: Path, *tenants: dict) -> str:
    """Load a tenant file expected to be refused; return the message after checking it leaks no path."""
    with pytest.raises(TenantConfigError) as info:
        load_tenants(write_tenants(tmp_path, *tenants))
    message = str(info.value)
    assert "tenants.yaml" in message
    assert str(tmp_path) not in message
    return message


class TestHashApiKey:
    def test_format_is_sha256_prefix_and_lowercase_hex(self):
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_api_key(ACME_KEY))

    def test_is_sha256_of_the_utf8_key(self):
        key = "clé-ünïcode"
        assert hash_api_key(key) == "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()

    def test_is_deterministic_and_distinguishes_keys(self):
        assert hash_api_key(ACME_KEY) == hash_api_key(ACME_KEY)
        assert hash_api_key(ACME_KEY) != hash_api_key(GLOBEX_KEY)


class TestValidFile:
    def test_loads_all_fields(self, tmp_path):
        path = write_yaml(
            tmp_path,
            f"""\
            tenants:
              - id: acme
                default_stack: [refusal, pii@3]   # ordered
                allowed_patches: [refusal, pii, tone]
                allow_unpatched: true
                api_keys: ["{hash_api_key(ACME_KEY)}"]
                allowed_signers: [ops]
              - id: globex.eu_1
            """,
        )
        config = load_tenants(path)
        acme, globex = config.tenants
        assert acme.id == "acme"
        assert acme.default_refs == [PatchRef("refusal"), PatchRef("pii", 3)]
        assert acme.allowed_patches == ["refusal", "pii", "tone"]
        assert acme.allow_unpatched is True
        assert acme.api_keys == [hash_api_key(ACME_KEY)]
        assert acme.allowed_signers == ["ops"]
        assert (globex.id, globex.default_refs, globex.allowed_patches) == ("globex.eu_1", [], [])
        assert (globex.allow_unpatched, globex.api_keys, globex.allowed_signers) == (False, [], None)
        assert config.get("acme") is acme
        assert config.get("initech") is None

    def test_uses_keys_when_any_tenant_has_a_key(self, tmp_path):
        config = load_tenants(write_tenants(tmp_path, {"id": "a"}, {"id": "b", "api_keys": [hash_api_key("k")]}))
        assert config.uses_keys is True

    def test_does_not_use_keys_when_no_tenant_has_one(self, tmp_path):
        config = load_tenants(write_tenants(tmp_path, {"id": "a"}, {"id": "b", "api_keys": []}))
        assert config.uses_keys is False

    def test_tenants_are_immutable(self, tmp_path):
        config = load_tenants(write_tenants(tmp_path, {"id": "a"}))
        with pytest.raises(ValueError, match="frozen"):
            config.tenants[0].allow_unpatched = True


class TestRejections:
    @pytest.mark.parametrize(
        "key",
        [ACME_KEY, "sha256:" + "a" * 63, "sha256:" + "A" * 64, "sha1:" + "a" * 40, hashlib.sha256(b"k").hexdigest()],
    )
    def test_plain_or_malformed_key_hash(self, tmp_path, key):
        message = rejection(tmp_path, {"id": "acme", "api_keys": [key]})
        assert "api_keys" in message
        assert key not in message  # a pasted plain key is never echoed into logs

    def test_default_stack_patch_not_allowed(self, tmp_path):
        message = rejection(
            tmp_path, {"id": "acme", "default_stack": ["refusal", "pii@2"], "allowed_patches": ["refusal"]}
        )
        assert "'pii'" in message
        assert "allowed_patches" in message

    @pytest.mark.parametrize("ref", ["Refusal", "refusal@x", "refusal@", ""])
    def test_default_stack_bad_reference(self, tmp_path, ref):
        message = rejection(tmp_path, {"id": "acme", "default_stack": [ref], "allowed_patches": ["refusal"]})
        assert "default_stack" in message

    def test_duplicate_tenant_ids(self, tmp_path):
        message = rejection(tmp_path, {"id": "acme"}, {"id": "globex"}, {"id": "acme"})
        assert "duplicate tenant ids: acme" in message

    def test_same_key_hash_on_two_tenants(self, tmp_path):
        shared = hash_api_key(ACME_KEY)
        message = rejection(tmp_path, {"id": "acme", "api_keys": [shared]}, {"id": "globex", "api_keys": [shared]})
        assert "more than one tenant" in message

    @pytest.mark.parametrize("tenant_id", ["", "-acme", ".acme", "ac me", "acme/eu", "a" * 65, 42])
    def test_bad_tenant_id(self, tmp_path, tenant_id):
        message = rejection(tmp_path, {"id": tenant_id})
        assert "tenants.0.id" in message

    def test_missing_tenant_id(self, tmp_path):
        assert "tenants.0.id" in rejection(tmp_path, {"allowed_patches": ["refusal"]})

    def test_unknown_tenant_field(self, tmp_path):
        message = rejection(tmp_path, {"id": "acme", "alowed_patches": ["refusal"]})
        assert "tenants.0.alowed_patches" in message

    def test_unknown_top_level_field(self, tmp_path):
        path = write_yaml(tmp_path, "tenants: []\nadmins: [root]\n")
        with pytest.raises(TenantConfigError, match="admins"):
            load_tenants(path)

    @pytest.mark.parametrize(
        "text",
        [
            "tenants: [\n  - id: acme\n",
            "tenants:\n  - id: acme\n   bad: indent\n",
            "tenants: !!python/object/apply:os.getcwd []\n",
        ],
        ids=["unclosed", "indent", "unsafe-tag"],
    )
    def test_invalid_yaml(self, tmp_path, text):
        with pytest.raises(TenantConfigError) as info:
            load_tenants(write_yaml(tmp_path, text))
        message = str(info.value)
        assert "cannot read tenant file tenants.yaml" in message
        assert str(tmp_path) not in message

    @pytest.mark.parametrize("text", ["", "- id: acme\n", "tenants: acme\n"], ids=["empty", "list", "scalar"])
    def test_wrong_document_shape(self, tmp_path, text):
        with pytest.raises(TenantConfigError, match="tenants"):
            load_tenants(write_yaml(tmp_path, text))

    def test_missing_file(self, tmp_path):
        with pytest.raises(TenantConfigError, match="absent.yaml"):
            load_tenants(tmp_path / "absent.yaml")

    @pytest.mark.parametrize(
        "stack",
        [["refusal", "refusal@2"], [f"p{i}" for i in range(MAX_STACK_DEPTH + 1)]],
        ids=["duplicate", "too-deep"],
    )
    def test_default_stack_obeys_the_stack_rules(self, tmp_path, stack):
        allowed = sorted({PatchRef.parse(s).name for s in stack})
        rejection(tmp_path, {"id": "acme", "default_stack": stack, "allowed_patches": allowed})

"""The ``patchserve`` CLI: keygen, sign, verify, inspect and diff (patch files and tenant files)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from patches.cli import app
from patches.fingerprint import fingerprint_model
from patches.format import PatchMetadata, content_digest, read_patch, save_patch
from patches.signing import key_id, load_public_key
from patches.tenants import hash_api_key
from tests.patches.test_fingerprint import make_model_dir

KEY_ID = r"ed25519:[0-9a-f]{32}"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner: CliRunner) -> Callable[..., object]:
    def run(*args: object, code: int = 0):
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    return run


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


@pytest.fixture
def make_patch(tmp_path: Path, model_dir: Path) -> Callable[..., Path]:
    """Write a patch file for the fake model (width 8); metadata fields can be overridden."""

    def make(
        file: str = "refusal.safetensors", *, rows: torch.Tensor | None = None, seed: int = 0, **meta: object
    ) -> Path:
        fields: dict[str, object] = {
            "name": "refusal",
            "version": 2,
            "base_model": fingerprint_model(model_dir),
            "description": "declines harmful requests",
            "created": "2025-01-02T03:04:05Z",
        }
        fields.update(meta)
        data = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed)) if rows is None else rows
        return save_patch(tmp_path / file, data, PatchMetadata(**fields))  # type: ignore[arg-type]

    return make


@pytest.fixture
def keys(tmp_path: Path, invoke) -> Path:
    """A key directory holding ``ops.key`` / ``ops.pub`` made by ``patchserve keygen``."""
    invoke("keygen", tmp_path / "keys", "--name", "ops")
    return tmp_path / "keys"


@pytest.fixture
def trust(tmp_path: Path, keys: Path) -> Path:
    """A trust directory with only the public key of ``keys``."""
    directory = tmp_path / "trust"
    directory.mkdir()
    (directory / "ops.pub").write_bytes((keys / "ops.pub").read_bytes())
    return directory


@pytest.fixture
def signed(make_patch, keys: Path, invoke) -> Path:
    path = make_patch()
    invoke("sign", path, "--key", keys / "ops.key")
    return path


def ops_id(keys: Path) -> str:
    return key_id(load_public_key(keys / "ops.pub"))


class TestKeygen:
    def test_writes_key_pair_and_prints_key_id(self, tmp_path, invoke):
        result = invoke("keygen", tmp_path / "k", "--name", "release-2025")
        private, public = tmp_path / "k" / "release-2025.key", tmp_path / "k" / "release-2025.pub"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert key_id(load_public_key(public)) in result.stdout
        assert "BEGIN" not in result.output

    def test_refuses_to_overwrite(self, keys, invoke):
        before = (keys / "ops.key").read_bytes()
        result = invoke("keygen", keys, "--name", "ops", code=2)
        assert "already exists" in result.stderr
        assert (keys / "ops.key").read_bytes() == before

    def test_name_is_required(self, tmp_path, invoke):
        invoke("keygen", tmp_path, code=2)


class TestSign:
    def test_signs_in_place_and_prints_ref_digest_signer(self, tmp_path, make_patch, keys, invoke):
        path = make_patch()
        result = invoke("sign", path, "--key", keys / "ops.key")
        meta, tensor, raw = read_patch(path.read_bytes())
        assert meta.signer == ops_id(keys) and meta.signature
        assert "refusal@2" in result.stdout
        assert content_digest(raw, tensor) in result.stdout
        assert ops_id(keys) in result.stdout
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left

    def test_out_leaves_the_input_untouched(self, tmp_path, make_patch, keys, invoke):
        path = make_patch()
        before = path.read_bytes()
        invoke("sign", path, "--key", keys / "ops.key", "--out", tmp_path / "signed.safetensors")
        assert path.read_bytes() == before
        assert read_patch((tmp_path / "signed.safetensors").read_bytes())[0].signer == ops_id(keys)

    def test_refuses_non_ed25519_key(self, tmp_path, make_patch, invoke):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = tmp_path / "ec.key"
        key.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path = make_patch()
        before = path.read_bytes()
        result = invoke("sign", path, "--key", key, code=2)
        assert "only Ed25519" in result.stderr
        assert path.read_bytes() == before

    def test_refuses_malformed_patch(self, tmp_path, keys, invoke):
        path = tmp_path / "junk.safetensors"
        path.write_bytes(b"\x01\x02")
        result = invoke("sign", path, "--key", keys / "ops.key", code=2)
        assert "[truncated]" in result.stderr
        assert path.read_bytes() == b"\x01\x02"


class TestVerify:
    def test_ok(self, signed, trust, model_dir, keys, invoke):
        result = invoke("verify", signed, "--trust", trust, "--model", model_dir)
        assert result.stdout.strip() == f"OK refusal@2 signed by {ops_id(keys)}"

    def test_unsigned(self, make_patch, trust, model_dir, invoke):
        result = invoke("verify", make_patch(), "--trust", trust, "--model", model_dir, code=1)
        assert result.stderr.startswith("[unsigned] ")
        assert "refusal@2" in result.stderr

    def test_bad_signature(self, signed, trust, model_dir, invoke):
        data = bytearray(signed.read_bytes())
        data[-1] ^= 0x01
        signed.write_bytes(bytes(data))
        result = invoke("verify", signed, "--trust", trust, "--model", model_dir, code=1)
        assert result.stderr.startswith("[bad_signature] ")

    def test_unknown_key(self, tmp_path, signed, model_dir, keys, invoke):
        invoke("keygen", tmp_path / "other", "--name", "other")
        (tmp_path / "other" / "other.key").unlink()
        result = invoke("verify", signed, "--trust", tmp_path / "other", "--model", model_dir, code=1)
        assert result.stderr.startswith("[unknown_key] ")
        assert ops_id(keys) in result.stderr

    def test_revoked_key(self, tmp_path, signed, trust, model_dir, keys, invoke):
        revoked = tmp_path / "revoked.yaml"
        revoked.write_text(yaml.safe_dump({"revoked_keys": [ops_id(keys)]}))
        result = invoke("verify", signed, "--trust", trust, "--revocations", revoked, "--model", model_dir, code=1)
        assert result.stderr.startswith("[revoked] ")

    def test_revoked_patch(self, tmp_path, signed, trust, model_dir, invoke):
        meta, tensor, raw = read_patch(signed.read_bytes())
        revoked = tmp_path / "revoked.yaml"
        revoked.write_text(yaml.safe_dump({"revoked_patches": [content_digest(raw, tensor)]}))
        result = invoke("verify", signed, "--trust", trust, "--revocations", revoked, "--model", model_dir, code=1)
        assert result.stderr.startswith("[revoked] ")

    def test_wrong_model(self, tmp_path, make_patch, keys, trust, model_dir, invoke):
        path = make_patch(base_model="sha256:" + "cd" * 32)
        invoke("sign", path, "--key", keys / "ops.key")
        result = invoke("verify", path, "--trust", trust, "--model", model_dir, code=1)
        assert result.stderr.startswith("[wrong_model] ")

    def test_unusable_inputs_exit_2(self, tmp_path, signed, trust, model_dir, invoke):
        invoke("verify", signed, "--trust", tmp_path / "missing", "--model", model_dir, code=2)
        invoke(
            "verify", signed, "--trust", trust, "--revocations", tmp_path / "nope.yaml", "--model", model_dir, code=2
        )
        bad = tmp_path / "bad.yaml"
        bad.write_text("revoked_keys: [ops]\n")
        result = invoke("verify", signed, "--trust", trust, "--revocations", bad, "--model", model_dir, code=2)
        assert "'ops'" in result.stderr
        invoke("verify", tmp_path / "nothing.safetensors", "--trust", trust, "--model", model_dir, code=2)


class TestInspect:
    def test_json_unsigned(self, make_patch, invoke):
        path = make_patch(rows=torch.tensor([[3.0, 4.0] + [0.0] * 6, [0.0] * 7 + [1.0]]))
        info = json.loads(invoke("inspect", path, "--json").stdout)
        meta, tensor, raw = read_patch(path.read_bytes())
        assert info["ref"] == "refusal@2" and info["name"] == "refusal" and info["version"] == 2
        assert info["description"] == "declines harmful requests"
        assert info["created"] == "2025-01-02T03:04:05Z"
        assert info["shape"] == [2, 8] and info["dtype"] == "float32"
        assert info["row_norm"] == {"min": 1.0, "mean": 3.0, "max": 5.0}
        assert info["norm"] == pytest.approx(26**0.5)
        assert info["content_digest"] == content_digest(raw, tensor)
        assert info["file_sha256"].startswith("sha256:") and info["file_sha256"] != info["content_digest"]
        assert (info["signer"], info["signed"]) == (None, False)

    def test_json_signed(self, signed, keys, invoke):
        info = json.loads(invoke("inspect", signed, "--json").stdout)
        assert (info["signer"], info["signed"]) == (ops_id(keys), True)

    def test_table(self, signed, make_patch, keys, invoke):
        out = invoke("inspect", signed).stdout
        for needle in ("refusal@2", "row L2 norm", "content digest", "file sha256", ops_id(keys), "float32"):
            assert needle in out
        assert "unsigned" in invoke("inspect", make_patch("plain.safetensors")).stdout

    def test_malformed_file(self, tmp_path, invoke):
        path = tmp_path / "x.safetensors"
        path.write_bytes(b"\xff" * 16)
        assert invoke("inspect", path, code=2).stderr.startswith("[")


class TestPatchDiff:
    def test_identical_exit_0(self, make_patch, invoke):
        a, b = make_patch("a.safetensors"), make_patch("b.safetensors")
        assert "identical" in invoke("diff", a, b).stdout

    def test_metadata_tensor_digest_and_signer_changes(self, make_patch, keys, invoke):
        a = make_patch("a.safetensors", seed=1)
        b = make_patch("b.safetensors", seed=2, version=3, description="declines more")
        invoke("sign", b, "--key", keys / "ops.key")
        lines = invoke("diff", a, b, code=1).stdout.splitlines()
        assert "version: 2 → 3" in lines
        assert 'description: "declines harmful requests" → "declines more"' in lines
        assert f"signer: unsigned → {ops_id(keys)}" in lines
        assert any(line.startswith("tensor values changed: max abs diff ") and "cosine" in line for line in lines)
        assert any(line.startswith("content digest: sha256:") for line in lines)
        assert not any(line.startswith(("name:", "shape:", "dtype:")) for line in lines)

    def test_json_has_tensor_stats(self, make_patch, invoke):
        rows = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
        a = make_patch("a.safetensors", rows=rows)
        b = make_patch("b.safetensors", rows=rows * 2)
        report = json.loads(invoke("diff", a, b, "--json", code=1).stdout)
        assert report["kind"] == "patch" and report["identical"] is False
        tensor = next(c for c in report["changes"] if c["field"] == "tensor")
        assert tensor["details"]["cosine"] == pytest.approx(1.0)
        assert tensor["details"]["min_row_cosine"] == pytest.approx(1.0)
        assert tensor["details"]["max_abs_diff"] == pytest.approx(rows.abs().max().item())
        assert {c["field"] for c in report["changes"]} == {"tensor", "content_digest"}

    def test_shape_and_dtype_change(self, make_patch, invoke):
        a = make_patch("a.safetensors")
        b = make_patch("b.safetensors", rows=torch.ones(3, 8, dtype=torch.bfloat16))
        out = invoke("diff", a, b, code=1).stdout
        assert "shape: [2, 8] → [3, 8]" in out
        assert "dtype: float32 → bfloat16" in out
        assert "tensor values changed" not in out

    def test_tampered_signature_is_reported(self, signed, tmp_path, invoke):
        from tests.patches.test_signing import edit_metadata

        tampered = tmp_path / "tampered.safetensors"
        tampered.write_bytes(edit_metadata(signed.read_bytes(), signature="AAAA"))
        out = invoke("diff", signed, tampered, code=1).stdout
        assert "signature changed" in out
        assert "content digest" not in out

    def test_patch_versus_tenant_file_exits_2(self, make_patch, tmp_path, invoke):
        tenants = tmp_path / "t.yaml"
        tenants.write_text("tenants: []\n")
        assert "cannot compare" in invoke("diff", make_patch(), tenants, code=2).stderr


def tenant_file(path: Path, *tenants: dict) -> Path:
    path.write_text(yaml.safe_dump({"tenants": list(tenants)}, sort_keys=False))
    return path


class TestTenantDiff:
    ACME = {
        "id": "acme",
        "default_stack": ["refusal@2"],
        "allowed_patches": ["refusal", "tone"],
        "allow_unpatched": False,
        "api_keys": [hash_api_key("k1")],
    }
    GLOBEX = {"id": "globex", "default_stack": [], "allowed_patches": ["refusal"]}

    def diff(self, tmp_path: Path, invoke, old: list[dict], new: list[dict], code: int = 1) -> list[str]:
        a = tenant_file(tmp_path / "old.yaml", *old)
        b = tenant_file(tmp_path / "new.yaml", *new)
        return invoke("diff", a, b, code=code).stdout.splitlines()[2:]  # after the ---/+++ lines

    def test_identical_exit_0(self, tmp_path, invoke):
        lines = self.diff(tmp_path, invoke, [self.ACME, self.GLOBEX], [self.ACME, self.GLOBEX], code=0)
        assert lines == ["identical tenant configurations"]

    def test_default_stack_change_in_the_documented_form(self, tmp_path, invoke):
        new = {**self.ACME, "default_stack": ["refusal@3", "pii"], "allowed_patches": ["refusal", "tone", "pii"]}
        lines = self.diff(tmp_path, invoke, [self.ACME], [new])
        assert lines == [
            "tenant acme: default stack refusal@2 → refusal@3,pii",
            "tenant acme: allowed patches added: pii",
        ]

    def test_stack_order_matters(self, tmp_path, invoke):
        old = {**self.ACME, "default_stack": ["refusal", "tone"]}
        new = {**self.ACME, "default_stack": ["tone", "refusal"]}
        assert self.diff(tmp_path, invoke, [old], [new]) == ["tenant acme: default stack refusal,tone → tone,refusal"]

    def test_allowed_patches_order_does_not_matter(self, tmp_path, invoke):
        new = {**self.ACME, "allowed_patches": ["tone", "refusal"]}
        self.diff(tmp_path, invoke, [self.ACME], [new], code=0)

    def test_added_and_removed_tenants(self, tmp_path, invoke):
        lines = self.diff(tmp_path, invoke, [self.ACME], [self.GLOBEX])
        assert lines[0] == "tenant acme: removed"
        assert lines[1].startswith("tenant globex: added with default stack (none), allowed patches refusal")
        assert "0 API keys" in lines[1] and "allowed signers any trusted key" in lines[1]

    def test_allowed_patches_removed_and_unpatched_and_signers(self, tmp_path, invoke):
        signer_a, signer_b = "ed25519:" + "a" * 32, "ed25519:" + "b" * 32
        old = {**self.ACME, "allowed_signers": [signer_a]}
        new = {**self.ACME, "allowed_patches": ["refusal"], "allow_unpatched": True, "allowed_signers": [signer_b]}
        assert self.diff(tmp_path, invoke, [old], [new]) == [
            "tenant acme: allowed patches removed: tone",
            "tenant acme: allow unpatched false → true",
            f"tenant acme: allowed signers added: {signer_b}",
            f"tenant acme: allowed signers removed: {signer_a}",
        ]

    def test_allowed_signers_from_any_to_a_list(self, tmp_path, invoke):
        signer = "ed25519:" + "a" * 32
        lines = self.diff(tmp_path, invoke, [self.ACME], [{**self.ACME, "allowed_signers": [signer]}])
        assert lines == [f"tenant acme: allowed signers any trusted key → {signer}"]

    def test_api_keys_are_counted_never_shown(self, tmp_path, invoke):
        new = {**self.ACME, "api_keys": [hash_api_key("k2"), hash_api_key("k3")]}
        lines = self.diff(tmp_path, invoke, [self.ACME], [new])
        assert lines == ["tenant acme: API keys 1 → 2 (2 added, 1 removed)"]
        rotated = {**self.ACME, "api_keys": [hash_api_key("k9")]}
        a = tenant_file(tmp_path / "a.yaml", self.ACME)
        b = tenant_file(tmp_path / "b.yaml", rotated)
        result = invoke("diff", a, b, "--json", code=1)
        report = json.loads(result.stdout)
        assert report["kind"] == "tenants" and report["identical"] is False
        assert [(c["field"], c["old"], c["new"]) for c in report["changes"]] == [("api_keys", 1, 1)]
        assert report["changes"][0]["text"] == "tenant acme: API keys 1 → 1 (1 added, 1 removed)"
        for key in ("k1", "k9"):
            assert hash_api_key(key) not in result.output
            assert hash_api_key(key).removeprefix("sha256:")[:16] not in result.output

    def test_patches_dir_names_what_each_stack_change_guards_against(self, tmp_path, invoke, make_patch):
        (tmp_path / "p").mkdir()
        make_patch("p/refusal-2.safetensors", version=2, domain="harmful-requests")
        make_patch("p/refusal-3.safetensors", version=3, domain="harmful-requests")
        make_patch("p/detox-1.safetensors", name="detox", version=1, domain="toxicity")
        (tmp_path / "p" / "junk.safetensors").write_bytes(b"not a patch")  # skipped, not an error
        family = {"id": "family", "default_stack": ["refusal", "detox"], "allowed_patches": ["refusal", "detox"]}
        new = {
            **self.ACME,
            "default_stack": ["refusal@3", "detox", "pii"],
            "allowed_patches": ["refusal", "detox", "pii"],
        }
        a = tenant_file(tmp_path / "old.yaml", self.ACME)
        b = tenant_file(tmp_path / "new.yaml", new, family)
        lines = invoke("diff", a, b, "--patches", tmp_path / "p", code=1).stdout.splitlines()[2:]
        assert lines[:2] == [
            "tenant acme: default stack refusal@2 → refusal@3,detox,pii",
            "tenant acme: default stack adds toxicity (detox@1); adds unknown (pii (not in the patch directory)); "
            "changes harmful-requests (refusal@2 → refusal@3)",
        ]
        assert lines[-1] == "tenant family: default stack adds harmful-requests (refusal@3); adds toxicity (detox@1)"
        without = invoke("diff", a, b, code=1).stdout
        assert "adds toxicity" not in without  # names only, without a patch directory
        assert "not a directory" in invoke("diff", a, b, "--patches", tmp_path / "nope", code=2).stderr

    def test_invalid_tenant_file_exits_2(self, tmp_path, invoke):
        a = tenant_file(tmp_path / "a.yaml", self.ACME)
        b = tmp_path / "b.yaml"
        b.write_text("tenants:\n  - id: acme\n    api_keys: [plain-key]\n")
        assert "invalid tenant file" in invoke("diff", a, b, code=2).stderr


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "patches.cli", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("keygen", "sign", "verify", "inspect", "diff", "hash-key", "prepare-model"):
        assert command in result.stdout

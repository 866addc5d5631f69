"""Detached OMS bundles (OpenSSF model signing) against the real ``model-signing`` package: its own CLI
accepts what ``patchserve sign --oms`` writes, and the verifier and registry accept a bundle from a trusted
EC key and refuse the same things as for embedded signatures."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from patches.cli import app
from patches.errors import PatchRejected, RejectReason
from patches.fingerprint import ModelSpec, fingerprint_model
from patches.format import PatchMetadata, content_digest, read_patch, save_patch
from patches.oms import (
    bundle_path,
    ec_key_id,
    generate_ec_keypair,
    load_trusted_key,
    patch_of_bundle,
    read_bundle,
    sign_bundle,
)
from patches.registry import PatchRegistry
from patches.signing import KEY_ID_RE, Verifier, key_id, sign_patch
from patches.trust import Revocations, TrustStore
from tests.patches.test_fingerprint import make_model_dir
from tests.patches.test_signing import edit_metadata, flip_tensor_byte


def model_signing(*args: object) -> subprocess.CompletedProcess[str]:
    """The package's own command line, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def oms_verify(patch: Path, public_key: Path, signature: Path | None = None) -> subprocess.CompletedProcess[str]:
    return model_signing(
        "verify", "key", "--signature", signature or bundle_path(patch), "--public_key", public_key, patch
    )


def rejection(verifier: Verifier, data: bytes, bundle: bytes, spec: ModelSpec, reason: RejectReason) -> str:
    with pytest.raises(PatchRejected) as info:
        verifier.verify(data, expect=spec, bundle=bundle)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """``ops`` (trusted) and ``rogue`` (not trusted) EC P-256 key pairs."""
    for name in ("ops", "rogue"):
        generate_ec_keypair(tmp_path / "keys", name)
    return tmp_path / "keys"


@pytest.fixture
def ops_id(keys: Path) -> str:
    return ec_key_id(load_trusted_key(keys / "ops.pub"))  # type: ignore[arg-type]


@pytest.fixture
def store(keys: Path) -> TrustStore:
    return TrustStore.load(keys / "ops.pub")


@pytest.fixture
def verifier(store: TrustStore) -> Verifier:
    return Verifier(store)


@pytest.fixture
def patch(write_patch) -> Path:
    """``refusal-v1.safetensors`` without an embedded signature (and no bundle yet)."""
    return write_patch("refusal", 1)


@pytest.fixture
def bundled(patch: Path, keys: Path) -> Path:
    """``patch`` with an OMS bundle by ``ops`` beside it."""
    sign_bundle(patch, keys / "ops.key")
    return patch


class TestKeys:
    def test_ec_keypair_files_and_key_id(self, keys: Path, ops_id: str) -> None:
        private = serialization.load_pem_private_key((keys / "ops.key").read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
        assert stat.S_IMODE((keys / "ops.key").stat().st_mode) == 0o600
        assert ops_id == "ecdsa:" + hashlib.sha256((keys / "ops.pub").read_bytes()).hexdigest()[:32]
        assert KEY_ID_RE.fullmatch(ops_id)
        assert ops_id != ec_key_id(load_trusted_key(keys / "rogue.pub"))  # type: ignore[arg-type]

    def test_key_id_is_the_hint_model_signing_writes(self, bundled: Path, ops_id: str) -> None:
        hint = json.loads(bundle_path(bundled).read_bytes())["verificationMaterial"]["publicKey"]["hint"]
        assert ops_id == "ecdsa:" + hint[:32]

    def test_trust_store_holds_both_kinds(self, tmp_path: Path, keys: Path, ops_id: str) -> None:
        ed = Ed25519PrivateKey.generate().public_key()
        (keys / "native.pub").write_bytes(
            ed.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        (keys / "rogue.pub").unlink()
        store = TrustStore.load(keys)
        assert store.key_ids == {ops_id, key_id(ed)}

    def test_unsupported_curve_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "k1.pub"
        path.write_bytes(
            ec.generate_private_key(ec.SECP256K1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        with pytest.raises(ValueError, match="neither an Ed25519 key nor an EC key on P-256"):
            TrustStore.load(path)

    def test_revocation_list_takes_ec_key_ids(self, tmp_path: Path, ops_id: str) -> None:
        path = tmp_path / "revoked.yaml"
        path.write_text(yaml.safe_dump({"revoked_keys": [ops_id]}))
        assert Revocations.load(path).is_key_revoked(ops_id)
        path.write_text(yaml.safe_dump({"revoked_keys": ["ecdsa:xyz"]}))
        with pytest.raises(ValueError, match="ecdsa:<32 hex>"):
            Revocations.load(path)


class TestModelSigningCli:
    """What patchserve writes, the package's own CLI verifies, and the other way round."""

    def test_sign_oms_bundle_verifies_with_model_signing(self, tmp_path: Path, patch: Path) -> None:
        runner = CliRunner()
        made = runner.invoke(app, ["keygen", str(tmp_path / "k"), "--name", "ops", "--ec"])
        assert made.exit_code == 0, made.output
        assert "key id  ecdsa:" in made.output
        before = patch.read_bytes()
        result = runner.invoke(app, ["sign", "--oms", "--key", str(tmp_path / "k" / "ops.key"), str(patch)])
        assert result.exit_code == 0, result.output
        assert f"bundle  {bundle_path(patch)}" in result.output
        assert patch.read_bytes() == before  # detached: the patch file is not touched
        meta, tensor, raw = read_patch(before)
        assert f"ref     {meta.ref}" in result.output and content_digest(raw, tensor) in result.output

        ok = oms_verify(patch, tmp_path / "k" / "ops.pub")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        patch.write_bytes(flip_tensor_byte(before))
        tampered = oms_verify(patch, tmp_path / "k" / "ops.pub")
        assert tampered.returncode != 0

    def test_bundle_from_model_signing_cli_is_accepted(self, patch: Path, keys: Path, verifier, spec, ops_id) -> None:
        signature = bundle_path(patch)
        made = model_signing("sign", "key", "--private_key", keys / "ops.key", "--signature", signature, patch)
        assert made.returncode == 0, made.stdout + made.stderr
        assert verifier.verify_file(patch, expect=spec).meta.signer == ops_id

    def test_sign_oms_refuses_other_keys_and_files(self, tmp_path: Path, patch: Path) -> None:
        runner = CliRunner()
        runner.invoke(app, ["keygen", str(tmp_path / "k"), "--name", "native"])
        result = runner.invoke(app, ["sign", "--oms", "--key", str(tmp_path / "k" / "native.key"), str(patch)])
        assert result.exit_code == 2 and "not an EC key" in result.output
        generate_ec_keypair(tmp_path / "k", "ops")
        notes = tmp_path / "notes.safetensors"
        notes.write_bytes(b"not a patch at all")
        result = runner.invoke(app, ["sign", "--oms", "--key", str(tmp_path / "k" / "ops.key"), str(notes)])
        assert result.exit_code == 2 and not bundle_path(notes).exists()

    def test_patchserve_verify_uses_the_bundle(self, tmp_path: Path, keys: Path) -> None:
        model = make_model_dir(tmp_path / "model")
        meta = PatchMetadata(
            name="refusal", version=2, base_model=fingerprint_model(model), created="2025-01-02T03:04:05Z"
        )
        patch = save_patch(tmp_path / "refusal.safetensors", torch.randn(2, 8), meta)
        trust = tmp_path / "trust"
        trust.mkdir()
        (trust / "ops.pub").write_bytes((keys / "ops.pub").read_bytes())
        runner = CliRunner()
        args = ["verify", str(patch), "--trust", str(trust), "--model", str(model)]
        unsigned = runner.invoke(app, args)
        assert unsigned.exit_code == 1 and "[unsigned]" in unsigned.output
        sign_bundle(patch, keys / "ops.key")
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "(OMS bundle)" in result.output and "ecdsa:" in result.output


class TestVerifier:
    def test_trusted_bundle_is_accepted_and_names_its_signer(self, bundled: Path, verifier, spec, ops_id) -> None:
        data = bundled.read_bytes()
        patch = verifier.verify(data, expect=spec, bundle=read_bundle(bundled))
        assert (patch.ref, patch.meta.signer, patch.meta.signature) == ("refusal@1", ops_id, None)
        assert verifier.verify_file(bundled, expect=spec).meta.signer == ops_id
        with pytest.raises(PatchRejected) as info:  # the bundle is what made it acceptable
            verifier.verify(data, expect=spec)
        assert info.value.reason == RejectReason.unsigned

    def test_any_embedded_signature_is_ignored_when_a_bundle_decides(self, patch: Path, keys, verifier, spec, ops_id):
        untrusted = sign_patch(patch.read_bytes(), Ed25519PrivateKey.generate())
        patch.write_bytes(untrusted)
        sign_bundle(patch, keys / "ops.key")
        assert verifier.verify_file(patch, expect=spec).meta.signer == ops_id
        with pytest.raises(PatchRejected) as info:
            verifier.verify(untrusted, expect=spec)
        assert info.value.reason == RejectReason.unknown_key

    def test_tampered_tensor_bytes_are_refused(self, bundled: Path, verifier, spec) -> None:
        tampered = flip_tensor_byte(bundled.read_bytes())
        rejection(verifier, tampered, read_bundle(bundled), spec, RejectReason.bad_signature)

    def test_tampered_metadata_is_refused(self, bundled: Path, verifier, spec) -> None:
        tampered = edit_metadata(bundled.read_bytes(), description="now harmless, promise")
        rejection(verifier, tampered, read_bundle(bundled), spec, RejectReason.bad_signature)

    def test_bundle_by_an_untrusted_ec_key_is_refused(self, patch: Path, keys: Path, verifier, spec) -> None:
        sign_bundle(patch, keys / "rogue.key")
        message = rejection(verifier, patch.read_bytes(), read_bundle(patch), spec, RejectReason.unknown_key)
        assert ec_key_id(load_trusted_key(keys / "rogue.pub")) in message  # type: ignore[arg-type]

    def test_revoked_key_is_refused(self, bundled: Path, store, spec, ops_id) -> None:
        verifier = Verifier(store, Revocations(keys=frozenset({ops_id})))
        rejection(verifier, bundled.read_bytes(), read_bundle(bundled), spec, RejectReason.revoked)

    def test_revoked_digest_is_refused(self, bundled: Path, store, spec) -> None:
        digest = Verifier(store).verify_file(bundled, expect=spec).digest
        verifier = Verifier(store, Revocations(patches=frozenset({digest})))
        rejection(verifier, bundled.read_bytes(), read_bundle(bundled), spec, RejectReason.revoked)

    def test_bundle_of_another_file_is_refused(self, write_patch, keys: Path, bundled: Path, verifier, spec) -> None:
        other = write_patch("refusal", 2)
        sign_bundle(other, keys / "ops.key")
        rejection(verifier, bundled.read_bytes(), read_bundle(other), spec, RejectReason.bad_signature)

    def test_bundle_that_signs_no_file_is_refused(self, patch: Path, keys: Path, verifier, spec) -> None:
        # A valid signature by a trusted key over an empty manifest (the file itself ignored) would verify
        # any file with model_signing alone: it must not stand for this one.
        signature = bundle_path(patch)
        made = model_signing(
            "sign", "key", "--private_key", keys / "ops.key", "--signature", signature, "--ignore-paths", patch, patch
        )
        assert made.returncode == 0, made.stdout + made.stderr
        assert oms_verify(patch, keys / "ops.pub").returncode == 0  # the package itself accepts it
        message = rejection(verifier, patch.read_bytes(), signature.read_bytes(), spec, RejectReason.bad_signature)
        assert "one resource" in message

    @pytest.mark.parametrize("edit", ["garbage", "no-hint", "bad-signature"])
    def test_malformed_bundles_are_refused(self, bundled: Path, verifier, spec, edit: str) -> None:
        bundle = json.loads(bundle_path(bundled).read_bytes())
        if edit == "garbage":
            raw = b"{not json"
        elif edit == "no-hint":
            del bundle["verificationMaterial"]["publicKey"]
            raw = json.dumps(bundle).encode()
        else:
            sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
            sig[-1] ^= 0x01
            bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
            raw = json.dumps(bundle).encode()
        rejection(verifier, bundled.read_bytes(), raw, spec, RejectReason.bad_signature)

    def test_embedded_signature_naming_an_ec_key_is_unknown(self, patch: Path, verifier, spec, ops_id) -> None:
        forged = edit_metadata(patch.read_bytes(), signer=ops_id, signature=base64.b64encode(b"\0" * 64).decode())
        with pytest.raises(PatchRejected) as info:  # EC keys vouch for bundles only, never for embedded signatures
            verifier.verify(forged, expect=spec)
        assert info.value.reason == RejectReason.unknown_key


class TestRegistry:
    @pytest.fixture
    def registry(self, verifier: Verifier, spec: ModelSpec) -> PatchRegistry:
        return PatchRegistry(partial(verifier.verify, expect=spec))

    def test_directory_load_uses_bundles_beside_files(self, registry, write_patch, keys, bundled, ops_id) -> None:
        tampered = write_patch("pii", 1)
        sign_bundle(tampered, keys / "ops.key")
        tampered.write_bytes(flip_tensor_byte(tampered.read_bytes()))
        write_patch("plain", 1)  # no bundle, no embedded signature

        loaded = registry.load_dir(bundled.parent)

        assert [(p.ref, p.meta.signer) for p in loaded] == [("refusal@1", ops_id)]
        assert [(r.source, r.reason) for r in registry.rejections()] == [
            ("pii-v1.safetensors", "bad_signature"),
            ("plain-v1.safetensors", "unsigned"),
        ]

    def test_adding_and_removing_the_bundle_changes_the_verdict(self, registry, patch: Path, keys) -> None:
        with pytest.raises(PatchRejected):
            registry.load_file(patch)
        sign_bundle(patch, keys / "ops.key")
        assert registry.load_file(patch).ref == "refusal@1"
        bundle_path(patch).unlink()
        with pytest.raises(PatchRejected) as info:
            registry.load_file(patch)
        assert info.value.reason == RejectReason.unsigned

    def test_bundle_symlink_out_of_the_directory_is_refused(self, registry, patch: Path, keys, tmp_path) -> None:
        outside = tmp_path / "elsewhere.sig"
        sign_bundle(patch, keys / "ops.key", outside)
        bundle_path(patch).symlink_to(outside)
        with pytest.raises(PatchRejected) as info:
            registry.load_file(patch)
        assert info.value.reason == RejectReason.not_a_file

    def test_bundle_names_map_to_their_patch(self, patch_dir: Path) -> None:
        assert patch_of_bundle(patch_dir / "a-v1.safetensors.sig") == patch_dir / "a-v1.safetensors"
        assert patch_of_bundle(patch_dir / "a-v1.safetensors") is None
        assert patch_of_bundle(patch_dir / "model.sig") is None

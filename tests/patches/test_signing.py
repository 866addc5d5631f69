"""Ed25519 patch signing: keys, sign/verify round trip, one test per rejection, trust store, revocations."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from patches.errors import PatchRejected, RejectReason, SignatureError
from patches.fingerprint import ModelSpec
from patches.format import PatchMetadata, dump_patch, parse_patch, read_patch
from patches.signing import (
    KEY_ID_RE,
    Verifier,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_patch,
    signed_message,
)
from patches.trust import Revocations, TrustStore
from tests.patches.conftest import FINGERPRINT, OTHER_FINGERPRINT

# A fixed key (RFC 8032 test 1 secret) so that key ids can be pinned.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors buffer as (header dict, tensor bytes)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def build(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def edit_metadata(data: bytes, **changes: str | None) -> bytes:
    """The same file with metadata fields changed (None deletes one); tensor bytes untouched."""
    header, payload = split(data)
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return build(header, payload)


def flip_tensor_byte(data: bytes, index: int = 0) -> bytes:
    """Flip the lowest bit of one byte of the tensor data (a tiny change of one value)."""
    header, payload = split(data)
    body = bytearray(payload)
    body[index] ^= 0x01
    return build(header, bytes(body))


def rejection(verifier: Verifier, data: bytes, spec: ModelSpec, reason: RejectReason) -> PatchRejected:
    with pytest.raises(PatchRejected) as info:
        verifier.verify(data, expect=spec)
    assert info.value.reason == reason, str(info.value)
    return info.value


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def kid(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())


@pytest.fixture
def store(key: Ed25519PrivateKey) -> TrustStore:
    return TrustStore.from_keys([key.public_key()])


@pytest.fixture
def verifier(store: TrustStore) -> Verifier:
    return Verifier(store)


@pytest.fixture
def unsigned(make_meta, make_rows) -> bytes:
    return dump_patch(make_rows(2), make_meta())


@pytest.fixture
def signed(unsigned: bytes, key: Ed25519PrivateKey) -> bytes:
    return sign_patch(unsigned, key)


@pytest.fixture
def make_signed(make_meta, make_rows, key) -> Callable[..., bytes]:
    def make(seed: int = 0, **meta: object) -> bytes:
        return sign_patch(dump_patch(make_rows(2, seed=seed), make_meta(**meta)), key)

    return make


class TestKeyId:
    def test_format_is_prefix_and_32_hex(self, key):
        assert KEY_ID_RE.fullmatch(key_id(key.public_key()))
        assert re.fullmatch(r"ed25519:[0-9a-f]{32}", key_id(key.public_key()))

    def test_is_sha256_prefix_of_raw_public_bytes(self):
        public = Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET).public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert raw == RFC8032_PUBLIC
        assert key_id(public) == "ed25519:" + hashlib.sha256(RFC8032_PUBLIC).hexdigest()[:32]

    def test_is_stable_across_save_and_reload(self, tmp_path):
        private_path, public_path = generate_keypair(tmp_path, "ops")
        first = key_id(load_public_key(public_path))
        assert key_id(load_private_key(private_path).public_key()) == first
        assert key_id(load_public_key(public_path)) == first
        assert key_id(Ed25519PublicKey.from_public_bytes(load_public_key(public_path).public_bytes_raw())) == first

    def test_differs_between_keys(self, key, other_key):
        assert key_id(key.public_key()) != key_id(other_key.public_key())


class TestKeyFiles:
    def test_generate_writes_pkcs8_private_0600_and_spki_public(self, tmp_path):
        private_path, public_path = generate_keypair(tmp_path / "keys", "ops-2025")
        assert (private_path.name, public_path.name) == ("ops-2025.key", "ops-2025.pub")
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
        assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
        assert isinstance(load_private_key(private_path), Ed25519PrivateKey)
        assert load_private_key(private_path).public_key() == load_public_key(public_path)

    def test_generate_refuses_to_overwrite(self, tmp_path):
        private_path, _ = generate_keypair(tmp_path, "ops")
        before = private_path.read_bytes()
        with pytest.raises(FileExistsError, match="ops.key"):
            generate_keypair(tmp_path, "ops")
        assert private_path.read_bytes() == before

    @pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65])
    def test_generate_refuses_non_plain_names(self, tmp_path, name):
        with pytest.raises(ValueError, match="invalid key name"):
            generate_keypair(tmp_path, name)

    @pytest.mark.parametrize(
        "make_key",
        [
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
            lambda: ec.generate_private_key(ec.SECP256R1()),
        ],
        ids=["rsa", "ec"],
    )
    def test_non_ed25519_keys_are_refused(self, tmp_path, make_key):
        private = make_key()
        private_path, public_path = tmp_path / "k.key", tmp_path / "k.pub"
        private_path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        public_path.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        with pytest.raises(ValueError, match="only Ed25519 keys are accepted"):
            load_private_key(private_path)
        with pytest.raises(ValueError, match="only Ed25519 keys are accepted"):
            load_public_key(public_path)
        if isinstance(private, ec.EllipticCurvePrivateKey):  # P-256 is an OMS key (tests/patches/test_oms.py)
            assert len(TrustStore.load(tmp_path)) == 1
        else:
            with pytest.raises(ValueError, match="neither an Ed25519 key nor an EC key"):
                TrustStore.load(tmp_path)

    def test_encrypted_private_key_is_refused(self, tmp_path, key):
        path = tmp_path / "enc.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            )
        )
        with pytest.raises(ValueError, match="encrypted"):
            load_private_key(path)

    def test_garbage_key_files_are_refused_without_content(self, tmp_path):
        path = tmp_path / "junk.pub"
        path.write_text("not a key at all")
        with pytest.raises(ValueError, match="junk.pub is not a PEM public key") as info:
            load_public_key(path)
        assert str(tmp_path) not in str(info.value)
        with pytest.raises(ValueError, match="not a PEM private key"):
            load_private_key(path)


class TestSign:
    def test_round_trip(self, verifier, signed, spec, kid, make_rows):
        patch = verifier.verify(signed, expect=spec)
        assert patch.ref == "refusal@3"
        assert patch.meta.signer == kid
        assert torch.equal(patch.rows, make_rows(2))
        assert patch.digest == parse_patch(signed, expect=spec).digest

    def test_embeds_signer_and_base64_signature_over_the_digest(self, signed, key, kid, spec):
        meta, _, raw = read_patch(signed)
        assert raw["signer"] == meta.signer == kid
        signature = base64.b64decode(raw["signature"], validate=True)
        assert len(signature) == 64
        digest = parse_patch(signed, expect=spec).digest
        key.public_key().verify(signature, b"patchserve.patch/v1\n" + digest.encode())
        assert signed_message(digest) == b"patchserve.patch/v1\n" + digest.encode()

    def test_keeps_every_field_and_the_tensor_dtype(self, make_meta, make_rows, key, spec):
        data = dump_patch(make_rows(3, dtype=torch.bfloat16), make_meta(description="a b c", domain="pii"))
        meta, tensor, _ = read_patch(sign_patch(data, key))
        original, original_tensor, _ = read_patch(data)
        assert dataclasses.replace(meta, signer=None, signature=None) == original
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original_tensor)

    def test_signature_is_deterministic(self, unsigned, key):
        """Ed25519 is deterministic; the file bytes are not (safetensors orders metadata freely)."""
        assert read_patch(sign_patch(unsigned, key))[0] == read_patch(sign_patch(unsigned, key))[0]

    def test_resigning_replaces_the_old_signature(self, signed, other_key, key, spec):
        resigned = sign_patch(signed, other_key)
        assert read_patch(resigned)[0].signer == key_id(other_key.public_key())
        assert Verifier(TrustStore.from_keys([other_key.public_key()])).verify(resigned, expect=spec)
        error = rejection(Verifier(TrustStore.from_keys([key.public_key()])), resigned, spec, RejectReason.unknown_key)
        assert key_id(other_key.public_key()) in str(error)

    def test_needs_no_model_but_refuses_malformed_files(self, make_meta, make_rows, key):
        wide = dump_patch(make_rows(2, width=32), make_meta(base_model=OTHER_FINGERPRINT))
        assert read_patch(sign_patch(wide, key))[1].shape == (2, 32)
        with pytest.raises(PatchRejected) as info:
            sign_patch(b"\x00" * 4, key)
        assert info.value.reason == RejectReason.truncated

    def test_refuses_non_ed25519_key(self, unsigned):
        with pytest.raises(TypeError):
            sign_patch(unsigned, ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


class TestRejections:
    def test_unsigned(self, verifier, unsigned, spec):
        error = rejection(verifier, unsigned, spec, RejectReason.unsigned)
        assert isinstance(error, SignatureError)
        assert "refusal@3" in str(error)

    def test_bad_signature_when_a_tensor_byte_flips(self, verifier, signed, spec, kid):
        for index in (0, 17, len(split(signed)[1]) - 1):
            error = rejection(verifier, flip_tensor_byte(signed, index), spec, RejectReason.bad_signature)
            assert isinstance(error, SignatureError)
            assert kid in str(error) and "refusal@3" in str(error)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("name", "refusal-lite"),
            ("version", "4"),
            ("base_model", OTHER_FINGERPRINT),
            ("domain", "pii"),
            ("description", "harmless, promise"),
            ("created", "2030-01-01T00:00:00Z"),
        ],
    )
    def test_bad_signature_when_a_metadata_field_changes(self, verifier, signed, spec, field, value):
        tampered = edit_metadata(signed, **{field: value})
        # A relabelled base model is checked against the model it now claims, so that only the signature fails.
        expect = dataclasses.replace(spec, fingerprint=value) if field == "base_model" else spec
        assert parse_patch(tampered, expect=expect)  # still a well-formed file for that model
        rejection(verifier, tampered, expect, RejectReason.bad_signature)

    def test_bad_signature_when_signer_is_relabelled_to_another_trusted_key(self, signed, key, other_key, spec):
        both = Verifier(TrustStore.from_keys([key.public_key(), other_key.public_key()]))
        tampered = edit_metadata(signed, signer=key_id(other_key.public_key()))
        rejection(both, tampered, spec, RejectReason.bad_signature)

    def test_bad_signature_when_signature_is_swapped_between_files(self, verifier, make_signed, spec):
        first, second = make_signed(seed=1, version=1), make_signed(seed=2, version=2)
        stolen = read_patch(second)[2]["signature"]
        rejection(verifier, edit_metadata(first, signature=stolen), spec, RejectReason.bad_signature)
        same_rows_other_version = make_signed(seed=1, version=2)
        stolen = read_patch(same_rows_other_version)[2]["signature"]
        rejection(verifier, edit_metadata(first, signature=stolen), spec, RejectReason.bad_signature)

    @pytest.mark.parametrize(
        "garbage",
        [
            "!!!not-base64!!!",
            "",
            base64.b64encode(b"\x00" * 63).decode(),
            base64.b64encode(b"\x00" * 65).decode(),
            base64.b64encode(b"\x00" * 64).decode()[:-2],
            "é" * 8,
        ],
        ids=["symbols", "empty", "63-bytes", "65-bytes", "unpadded", "non-ascii"],
    )
    def test_bad_signature_for_garbage_base64(self, verifier, signed, spec, garbage):
        error = rejection(verifier, edit_metadata(signed, signature=garbage), spec, RejectReason.bad_signature)
        assert isinstance(error, SignatureError)

    def test_bad_signature_for_zero_signature(self, verifier, signed, spec):
        zeros = base64.b64encode(b"\x00" * 64).decode()
        rejection(verifier, edit_metadata(signed, signature=zeros), spec, RejectReason.bad_signature)

    def test_bad_signature_when_signer_is_missing(self, verifier, signed, spec):
        rejection(verifier, edit_metadata(signed, signer=None), spec, RejectReason.bad_signature)

    def test_unknown_key(self, signed, other_key, spec, kid):
        error = rejection(
            Verifier(TrustStore.from_keys([other_key.public_key()])), signed, spec, RejectReason.unknown_key
        )
        assert isinstance(error, SignatureError)
        assert kid in str(error) and "refusal@3" in str(error)

    def test_unknown_key_with_empty_trust_store(self, signed, spec):
        rejection(Verifier(TrustStore()), signed, spec, RejectReason.unknown_key)

    def test_unknown_key_for_made_up_signer_is_shown_shortened(self, verifier, signed, spec):
        error = rejection(verifier, edit_metadata(signed, signer="x" * 500), spec, RejectReason.unknown_key)
        assert len(str(error)) < 200

    def test_revoked_key(self, store, signed, spec, kid):
        verifier = Verifier(store, Revocations(keys=frozenset({kid})))
        error = rejection(verifier, signed, spec, RejectReason.revoked)
        assert not isinstance(error, SignatureError)
        assert kid in str(error) and "refusal@3" in str(error)

    def test_revoked_key_wins_over_unknown_key(self, signed, spec, kid):
        rejection(Verifier(TrustStore(), Revocations(keys=frozenset({kid}))), signed, spec, RejectReason.revoked)

    def test_revoking_another_key_changes_nothing(self, store, signed, spec, other_key):
        revocations = Revocations(keys=frozenset({key_id(other_key.public_key())}))
        assert Verifier(store, revocations).verify(signed, expect=spec).ref == "refusal@3"

    def test_revoked_patch_hash(self, store, signed, spec, make_signed):
        digest = parse_patch(signed, expect=spec).digest
        verifier = Verifier(store, Revocations(patches=frozenset({digest})))
        error = rejection(verifier, signed, spec, RejectReason.revoked)
        assert digest in str(error) and "refusal@3" in str(error)
        assert verifier.verify(make_signed(version=4), expect=spec).ref == "refusal@4"  # other patches still load

    def test_revoked_patch_hash_also_applies_to_unsigned_files(self, store, unsigned, spec):
        digest = parse_patch(unsigned, expect=spec).digest
        verifier = Verifier(store, Revocations(patches=frozenset({digest})), allow_unsigned=True)
        rejection(verifier, unsigned, spec, RejectReason.revoked)

    def test_model_checks_run_before_signature_checks(self, verifier, make_meta, make_rows, key, spec):
        wrong_model = sign_patch(dump_patch(make_rows(2), make_meta(base_model=OTHER_FINGERPRINT)), key)
        rejection(verifier, wrong_model, spec, RejectReason.wrong_model)
        rejection(verifier, flip_tensor_byte(wrong_model), spec, RejectReason.wrong_model)
        rejection(verifier, b"garbage!", spec, RejectReason.bad_format)

    def test_messages_hold_no_path_or_key_material(self, tmp_path, verifier, signed, key, spec):
        public_raw = key.public_key().public_bytes_raw()
        path = tmp_path / "secret-dir" / "candidate.safetensors"
        path.parent.mkdir()
        for data in (signed, flip_tensor_byte(signed), edit_metadata(signed, signature=None)):
            path.write_bytes(data)
            try:
                verifier.verify_file(path, expect=spec)
                continue
            except PatchRejected as exc:
                message = str(exc)
            assert str(tmp_path) not in message and "candidate" not in message
            assert public_raw.hex() not in message and base64.b64encode(public_raw).decode() not in message
            assert read_patch(signed)[2]["signature"] not in message
            assert "BEGIN" not in message


class TestAllowUnsigned:
    def test_unsigned_file_is_accepted(self, store, unsigned, spec):
        patch = Verifier(store, allow_unsigned=True).verify(unsigned, expect=spec)
        assert (patch.ref, patch.meta.signer) == ("refusal@3", None)

    def test_signed_files_are_still_verified(self, store, signed, spec, kid):
        verifier = Verifier(store, allow_unsigned=True)
        assert verifier.verify(signed, expect=spec).meta.signer == kid
        rejection(verifier, flip_tensor_byte(signed), spec, RejectReason.bad_signature)
        rejection(Verifier(TrustStore(), allow_unsigned=True), signed, spec, RejectReason.unknown_key)

    def test_claimed_signer_without_signature_is_refused(self, store, signed, spec):
        stripped = edit_metadata(signed, signature=None)
        rejection(Verifier(store, allow_unsigned=True), stripped, spec, RejectReason.bad_signature)
        rejection(Verifier(store), stripped, spec, RejectReason.unsigned)


class TestVerifyFile:
    def test_reads_and_verifies(self, tmp_path, verifier, signed, spec):
        path = tmp_path / "p.safetensors"
        path.write_bytes(signed)
        assert verifier.verify_file(path, expect=spec).ref == "refusal@3"


class TestTrustStore:
    def test_loads_every_pub_file_by_key_id_not_file_name(self, tmp_path):
        _, first = generate_keypair(tmp_path / "gen", "one")
        _, second = generate_keypair(tmp_path / "gen", "two")
        trust = tmp_path / "trust"
        trust.mkdir()
        (trust / "whatever-name.pub").write_bytes(first.read_bytes())
        (trust / "two.pub").write_bytes(second.read_bytes())
        (trust / "notes.txt").write_text("ignored")
        (trust / "one.key").write_text("ignored too")
        store = TrustStore.load(trust)
        expected = {key_id(load_public_key(first)), key_id(load_public_key(second))}
        assert store.key_ids == expected
        assert len(store) == 2 and set(store) == expected
        assert all(k in store for k in expected)
        assert store.get(key_id(load_public_key(first))) == load_public_key(first)
        assert store.get("ed25519:" + "0" * 32) is None

    def test_single_file(self, tmp_path):
        _, public = generate_keypair(tmp_path, "one")
        assert TrustStore.load(public).key_ids == {key_id(load_public_key(public))}

    def test_empty_directory_is_an_empty_store(self, tmp_path):
        assert len(TrustStore.load(tmp_path)) == 0

    def test_missing_directory(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            TrustStore.load(tmp_path / "nope")

    def test_from_keys_refuses_other_types(self, key):
        with pytest.raises(TypeError):
            TrustStore.from_keys([key])  # type: ignore[list-item]


class TestRevocations:
    KEY = "ed25519:" + "0123456789abcdef" * 2
    DIGEST = "sha256:" + "ef" * 32

    def write(self, tmp_path: Path, text: str) -> Path:
        path = tmp_path / "revoked.yaml"
        path.write_text(text)
        return path

    def test_none_and_missing_file_are_empty(self, tmp_path):
        assert Revocations.load(None) == Revocations()
        assert Revocations.load(tmp_path / "missing.yaml") == Revocations()

    def test_empty_file_and_empty_lists(self, tmp_path):
        assert Revocations.load(self.write(tmp_path, "")) == Revocations()
        assert Revocations.load(self.write(tmp_path, "revoked_keys: []\nrevoked_patches:\n")) == Revocations()

    def test_loads_both_lists(self, tmp_path):
        path = self.write(tmp_path, f"revoked_keys: ['{self.KEY}']\nrevoked_patches: ['{self.DIGEST}']\n")
        revocations = Revocations.load(path)
        assert revocations.is_key_revoked(self.KEY) and revocations.is_patch_revoked(self.DIGEST)
        assert not revocations.is_key_revoked("ed25519:" + "f" * 32)
        assert not revocations.is_patch_revoked(FINGERPRINT)

    @pytest.mark.parametrize(
        ("text", "needle"),
        [
            ("revoked_keys: ['ops-key']", "'ops-key'"),
            ("revoked_keys: ['ed25519:ABCDEF0123456789ABCDEF0123456789']", "ABCDEF"),
            ("revoked_keys: ['ed25519:0123']", "ed25519:0123"),
            ("revoked_keys: [42]", "42"),
            ("revoked_patches: ['sha256:abc']", "sha256:abc"),
            (f"revoked_patches: ['{'ab' * 32}']", "ab" * 32),
            ("revoked_patches: 'sha256:" + "ab" * 32 + "'", "must be a list"),
            ("revoked_kyes: []", "revoked_kyes"),
            ("- just a list", "mapping"),
            ("revoked_keys: [", "not valid YAML"),
        ],
    )
    def test_invalid_entries_are_named(self, tmp_path, text, needle):
        with pytest.raises(ValueError) as info:
            Revocations.load(self.write(tmp_path, text))
        assert needle in str(info.value)
        assert "revoked.yaml" in str(info.value)
        assert str(tmp_path) not in str(info.value)


def test_patch_metadata_signer_fields_default_to_unsigned() -> None:
    meta = PatchMetadata(name="x", version=1, base_model=FINGERPRINT)
    assert "signer" not in meta.to_header() and "signature" not in meta.to_header()

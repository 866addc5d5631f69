"""Ed25519 signatures embedded in patch files, and the verifier that loads only trusted patches.

A signed file carries two extra metadata strings: ``signer`` (the key id, see :func:`key_id`) and
``signature`` (base64 of the 64-byte Ed25519 signature). The signed message is::

    b"patchserve.patch/v1\\n" + content_digest.encode()

where the content digest (:func:`patches.format.content_digest`) covers every metadata field except
``signature`` (so also ``signer``) and the tensor's dtype, shape and bytes: no field or value can be
changed, and no signature moved to another file, without detection.

Keys on disk: private keys are unencrypted PEM PKCS8 (mode 0600), public keys PEM
SubjectPublicKeyInfo. Only Ed25519 keys are accepted. Which keys are trusted and which keys or patches
are revoked is :mod:`patches.trust`'s business. A detached OMS bundle (EC keys, :mod:`patches.oms`) may
stand in for the embedded signature: :meth:`Verifier.verify` with ``bundle``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from patches.errors import PatchRejected, RejectReason, SignatureError
from patches.fingerprint import ModelSpec
from patches.format import FORMAT_V1, Patch, content_digest, dump_patch, parse_patch, read_patch

if TYPE_CHECKING:
    from patches.trust import Revocations, TrustStore

KEY_ID_PREFIX = "ed25519:"
# Ed25519 ids (this module) and EC ids (OMS bundles, :mod:`patches.oms`) share one form.
KEY_ID_RE = re.compile(r"(?:ed25519|ecdsa):[0-9a-f]{32}")
SIGNATURE_DOMAIN = FORMAT_V1.encode() + b"\n"
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SIGNATURE_BYTES = 64


def key_id(public_key: Ed25519PublicKey) -> str:
    """The stable id of a public key: ``ed25519:`` + the first 32 hex digits of SHA-256 of its raw bytes.

    Args:
        public_key: An Ed25519 public key.

    Returns:
        The key id, for example ``ed25519:3f2a…`` (32 hex digits).
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def signed_message(digest: str) -> bytes:
    """The exact bytes an Ed25519 signature covers for a patch with content digest ``digest``.

    Args:
        digest: The patch's ``sha256:<hex>`` content digest.

    Returns:
        ``b"patchserve.patch/v1\\n" + digest.encode()``.
    """
    return SIGNATURE_DOMAIN + digest.encode()


def generate_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Create a new Ed25519 key pair as ``<name>.key`` (PKCS8 PEM, mode 0600) and ``<name>.pub``.

    Args:
        out_dir: Directory to write into (created if missing).
        name: Base name of the two files: 1-64 of letters, digits, ``.``, ``_``, ``-``.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        ValueError: ``name`` is not a plain file name.
        FileExistsError: Either file already exists; nothing is overwritten.
    """
    return write_keypair(out_dir, name, Ed25519PrivateKey.generate())


def write_keypair(
    out_dir: Path, name: str, private_key: Ed25519PrivateKey | EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """Write ``private_key`` as ``<name>.key`` (unencrypted PKCS8 PEM, mode 0600) and its public key as
    ``<name>.pub`` (PEM SubjectPublicKeyInfo). :mod:`patches.oms` writes its EC keys with it.

    Raises:
        ValueError: ``name`` is not a plain file name.
        FileExistsError: Either file already exists; nothing is overwritten.
    """
    if not _KEY_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid key name {name!r}: use 1-64 of letters, digits, '.', '_', '-'")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path.name} already exists; refusing to overwrite a key")
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, private_pem)
    finally:
        os.close(fd)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM PKCS8 Ed25519 private key.

    Args:
        path: The key file.

    Returns:
        The private key.

    Raises:
        ValueError: The file is not an unencrypted PEM private key, or the key is not Ed25519.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError as exc:  # encrypted key and no password
        raise ValueError(f"private key {path.name} is encrypted; patchserve needs an unencrypted PKCS8 key") from exc
    except ValueError as exc:
        raise ValueError(f"{path.name} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"private key {path.name} is {_key_kind(key)}; only Ed25519 keys are accepted")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM SubjectPublicKeyInfo Ed25519 public key.

    Args:
        path: The key file.

    Returns:
        The public key.

    Raises:
        ValueError: The file is not a PEM public key, or the key is not Ed25519.
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path.name} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key {path.name} is {_key_kind(key)}; only Ed25519 keys are accepted")
    return key


def _key_kind(key: object) -> str:
    """A readable key type for error messages, for example ``an RSA key`` (never key material)."""
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
    return f"a {kind or 'unknown'} key"


def sign_patch(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """Sign a patch file: set ``signer`` to the key's id and ``signature`` over the content digest.

    Only format-level checks run (no model expectation). An older signature is replaced. Metadata
    fields outside format v1 are not carried over.

    Args:
        data: The patch file's bytes.
        private_key: The Ed25519 signing key.

    Returns:
        The signed file's bytes.

    Raises:
        PatchRejected: The input is not a well-formed format-v1 patch file.
        TypeError: ``private_key`` is not an Ed25519 private key.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError("only Ed25519 private keys can sign patches")
    meta, tensor, _ = read_patch(data)
    meta = replace(meta, signer=key_id(private_key.public_key()), signature=None)
    digest = content_digest(meta.to_header(), tensor)
    signature = base64.b64encode(private_key.sign(signed_message(digest))).decode("ascii")
    return dump_patch(tensor, replace(meta, signature=signature))


def _decode_signature(text: str) -> bytes | None:
    """The raw signature bytes, or None when ``text`` is not strict base64 of 64 bytes."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    return raw if len(raw) == _SIGNATURE_BYTES else None


def _shown(value: str, limit: int = 48) -> str:
    """An untrusted file value, quoted and shortened for a log or error message."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


class Verifier:
    """Loads patch files only when they are signed by a trusted, unrevoked key and not revoked themselves.

    Checks, after :func:`patches.format.parse_patch` (all model checks), in this order: the signer
    named in the file is revoked (``revoked``); the patch's content digest is revoked (``revoked``,
    also for unsigned files); the file carries no signature (``unsigned``, unless ``allow_unsigned``);
    the signer is not in the trust store (``unknown_key``); the signature is not valid base64 of 64
    bytes or does not match the content (``bad_signature``). Revocations come first because they are
    the operator's most specific statement about a file. A file verified with a detached OMS bundle
    goes through :func:`patches.oms.verify_bundle` instead, whose checks follow the same order.

    The ``trust_store`` and ``revocations`` attributes may be replaced while the verifier is in use
    (reference swap); each verification uses one snapshot of each.

    Args:
        trust_store: The trusted public keys.
        revocations: Revoked keys and patch digests (default: none).
        allow_unsigned: Accept files without a signature (development only). A file that has a
            signature is always verified; one that names a signer without a signature is refused.
    """

    def __init__(
        self,
        trust_store: TrustStore,
        revocations: Revocations | None = None,
        *,
        allow_unsigned: bool = False,
    ) -> None:
        self.trust_store = trust_store
        self.revocations = revocations
        self.allow_unsigned = allow_unsigned

    def verify(self, data: bytes, *, expect: ModelSpec, bundle: bytes | None = None) -> Patch:
        """Validate and verify patch bytes; return the patch or raise.

        Args:
            data: The patch file's bytes.
            expect: The served model the patch must match.
            bundle: A detached OMS bundle over ``data`` (:func:`patches.oms.verify_bundle`). When given,
                it alone decides: the file's own ``signer`` and ``signature`` fields are not looked at.

        Returns:
            The validated patch; ``patch.meta.signer`` is the verified key id (None only for an
            unsigned file accepted under ``allow_unsigned``).

        Raises:
            SignatureError: ``unsigned``, ``unknown_key`` or ``bad_signature``.
            PatchRejected: ``revoked``, or any format or model check of :func:`parse_patch`.
        """
        patch = parse_patch(data, expect=expect)
        revocations = self.revocations  # one snapshot: the list may be swapped while this runs
        if bundle is not None:
            from patches.oms import verify_bundle  # here: patches.oms builds on this module

            return verify_bundle(patch, data, bundle, self.trust_store, revocations)
        signer, signature = patch.meta.signer, patch.meta.signature
        if signer is not None and revocations is not None and revocations.is_key_revoked(signer):
            raise PatchRejected(RejectReason.revoked, f"patch {patch.ref} is signed by revoked key {signer}")
        if revocations is not None and revocations.is_patch_revoked(patch.digest):
            raise PatchRejected(RejectReason.revoked, f"patch {patch.ref} ({patch.digest}) is revoked")
        if signature is None:
            if not self.allow_unsigned:
                raise SignatureError(RejectReason.unsigned, f"patch {patch.ref} is unsigned")
            if signer is not None:
                raise SignatureError(
                    RejectReason.bad_signature, f"patch {patch.ref} names signer {_shown(signer)} but has no signature"
                )
            return patch
        if signer is None:
            raise SignatureError(RejectReason.bad_signature, f"patch {patch.ref} has a signature but no signer")
        public_key = self.trust_store.get(signer)  # read once
        if not isinstance(public_key, Ed25519PublicKey):  # None, or an EC key: those sign OMS bundles only
            raise SignatureError(
                RejectReason.unknown_key, f"patch {patch.ref} is signed by unknown key {_shown(signer)}"
            )
        raw = _decode_signature(signature)
        if raw is None:
            raise SignatureError(
                RejectReason.bad_signature, f"patch {patch.ref}: signature by {signer} is not base64 of 64 bytes"
            )
        try:
            public_key.verify(raw, signed_message(patch.digest))
        except InvalidSignature:
            raise SignatureError(
                RejectReason.bad_signature, f"patch {patch.ref}: signature by {signer} does not match its content"
            ) from None
        return patch

    def verify_file(self, path: Path, *, expect: ModelSpec) -> Patch:
        """Read ``path`` (and the OMS bundle beside it, if there is one) and :meth:`verify` it (messages
        never contain the path).

        Args:
            path: The patch file.
            expect: The served model the patch must match.

        Returns:
            The validated patch.

        Raises:
            SignatureError: See :meth:`verify`.
            PatchRejected: See :meth:`verify`.
            OSError: The file cannot be read.
        """
        from patches.oms import read_bundle  # here: patches.oms builds on this module

        return self.verify(path.read_bytes(), expect=expect, bundle=read_bundle(path))

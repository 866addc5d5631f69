"""Detached OMS signatures for patch files: the OpenSSF model-signing format, made and checked by the
``model-signing`` package itself.

An OMS signature is a Sigstore bundle (JSON): a DSSE envelope over an in-toto statement whose one
resource is the SHA-256 of the whole patch file, signed with an EC key on P-256, P-384 or P-521 (the
spec's key-based signing has no Ed25519). It sits beside its patch as ``<file>.sig``, for example
``refusal-v3.safetensors.sig``, so the package's own command line checks exactly what the server checks::

    model_signing verify key --signature refusal-v3.safetensors.sig --public_key ops.pub refusal-v3.safetensors

The bundle covers the file's bytes, not its name. EC key ids are ``ecdsa:`` + the first 32 hex digits
of SHA-256 of the PEM SubjectPublicKeyInfo. model_signing writes that hash into every bundle
(``verificationMaterial.publicKey.hint``), so a bundle names its key, and the same id goes into
revocation lists and tenants' ``allowed_signers``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from model_signing import signing as oms_signing
from model_signing import verifying as oms_verifying

from patches.errors import PatchRejected, RejectReason, SignatureError
from patches.format import Patch, read_patch, read_regular_file
from patches.signing import key_id, write_keypair

if TYPE_CHECKING:
    from patches.trust import Revocations, TrustedKey, TrustStore

BUNDLE_SUFFIX = ".sig"  # model_signing's own default name is model.sig
EC_KEY_ID_PREFIX = "ecdsa:"
MAX_BUNDLE_BYTES = 1024 * 1024  # a key-signed bundle of one file is about 2 KB
# The curves model_signing signs and verifies with (its _signing/sign_ec_key.py).
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
# One resource named "." is model_signing's manifest of a single file; anything else (notably an empty
# manifest, which a signer gets by ignoring the file itself) does not cover the patch.
_SINGLE_FILE = ["."]


def bundle_path(patch_path: Path) -> Path:
    """Where the OMS bundle of a patch file sits: ``<file>.sig`` beside it."""
    return patch_path.with_name(patch_path.name + BUNDLE_SUFFIX)


def patch_of_bundle(path: Path) -> Path | None:
    """The patch file ``path`` is the bundle of (``x.safetensors.sig`` → ``x.safetensors``), or None."""
    return path.with_name(path.name.removesuffix(BUNDLE_SUFFIX)) if path.name.endswith(".safetensors.sig") else None


def ec_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """``ecdsa:`` + the first 32 hex digits of SHA-256 of the key's PEM SubjectPublicKeyInfo.

    Raises:
        TypeError: Not an EC public key on P-256, P-384 or P-521.
    """
    if not _supported_ec(public_key):
        raise TypeError(f"OMS keys must be EC public keys on P-256, P-384 or P-521, got {type(public_key).__name__}")
    return EC_KEY_ID_PREFIX + _key_hint(public_key)[:32]


def trusted_key_id(public_key: TrustedKey) -> str:
    """The key id of a trust-store key: :func:`patches.signing.key_id` or :func:`ec_key_id`.

    Raises:
        TypeError: Neither an Ed25519 public key nor a supported EC public key.
    """
    if isinstance(public_key, Ed25519PublicKey):
        return key_id(public_key)
    if _supported_ec(public_key):
        return ec_key_id(public_key)
    raise TypeError(
        f"trust store keys must be Ed25519 or EC P-256/384/521 public keys, got {type(public_key).__name__}"
    )


def load_trusted_key(path: Path) -> TrustedKey:
    """Read a PEM public key of a trust store: Ed25519 (embedded signatures) or EC (OMS bundles).

    Raises:
        ValueError: Not a PEM public key, or another key type or curve (names the file only).
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path.name} is not a PEM public key") from exc
    if isinstance(key, Ed25519PublicKey) or _supported_ec(key):
        return key
    raise ValueError(f"public key {path.name} is neither an Ed25519 key nor an EC key on P-256, P-384 or P-521")


def generate_ec_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Create an EC P-256 key pair for OMS bundles as ``<name>.key`` (PKCS8 PEM, 0600) and ``<name>.pub``.

    Raises:
        ValueError: ``name`` is not a plain file name.
        FileExistsError: Either file already exists; nothing is overwritten.
    """
    return write_keypair(out_dir, name, ec.generate_private_key(ec.SECP256R1()))


def sign_bundle(patch_path: Path, private_key_path: Path, out: Path | None = None) -> tuple[Path, str]:
    """Sign a patch file with model_signing and an EC key: write the bundle to ``out`` (default
    ``<file>.sig``, through a hidden temporary file and a rename). The patch file is not changed.

    Returns:
        ``(bundle_path, signer_key_id)``.

    Raises:
        PatchRejected: ``patch_path`` is not a well-formed format-v1 patch file.
        ValueError: The key is not an unencrypted PEM EC private key on a supported curve, or the new
            bundle does not verify against the bytes checked (the file changed while it was signed).
        OSError: A file cannot be read or written.
    """
    data = read_regular_file(patch_path)
    read_patch(data)  # only patch files: format-level checks, no model expectation
    private_key = _load_ec_private_key(private_key_path)
    target = out or bundle_path(patch_path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        oms_signing.Config().use_elliptic_key_signer(private_key=private_key_path).sign(patch_path, tmp)
        try:
            _verify_with_library(data, tmp.read_bytes(), private_key.public_key())
        except Exception as exc:  # whatever the library raises, this bundle is not usable
            raise ValueError(f"the new bundle does not verify against {patch_path.name} (did it change?)") from exc
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, ec_key_id(private_key.public_key())


def read_bundle(patch_path: Path) -> bytes | None:
    """The OMS bundle beside a patch file, or None when there is none.

    Raises:
        PatchRejected: ``not_a_file`` or ``oversized`` (see :func:`patches.format.read_regular_file`).
        OSError: It exists but cannot be read.
    """
    try:
        return read_regular_file(bundle_path(patch_path), max_bytes=MAX_BUNDLE_BYTES)
    except FileNotFoundError:
        return None


def verify_bundle(
    patch: Patch, data: bytes, bundle: bytes, trust_store: TrustStore, revocations: Revocations | None
) -> Patch:
    """Verify a detached OMS bundle over a patch file's bytes (already parsed as ``patch``).

    Checks, in the order of :class:`patches.signing.Verifier`: the patch's content digest is revoked
    (``revoked``); the bundle names no key (``bad_signature``); its key is revoked (``revoked``) or not
    a trusted EC key (``unknown_key``); model_signing's key verifier refuses the bundle for this file,
    or the signed manifest is not this one file (``bad_signature``). The file's own ``signer`` and
    ``signature`` fields play no part.

    Returns:
        ``patch`` with ``meta.signer`` set to the verified EC key id (and no embedded signature).

    Raises:
        SignatureError: ``bad_signature`` or ``unknown_key``.
        PatchRejected: ``revoked``.
    """
    if revocations is not None and revocations.is_patch_revoked(patch.digest):
        raise PatchRejected(RejectReason.revoked, f"patch {patch.ref} ({patch.digest}) is revoked")
    hint = _bundle_hint(bundle)
    if hint is None:
        raise SignatureError(RejectReason.bad_signature, f"patch {patch.ref}: OMS bundle is malformed or names no key")
    kid = EC_KEY_ID_PREFIX + hint[:32]
    if revocations is not None and revocations.is_key_revoked(kid):
        raise PatchRejected(RejectReason.revoked, f"patch {patch.ref} is signed by revoked key {kid}")
    public_key = trust_store.get(kid)  # read once
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError(RejectReason.unknown_key, f"patch {patch.ref}: OMS bundle is signed by unknown key {kid}")
    try:
        _verify_with_library(data, bundle, public_key)
    except Exception as exc:  # ValueError, InvalidSignature or a parse error: all refusals
        raise SignatureError(
            RejectReason.bad_signature,
            f"patch {patch.ref}: OMS bundle by {kid} does not verify for this file ({type(exc).__name__})",
        ) from exc
    if _signed_resources(bundle) != _SINGLE_FILE:
        raise SignatureError(
            RejectReason.bad_signature, f"patch {patch.ref}: OMS bundle by {kid} does not sign the file as one resource"
        )
    return replace(patch, meta=replace(patch.meta, signer=kid, signature=None))


def _verify_with_library(data: bytes, bundle: bytes, public_key: ec.EllipticCurvePublicKey) -> None:
    """model_signing's own check of ``bundle`` over ``data``: it verifies paths, so it gets private
    copies of exactly the bytes that were read (never the live files, which may change meanwhile)."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory(prefix="patchserve-oms-") as tmp:
        root = Path(tmp)
        for name, content in (("patch.safetensors", data), ("key.pub", pem), ("patch.sig", bundle)):
            (root / name).write_bytes(content)
        config = oms_verifying.Config().use_elliptic_key_verifier(public_key=root / "key.pub")
        config.verify(root / "patch.safetensors", root / "patch.sig")


def _supported_ec(key: object) -> TypeGuard[ec.EllipticCurvePublicKey]:
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES


def _key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The public-key hint model_signing puts into a bundle: SHA-256 hex of the PEM SubjectPublicKeyInfo."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _bundle_hint(bundle: bytes) -> str | None:
    """The bundle's public-key hint (not authenticated: it only picks the key to verify with), or None."""
    try:
        hint = json.loads(bundle)["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, KeyError, TypeError):
        return None
    ok = isinstance(hint, str) and len(hint) == 64 and all(c in "0123456789abcdef" for c in hint)
    return hint if ok else None


def _signed_resources(bundle: bytes) -> list[str] | None:
    """Names of the resources in the bundle's signed statement (call only after it verified), or None."""
    try:
        statement = json.loads(base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"]))
        return [resource["name"] for resource in statement["predicate"]["resources"]]
    except (ValueError, KeyError, TypeError):
        return None


def _load_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key on a curve model_signing supports.

    Raises:
        ValueError: Not such a key (names the file only).
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError as exc:  # encrypted key and no password
        raise ValueError(f"private key {path.name} is encrypted; patchserve needs an unencrypted PKCS8 key") from exc
    except ValueError as exc:
        raise ValueError(f"{path.name} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _CURVES:
        raise ValueError(f"private key {path.name} is not an EC key on P-256, P-384 or P-521 (OMS bundles need one)")
    return key

"""Which signing keys are trusted, and which keys and patches are revoked.

Trust store: a directory of ``*.pub`` files (PEM SubjectPublicKeyInfo): Ed25519 keys for embedded
signatures, EC P-256/384/521 keys for detached OMS bundles (:mod:`patches.oms`). A key is known by its
key id (:func:`patches.oms.trusted_key_id`: ``ed25519:…`` or ``ecdsa:…``), computed from the key itself;
file names do not matter.

Revocation list (YAML)::

    revoked_keys: ["ed25519:<32 hex>", "ecdsa:<32 hex>"]  # every patch signed by these keys is refused
    revoked_patches: ["sha256:<64 hex>"]         # content digests of individual patches
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import yaml
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from patches.oms import load_trusted_key, trusted_key_id
from patches.signing import KEY_ID_RE

TrustedKey = Ed25519PublicKey | EllipticCurvePublicKey

PATCH_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_REVOCATION_FIELDS = {"revoked_keys": KEY_ID_RE, "revoked_patches": PATCH_DIGEST_RE}


class TrustStore:
    """The trusted public keys (Ed25519 and EC), by key id. Immutable; an empty store trusts nothing.

    Args:
        keys: Key id to public key.
    """

    def __init__(self, keys: Mapping[str, TrustedKey] | None = None) -> None:
        self._keys: Mapping[str, TrustedKey] = MappingProxyType(dict(keys or {}))

    @classmethod
    def from_keys(cls, keys: Iterable[TrustedKey]) -> TrustStore:
        """A trust store holding ``keys`` (ids computed from the keys).

        Args:
            keys: Ed25519 public keys, or EC public keys on P-256, P-384 or P-521.

        Returns:
            The trust store.

        Raises:
            TypeError: A key is of another type or curve.
        """
        return cls({trusted_key_id(key): key for key in keys})

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        """Load every ``*.pub`` file of a directory (or one ``.pub`` file).

        Args:
            path: The trust directory, or a single public key file.

        Returns:
            The trust store (possibly empty when the directory has no ``*.pub`` file).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: A ``*.pub`` file is not a PEM Ed25519 or supported EC public key (names the file).
        """
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"trust store {path.name!r} does not exist")
        return cls.from_keys(load_trusted_key(file) for file in files)

    def get(self, kid: str) -> TrustedKey | None:
        """The trusted public key with id ``kid``, or None.

        Args:
            kid: A key id.

        Returns:
            The key, or None when it is not trusted.
        """
        return self._keys.get(kid)

    @property
    def key_ids(self) -> frozenset[str]:
        """Ids of every trusted key."""
        return frozenset(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Revocations:
    """Revoked signing keys (key ids) and revoked patches (content digests).

    Attributes:
        keys: Revoked key ids, ``ed25519:<32 hex>`` or ``ecdsa:<32 hex>``.
        patches: Revoked content digests, ``sha256:<64 hex>``.
    """

    keys: frozenset[str] = field(default_factory=frozenset)
    patches: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_dict(cls, raw: object) -> Revocations:
        """Validate a parsed revocation document.

        Args:
            raw: ``{"revoked_keys": [...], "revoked_patches": [...]}``; either list may be absent.

        Returns:
            The revocations.

        Raises:
            ValueError: Not a mapping, an unknown field, a field that is not a list, or an entry of
                the wrong form (the message names the entry).
        """
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("revocation list must be a mapping with revoked_keys and revoked_patches")
        unknown = sorted(str(k) for k in raw if k not in _REVOCATION_FIELDS)
        if unknown:
            raise ValueError(f"unknown revocation field(s): {', '.join(unknown)}")
        parsed: dict[str, frozenset[str]] = {}
        for name, pattern in _REVOCATION_FIELDS.items():
            entries = raw.get(name)
            if entries is None:
                entries = []
            if not isinstance(entries, list):
                raise ValueError(f"{name} must be a list, got {type(entries).__name__}")
            for entry in entries:
                if not isinstance(entry, str) or not pattern.fullmatch(entry):
                    expected = "ed25519:<32 hex> or ecdsa:<32 hex>" if name == "revoked_keys" else "sha256:<64 hex>"
                    raise ValueError(f"invalid {name} entry {entry!r}: expected {expected}")
            parsed[name] = frozenset(entries)
        return cls(keys=parsed["revoked_keys"], patches=parsed["revoked_patches"])

    @classmethod
    def load(cls, path: Path | None) -> Revocations:
        """Read a revocation YAML file; None or a missing file means nothing is revoked.

        Args:
            path: The YAML file, or None.

        Returns:
            The revocations.

        Raises:
            ValueError: Unparsable YAML or an invalid entry (see :meth:`from_dict`).
        """
        if path is None or not path.exists():
            return cls()
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"revocation list {path.name} is not valid YAML") from exc
        try:
            return cls.from_dict(raw)
        except ValueError as exc:
            raise ValueError(f"revocation list {path.name}: {exc}") from exc

    def is_key_revoked(self, kid: str) -> bool:
        """Whether key id ``kid`` is revoked.

        Args:
            kid: A key id.

        Returns:
            True when revoked.
        """
        return kid in self.keys

    def is_patch_revoked(self, digest: str) -> bool:
        """Whether the patch with content digest ``digest`` is revoked.

        Args:
            digest: ``sha256:<hex>`` content digest.

        Returns:
            True when revoked.
        """
        return digest in self.patches

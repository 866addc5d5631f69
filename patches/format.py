"""Patch file format v1: one safetensors file, one 2-D tensor, string metadata.

Layout:
    tensor ``patch``: shape ``[n_virtual_tokens, hidden_size]``, dtype float32, bfloat16 or float16.
    metadata (all strings): ``format`` (``patchserve.patch/v1``), ``name``, ``version`` (decimal
    integer), ``base_model`` (model fingerprint), ``domain``, ``description``, ``created`` (ISO 8601
    UTC), and optionally ``placement`` (``prefix``, the default when absent, or ``suffix``; see
    :mod:`patches.stack`). Signing (see :mod:`patches.signing`) adds ``signer`` and ``signature``.

The *content digest* covers the canonical metadata (every field but ``signature``) and the tensor's
dtype, shape and bytes; it names a patch independently of how the file was serialised and is what
signatures cover and revocation lists name.

Checks in :func:`parse_patch` run in a fixed order before anything reaches the model: size,
safetensors framing (never pickle), metadata (name, version, format), tensor key, dtype, rank and
shape, model fingerprint, finite values before and after the cast to the model's dtype, no all-zero row. Which files
are read at all (the patch directory, never a path from a request) is the registry's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from patches.errors import PatchRejected, RejectReason
from patches.fingerprint import ModelSpec
from patches.stack import Placement

FORMAT_V1 = "patchserve.patch/v1"
TENSOR_KEY = "patch"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ALLOWED_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
REQUIRED_FIELDS = ("format", "name", "version", "base_model", "domain", "description", "created")
SIGNATURE_FIELD = "signature"
_MAX_HEADER = 64 * 1024
MAX_FILE_BYTES = 64 * 1024 * 1024  # read or upload no more than this before parsing, whatever the model


@dataclass(frozen=True)
class PatchMetadata:
    """The string metadata of a patch file (format v1)."""

    name: str
    version: int
    base_model: str
    domain: str = "safety"
    description: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    placement: Placement = Placement.prefix
    signer: str | None = None
    signature: str | None = None

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def to_header(self) -> dict[str, str]:
        header = {
            "format": FORMAT_V1,
            "name": self.name,
            "version": str(self.version),
            "base_model": self.base_model,
            "domain": self.domain,
            "description": self.description,
            "created": self.created,
        }
        if self.placement != Placement.prefix:  # absent means prefix: files from before placements stay valid
            header["placement"] = self.placement.value
        if self.signer is not None:
            header["signer"] = self.signer
        if self.signature is not None:
            header[SIGNATURE_FIELD] = self.signature
        return header


@dataclass(frozen=True)
class Patch:
    """A validated patch: float32 rows on CPU plus metadata.

    Attributes:
        meta: The file's metadata.
        rows: Tensor of shape ``[n_virtual_tokens, hidden_size]``, float32, no grad.
        digest: ``sha256:<hex>`` content digest (see module docstring).
    """

    meta: PatchMetadata
    rows: torch.Tensor
    digest: str

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> int:
        return self.meta.version

    @property
    def ref(self) -> str:
        return self.meta.ref

    @property
    def n_tokens(self) -> int:
        return int(self.rows.shape[0])

    @property
    def placement(self) -> Placement:
        return self.meta.placement


def content_digest(header: dict[str, str], tensor: torch.Tensor) -> str:
    """SHA-256 over canonical metadata (without ``signature``) and the tensor's dtype, shape and bytes."""
    canonical = {k: v for k, v in header.items() if k != SIGNATURE_FIELD}
    digest = hashlib.sha256()
    digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    digest.update(ALLOWED_DTYPES.get(tensor.dtype, str(tensor.dtype)).encode())
    digest.update(json.dumps(list(tensor.shape)).encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid patch name, else raise ``PatchRejected(bad_name)``.

    ``none`` is reserved: ``X-Patch-Stack: none`` means the bare model.
    """
    if name == "none":
        raise PatchRejected(RejectReason.bad_name, "'none' is reserved (X-Patch-Stack: none means no patches)")
    if not NAME_RE.fullmatch(name):
        raise PatchRejected(
            RejectReason.bad_name,
            f"invalid patch name {name!r}: use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    return name


def dump_patch(rows: torch.Tensor, meta: PatchMetadata) -> bytes:
    """Serialise a patch to format-v1 bytes."""
    check_name(meta.name)
    return st_save({TENSOR_KEY: rows.detach().contiguous().cpu()}, metadata=meta.to_header())


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` through a hidden temporary file and a rename, so no reader or watcher sees half a file.
    The temporary name is unique per writer, so replicas writing the same file on a shared volume never
    trip over each other's half-written copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_regular_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``, checked on the open
    descriptor (a FIFO or device is never read, so it cannot block the reader). A symlink is followed
    only to a file inside the same directory tree (a Kubernetes ConfigMap mount links ``x`` to
    ``..data/x``), never out of it.

    Raises:
        PatchRejected: ``not_a_file`` or ``oversized``.
        OSError: The file cannot be opened or read.
    """
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise PatchRejected(RejectReason.not_a_file, f"{path.name} is a symlink out of its directory")
        path = target
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PatchRejected(RejectReason.not_a_file, f"{path.name} is not a regular file")
        if info.st_size > max_bytes:
            raise PatchRejected(RejectReason.oversized, f"{path.name} has {info.st_size} bytes; limit {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PatchRejected(RejectReason.oversized, f"{path.name} grew past {max_bytes} bytes while being read")
    return data


def save_patch(path: Path, rows: torch.Tensor, meta: PatchMetadata) -> Path:
    """Write a patch file atomically and return its path."""
    return write_atomic(path, dump_patch(rows, meta))


def _read_header(data: bytes) -> dict[str, object]:
    if len(data) < 8:
        raise PatchRejected(RejectReason.truncated, "patch file is truncated: no safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER:
        raise PatchRejected(RejectReason.bad_format, f"safetensors header of {size} bytes exceeds {_MAX_HEADER}")
    if 8 + size > len(data):
        raise PatchRejected(RejectReason.truncated, "patch file is truncated inside its header")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise PatchRejected(RejectReason.bad_format, "patch header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise PatchRejected(RejectReason.bad_format, "patch header is not a JSON object")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise PatchRejected(RejectReason.bad_format, f"tensor {key!r} has malformed data_offsets")
        if 8 + size + offsets[1] > len(data):
            raise PatchRejected(RejectReason.truncated, f"patch file is truncated inside tensor {key!r}")
    return header


def _parse_metadata(raw: object) -> PatchMetadata:
    if not isinstance(raw, dict):
        raise PatchRejected(RejectReason.bad_format, "patch file has no metadata")
    missing = [f for f in REQUIRED_FIELDS if not isinstance(raw.get(f), str)]
    if missing:
        raise PatchRejected(RejectReason.bad_format, f"patch metadata is missing {', '.join(missing)}")
    if raw["format"] != FORMAT_V1:
        raise PatchRejected(
            RejectReason.bad_format, f"unsupported patch format {raw['format']!r}; expected {FORMAT_V1}"
        )
    name = check_name(raw["name"])
    if not re.fullmatch(r"[0-9]{1,9}", raw["version"]) or int(raw["version"]) < 1:
        raise PatchRejected(
            RejectReason.bad_format, f"patch version must be a positive integer, got {raw['version']!r}"
        )
    placement = raw.get("placement", Placement.prefix.value)
    if placement not in {p.value for p in Placement}:
        raise PatchRejected(
            RejectReason.bad_format, f"patch placement must be one of {[p.value for p in Placement]}, got {placement!r}"
        )
    return PatchMetadata(
        name=name,
        version=int(raw["version"]),
        base_model=raw["base_model"],
        domain=raw["domain"],
        description=raw["description"],
        created=raw["created"],
        placement=Placement(placement),
        signer=raw.get("signer"),
        signature=raw.get(SIGNATURE_FIELD),
    )


def read_patch(data: bytes) -> tuple[PatchMetadata, torch.Tensor, dict[str, str]]:
    """Format-level parse of v1 bytes, without any expectation about the model.

    Runs the safetensors framing, metadata, tensor key, dtype and rank checks of :func:`parse_patch`
    (not size, row count, width, fingerprint or finiteness): for tools that sign or inspect files.

    Args:
        data: The raw file bytes.

    Returns:
        The parsed metadata, the 2-D tensor in its stored dtype, and the raw metadata dict (what
        :func:`content_digest` takes).

    Raises:
        PatchRejected: With the :class:`RejectReason` of the first failed check.
    """
    header = _read_header(data)
    meta = _parse_metadata(header.get("__metadata__"))
    keys = [k for k in header if k != "__metadata__"]
    if keys != [TENSOR_KEY]:
        raise PatchRejected(
            RejectReason.bad_format, f"patch file must hold exactly one tensor {TENSOR_KEY!r}, found {keys}"
        )
    try:
        tensor = st_load(data)[TENSOR_KEY]
    except Exception as exc:  # safetensors raises its own error types for malformed buffers
        raise PatchRejected(RejectReason.bad_format, f"patch tensor cannot be decoded: {type(exc).__name__}") from exc
    if tensor.dtype not in ALLOWED_DTYPES:
        raise PatchRejected(
            RejectReason.bad_dtype, f"patch dtype {tensor.dtype} not allowed; use float32, bfloat16 or float16"
        )
    if tensor.ndim != 2:
        raise PatchRejected(RejectReason.bad_shape, f"patch tensor must be 2-D, got shape {list(tensor.shape)}")
    return meta, tensor, header["__metadata__"]  # type: ignore[return-value]


def parse_patch(data: bytes, *, expect: ModelSpec) -> Patch:
    """Validate format-v1 bytes against the served model and return the patch.

    Raises:
        PatchRejected: With the :class:`RejectReason` of the first failed check.
    """
    max_bytes = expect.max_rows * expect.hidden_size * 4 + _MAX_HEADER + 8
    if len(data) > max_bytes:
        raise PatchRejected(RejectReason.oversized, f"patch file of {len(data)} bytes exceeds the limit of {max_bytes}")
    meta, tensor, raw_meta = read_patch(data)
    rows, width = tensor.shape
    if not 1 <= rows <= expect.max_rows:
        raise PatchRejected(RejectReason.bad_shape, f"patch has {rows} virtual tokens; allowed 1 to {expect.max_rows}")
    if width != expect.hidden_size:
        raise PatchRejected(
            RejectReason.bad_shape, f"patch width {width} does not match the model's hidden size {expect.hidden_size}"
        )
    if meta.base_model != expect.fingerprint:
        raise PatchRejected(
            RejectReason.wrong_model,
            f"patch {meta.ref} was made for base model {meta.base_model[:19]}…, "
            f"this server runs {expect.fingerprint[:19]}…",
        )
    if not torch.isfinite(tensor).all():
        raise PatchRejected(RejectReason.non_finite, f"patch {meta.ref} contains NaN or infinite values")
    if not torch.isfinite(tensor.to(getattr(torch, expect.dtype))).all():
        raise PatchRejected(
            RejectReason.non_finite,
            f"patch {meta.ref} overflows to non-finite values in the model dtype {expect.dtype}",
        )
    # The engine's prefix-cache key hashes the embeddings but not which positions are embeddings
    # (vLLM #56655); token positions carry zero embeddings, so a patch row must never be all zeros.
    zero = (tensor.to(getattr(torch, expect.dtype)) == 0).all(dim=1)
    if zero.any():
        raise PatchRejected(
            RejectReason.zero_row,
            f"patch {meta.ref} row {int(zero.nonzero()[0])} is all zeros in the model dtype {expect.dtype}",
        )
    rows_f32 = tensor.to(torch.float32)
    digest = content_digest(raw_meta, tensor)
    return Patch(meta=meta, rows=rows_f32.requires_grad_(False), digest=digest)


def load_patch(path: Path, *, expect: ModelSpec) -> Patch:
    """Read and validate a patch file. See :func:`parse_patch`."""
    return parse_patch(path.read_bytes(), expect=expect)

"""Read-only views for operators and auditors: what a patch file holds, and what changed between two
patch files or two tenant files. Every change is one plain sentence; nothing secret is ever shown
(API keys appear only as counts).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from patches.errors import PatchRejected
from patches.format import (
    REQUIRED_FIELDS,
    SIGNATURE_FIELD,
    PatchMetadata,
    content_digest,
    read_patch,
    read_regular_file,
)
from patches.stack import PatchRef
from patches.tenants import Tenant, TenantConfig

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Change:
    """One difference, as data and as a sentence.

    Attributes:
        subject: What changed: ``patch`` or ``tenant <id>``.
        field: The field that changed.
        old: The old value (None when absent).
        new: The new value (None when absent).
        text: The sentence an auditor reads.
        details: Extra numbers (tensor statistics), if any.
    """

    subject: str
    field: str
    old: object
    new: object
    text: str
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The change as a JSON-ready dict.

        Returns:
            The dataclass fields.
        """
        return asdict(self)


def _num(value: float) -> float | None:
    """A float for JSON: None when not finite."""
    return float(value) if math.isfinite(value) else None


def _fmt(value: object) -> str:
    """A value in a sentence: quoted when it is free text, ``(none)`` when absent."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return '"' + value.replace('"', '\\"') + '"'
    return str(value)


def inspect_patch(data: bytes) -> dict[str, object]:
    """Describe a patch file (format-level checks only; the signature is not verified).

    Args:
        data: The patch file's bytes.

    Returns:
        Metadata fields, ``ref``, ``signer`` (None when unsigned), ``shape``, ``dtype``, per-row L2 norm
        statistics ``row_norm`` (``min``/``mean``/``max``), overall L2 ``norm``, ``finite``,
        ``content_digest`` and ``file_sha256``.

    Raises:
        PatchRejected: The bytes are not a well-formed format-v1 patch file.
    """
    meta, tensor, raw = read_patch(data)
    rows = tensor.to(torch.float32)
    norms = rows.norm(dim=1)
    row_norm = (
        {"min": _num(norms.min().item()), "mean": _num(norms.mean().item()), "max": _num(norms.max().item())}
        if len(norms)
        else {"min": None, "mean": None, "max": None}
    )
    return {
        "ref": meta.ref,
        **{name: raw[name] for name in REQUIRED_FIELDS},
        "version": meta.version,
        "signer": meta.signer,
        "signed": meta.signature is not None,
        "shape": list(tensor.shape),
        "dtype": _DTYPE_NAMES[tensor.dtype],
        "row_norm": row_norm,
        "norm": _num(rows.norm().item()),
        "finite": bool(torch.isfinite(rows).all()),
        "content_digest": content_digest(raw, tensor),
        "file_sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
    }


def tensor_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, object]:
    """How far two same-shape patches are apart.

    Args:
        a: Old rows ``[n, hidden]``.
        b: New rows, same shape.

    Returns:
        ``max_abs_diff``, ``cosine`` (of the flattened tensors) and ``min_row_cosine`` (lowest
        per-row cosine similarity).
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.numel() == 0:
        return {"max_abs_diff": 0.0, "cosine": None, "min_row_cosine": None}
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    row_cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
    return {
        "max_abs_diff": _num((a - b).abs().max().item()),
        "cosine": _num(cosine),
        "min_row_cosine": _num(row_cosine),
    }


def diff_patches(old: bytes, new: bytes) -> list[Change]:
    """Every difference between two patch files, in reading order.

    Args:
        old: The first file's bytes.
        new: The second file's bytes.

    Returns:
        Changes (empty when the files have the same content and signature).

    Raises:
        PatchRejected: Either file is not a well-formed format-v1 patch file.
    """
    meta_a, tensor_a, raw_a = read_patch(old)
    meta_b, tensor_b, raw_b = read_patch(new)
    changes: list[Change] = []

    def add(name: str, a: object, b: object, text: str, details: dict[str, object] | None = None) -> None:
        changes.append(Change("patch", name, a, b, text, details or {}))

    extra = sorted((set(raw_a) | set(raw_b)) - {*REQUIRED_FIELDS, "signer", SIGNATURE_FIELD})
    for name in (*REQUIRED_FIELDS, *extra):
        a, b = raw_a.get(name), raw_b.get(name)
        if a != b:
            add(name, a, b, f"{name.replace('_', ' ')}: {_fmt(a)} → {_fmt(b)}")
    dtype_a, dtype_b = _DTYPE_NAMES[tensor_a.dtype], _DTYPE_NAMES[tensor_b.dtype]
    if dtype_a != dtype_b:
        add("dtype", dtype_a, dtype_b, f"dtype: {dtype_a} → {dtype_b}")
    shape_a, shape_b = list(tensor_a.shape), list(tensor_b.shape)
    if shape_a != shape_b:
        add("shape", shape_a, shape_b, f"shape: {shape_a} → {shape_b} (values not compared)")
    elif not torch.equal(tensor_a.to(torch.float32), tensor_b.to(torch.float32)):
        stats = tensor_stats(tensor_a, tensor_b)
        text = (
            f"tensor values changed: max abs diff {_fmt_float(stats['max_abs_diff'], '.6g')}, "
            f"cosine similarity {_fmt_float(stats['cosine'])} (lowest row {_fmt_float(stats['min_row_cosine'])})"
        )
        add("tensor", None, None, text, stats)
    digest_a, digest_b = content_digest(raw_a, tensor_a), content_digest(raw_b, tensor_b)
    if meta_a.signer != meta_b.signer:
        signers = f"{meta_a.signer or 'unsigned'} → {meta_b.signer or 'unsigned'}"
        add("signer", meta_a.signer, meta_b.signer, f"signer: {signers}")
    elif meta_a.signature != meta_b.signature and (
        digest_a == digest_b or None in (meta_a.signature, meta_b.signature)
    ):
        # Same signer, other signature: added, removed, or (same content) one of the two is not genuine.
        what = "added" if meta_a.signature is None else "removed" if meta_b.signature is None else "changed"
        add("signature", None, None, f"signature {what} (signer {meta_a.signer or 'unsigned'})")
    if digest_a != digest_b:
        add("content_digest", digest_a, digest_b, f"content digest: {digest_a} → {digest_b}")
    return changes


def _fmt_float(value: object, spec: str = ".6f") -> str:
    return "n/a" if value is None else format(value, spec)


def _stack(refs: list[str]) -> str:
    return ",".join(refs) if refs else "(none)"


def _signers(signers: list[str] | None) -> str:
    if signers is None:
        return "any trusted key"
    return ", ".join(signers) if signers else "(none)"


def _describe_new_tenant(tenant: Tenant) -> str:
    keys = len(tenant.api_keys)
    return (
        f"added with default stack {_stack(tenant.default_stack)}, "
        f"allowed patches {', '.join(tenant.allowed_patches) or '(none)'}, "
        f"allow unpatched {_fmt(tenant.allow_unpatched)}, {keys} API key{'s' if keys != 1 else ''}, "
        f"allowed signers {_signers(tenant.allowed_signers)}"
    )


def _added_removed(subject: str, name: str, label: str, old: list[str], new: list[str]) -> list[Change]:
    out = []
    added = [x for x in new if x not in old]
    removed = [x for x in old if x not in new]
    if added:
        out.append(Change(subject, name, None, added, f"{subject}: {label} added: {', '.join(added)}"))
    if removed:
        out.append(Change(subject, name, removed, None, f"{subject}: {label} removed: {', '.join(removed)}"))
    return out


Catalog = dict[str, list[PatchMetadata]]
"""Patch name → the metadata of its files, lowest version first (:func:`patch_catalog`)."""


def patch_catalog(directory: Path) -> Catalog:
    """The metadata of every well-formed patch file in ``directory`` (``*.safetensors``, read as the registry
    reads them: :func:`patches.format.read_regular_file`); others are skipped. Signatures are not verified:
    this names what files say they are, for reading a tenant diff, not what a server would serve.

    Args:
        directory: A patch directory, such as ``deploy/demo/patches``.

    Returns:
        The catalog.
    """
    catalog: Catalog = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            meta = read_patch(read_regular_file(path))[0]
        except (PatchRejected, OSError):
            continue
        catalog.setdefault(meta.name, []).append(meta)
    return {name: sorted(metas, key=lambda m: m.version) for name, metas in catalog.items()}


def _resolve(ref_text: str, catalog: Catalog) -> PatchMetadata | None:
    """The file a stack entry names: its exact version, or for a bare name the newest one."""
    ref = PatchRef.parse(ref_text)
    metas = catalog.get(ref.name, [])
    if ref.version is None:
        return metas[-1] if metas else None
    return next((m for m in metas if m.version == ref.version), None)


def _guards(stack: list[str], catalog: Catalog) -> dict[str, str]:
    """Domain → the stack entries that cover it (``ref`` or ``name (not in the directory)``)."""
    out: dict[str, list[str]] = {}
    for entry in stack:
        meta = _resolve(entry, catalog)
        domain, label = (meta.domain, meta.ref) if meta else ("unknown", f"{entry} (not in the patch directory)")
        out.setdefault(domain, []).append(label)
    return {domain: ", ".join(refs) for domain, refs in out.items()}


def _domain_change(subject: str, old: list[str], new: list[str], catalog: Catalog) -> list[Change]:
    """What a default-stack change does, by domain: which protections it adds, drops or moves to
    another version (one sentence; none when the domains and their patches are the same)."""
    before, after = _guards(old, catalog), _guards(new, catalog)
    if before == after:
        return []
    parts = [f"adds {d} ({after[d]})" for d in after if d not in before]
    parts += [f"drops {d} ({before[d]})" for d in before if d not in after]
    parts += [f"changes {d} ({before[d]} → {after[d]})" for d in after if d in before and before[d] != after[d]]
    text = f"{subject}: default stack {'; '.join(parts)}"
    return [Change(subject, "domains", before, after, text)]


def _diff_tenant(a: Tenant, b: Tenant, catalog: Catalog | None = None) -> list[Change]:
    subject = f"tenant {a.id}"
    changes: list[Change] = []
    if a.default_stack != b.default_stack:  # order matters: it is the engine-input order
        changes.append(
            Change(
                subject,
                "default_stack",
                a.default_stack,
                b.default_stack,
                f"{subject}: default stack {_stack(a.default_stack)} → {_stack(b.default_stack)}",
            )
        )
        if catalog is not None:
            changes += _domain_change(subject, a.default_stack, b.default_stack, catalog)
    changes += _added_removed(subject, "allowed_patches", "allowed patches", a.allowed_patches, b.allowed_patches)
    if a.allow_unpatched != b.allow_unpatched:
        text = f"{subject}: allow unpatched {_fmt(a.allow_unpatched)} → {_fmt(b.allow_unpatched)}"
        changes.append(Change(subject, "allow_unpatched", a.allow_unpatched, b.allow_unpatched, text))
    if a.allowed_signers is None or b.allowed_signers is None:
        if a.allowed_signers != b.allowed_signers:
            text = f"{subject}: allowed signers {_signers(a.allowed_signers)} → {_signers(b.allowed_signers)}"
            changes.append(Change(subject, "allowed_signers", a.allowed_signers, b.allowed_signers, text))
    else:
        changes += _added_removed(subject, "allowed_signers", "allowed signers", a.allowed_signers, b.allowed_signers)
    old_keys, new_keys = set(a.api_keys), set(b.api_keys)
    if old_keys != new_keys:
        added, removed = len(new_keys - old_keys), len(old_keys - new_keys)
        parts = [f"{added} added"] if added else []
        parts += [f"{removed} removed"] if removed else []
        text = f"{subject}: API keys {len(old_keys)} → {len(new_keys)} ({', '.join(parts)})"
        changes.append(
            Change(subject, "api_keys", len(old_keys), len(new_keys), text, {"added": added, "removed": removed})
        )
    return changes


def diff_tenants(old: TenantConfig, new: TenantConfig, catalog: Catalog | None = None) -> list[Change]:
    """Every difference between two tenant configurations, tenant by tenant.

    API keys are reported as counts (added, removed, total), never as hashes.

    Args:
        old: The first configuration.
        new: The second configuration.
        catalog: Patch files to name each default-stack change's domains from (:func:`patch_catalog`);
            without it, stacks are compared by name only.

    Returns:
        Changes in the old file's tenant order, then added tenants in the new file's order.
    """
    changes: list[Change] = []
    for tenant in old.tenants:
        other = new.get(tenant.id)
        if other is None:
            changes.append(Change(f"tenant {tenant.id}", "tenant", tenant.id, None, f"tenant {tenant.id}: removed"))
        else:
            changes += _diff_tenant(tenant, other, catalog)
    for tenant in new.tenants:
        if old.get(tenant.id) is None:
            text = f"tenant {tenant.id}: {_describe_new_tenant(tenant)}"
            changes.append(Change(f"tenant {tenant.id}", "tenant", None, tenant.id, text))
            if catalog is not None:
                changes += _domain_change(f"tenant {tenant.id}", [], tenant.default_stack, catalog)
    return changes

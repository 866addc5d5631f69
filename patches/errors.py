"""Exceptions raised by the patch lifecycle. Only the HTTP layer turns them into responses."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why a patch file or a patch reference was refused; also the metrics label."""

    bad_name = "bad_name"
    bad_format = "bad_format"
    truncated = "truncated"
    oversized = "oversized"
    bad_dtype = "bad_dtype"
    bad_shape = "bad_shape"
    non_finite = "non_finite"
    zero_row = "zero_row"
    wrong_model = "wrong_model"
    unsigned = "unsigned"
    bad_signature = "bad_signature"
    unknown_key = "unknown_key"
    revoked = "revoked"
    rollback = "rollback"
    in_use = "in_use"
    not_a_file = "not_a_file"


class PatchError(Exception):
    """Base class of every error in :mod:`patches`."""


class PatchNotFound(PatchError):
    """A patch name or ``name@version`` that is not loaded."""


class PatchRejected(PatchError):
    """A patch file or operation refused for a named reason."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SignatureError(PatchRejected):
    """The file's signature is missing, invalid, or made by a key that is not trusted."""


class RollbackError(PatchRejected):
    """A version lower than the highest accepted one for the same name."""

    def __init__(self, message: str) -> None:
        super().__init__(RejectReason.rollback, message)


class StackError(PatchError):
    """A malformed patch-stack specification (for example a bad ``X-Patch-Stack`` header)."""


class ConversionError(PatchError):
    """A valid patch or adapter with no equivalent in the other format (see :mod:`patches.peft_interop`)."""


class TenantConfigError(PatchError):
    """A tenant configuration file that cannot be used."""


class StateError(PatchError):
    """The shared version state (or a patch file being persisted) cannot be read or written."""


class AccessError(PatchError):
    """A request the tenant configuration does not admit; ``param`` names the header or field at fault."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class Unauthenticated(AccessError):
    """No credentials, or credentials that name no tenant."""


class Forbidden(AccessError):
    """A tenant asking for a patch, stack or signer its configuration does not allow."""


class StackUnavailable(AccessError):
    """The tenant's own default stack cannot be served now (a pinned version is missing or refused)."""

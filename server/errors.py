"""The one place errors become HTTP responses, in OpenAI's ``{"error": {...}}`` shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from patches.errors import (
    AccessError,
    Forbidden,
    PatchError,
    PatchNotFound,
    PatchRejected,
    RejectReason,
    StackError,
    StackUnavailable,
    StateError,
    TenantConfigError,
    Unauthenticated,
)
from server.engine import EngineRequestError, EngineUnavailable
from server.modelspec import UnknownModel
from server.responses import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an explicit status, for checks the HTTP layer makes itself (limits, start-up, admin token)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable",
}

# exception class -> HTTP status; first match wins (subclasses before bases).
_STATUS: list[tuple[type[BaseException], int]] = [
    (APIError, 0),  # carries its own status
    (Unauthenticated, 401),
    (Forbidden, 403),
    (StackUnavailable, 503),  # the tenant's own default stack: the server's fault, not the caller's
    (StackError, 400),  # ModelSpecError too (param "model")
    (UnknownModel, 404),  # OpenAI's model_not_found
    (StateError, 503),  # the shared state or patch volume cannot be written: nothing changed
    (PatchNotFound, 404),  # like OpenAI's unknown model
    (PatchRejected, 400),
    (TenantConfigError, 400),
    (PatchError, 400),
    (EngineRequestError, 400),
    (EngineUnavailable, 503),
    (NotImplementedError, 501),
]


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> ErrorResponse:
    """The only builder of error bodies."""
    return ErrorResponse(
        error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"), param=param, code=code or status)
    )


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = error_body(status, message, param=param, code=code)
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def classify(exc: BaseException) -> tuple[int, str, str | None]:
    """Map an exception to (status, client-safe message, param)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            if isinstance(exc, APIError):
                return exc.status, str(exc), exc.param
            param = getattr(exc, "param", None)
            if isinstance(exc, PatchRejected):
                param = str(exc.reason)
                if exc.reason == RejectReason.in_use:
                    status = 409
            return status, str(exc), param
    log.exception("unhandled error", exc_info=exc)
    return 500, "internal server error", None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":  # OpenAI's wording for a field it does not know
        return f"Unrecognized request argument supplied: {param}", param
    message = str(first["msg"]).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_handlers(app: FastAPI) -> None:
    """Render every error the app can raise in the OpenAI shape."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        status, message, param = classify(exc)
        code = getattr(exc, "code", None) if isinstance(exc, APIError | AccessError | UnknownModel) else None
        return error_response(status, message, param=param, code=code)

    # Known classes are registered one by one: Starlette re-raises whatever reaches the catch-all
    # ``Exception`` handler, so only truly unexpected errors should end up there.
    for cls, _status in _STATUS:
        app.add_exception_handler(cls, _on_error)
    app.add_exception_handler(Exception, _on_error)

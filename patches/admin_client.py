"""A small client of one replica's ``/admin`` API (``server/routes/admin.py``), for the operator CLI.

The response models mirror the server's wire models (``server/admin.py``): :mod:`patches` never
imports :mod:`server`, so the shapes are restated here, and unknown fields are ignored so an older CLI
keeps working against a newer server. Every failure — a refusal in OpenAI's ``{"error": {...}}``
shape, another HTTP error, or no answer at all — is raised as :class:`AdminAPIError`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 60.0  # an upload is verified (hash + signature) before the answer
_M = TypeVar("_M", bound=BaseModel)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PatchInfo(_Wire):
    name: str
    version: int
    sha256: str
    signer: str | None = None
    n_tokens: int
    source: str
    loaded_at: str
    tenants: list[str] = []


class RejectionInfo(_Wire):
    source: str
    reason: str
    message: str
    at: str


class Listing(_Wire):
    patches: list[PatchInfo]
    rejections: list[RejectionInfo] = []
    tenant_config_error: str | None = None
    version_floors: dict[str, int] = {}
    withdrawn_versions: dict[str, list[int]] = {}  # absent from servers older than this field
    state_serial: int = 0
    state_error: str | None = None


class RollbackResult(_Wire):
    name: str
    version: int
    withdrawn: list[str]


class _ErrorInfo(_Wire):
    message: str
    type: str | None = None
    param: str | None = None
    code: int | str | None = None


class _ErrorBody(_Wire):
    error: _ErrorInfo


class AdminAPIError(Exception):
    """A request to the admin API that did not succeed.

    This is a client-side error (what a replica answered, or that it did not), not one of the domain
    errors of :mod:`patches.errors` that the server maps to HTTP.

    Attributes:
        url: The replica's base URL.
        status: The HTTP status, or None when no response arrived (connection refused, timeout).
        param: The error's ``param`` (for a refused patch, its ``RejectReason``), if any.
    """

    def __init__(self, url: str, status: int | None, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.param = param


class AdminClient:
    """The admin API of the replica at ``url``, authenticated with the admin bearer ``token``.

    Use it as a context manager (it holds one HTTP connection pool).
    """

    def __init__(self, url: str, token: str, *, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, follow_redirects=False
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._http.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, path: str, *, content: bytes | None = None, json: object = None, headers: dict | None = None
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, content=content, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise AdminAPIError(self.url, None, f"cannot reach {self.url}: {exc or type(exc).__name__}") from exc
        if response.is_success:
            return response
        try:
            info = _ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            message = f"HTTP {response.status_code} from {self.url}{path}, without a patchserve error body"
            raise AdminAPIError(self.url, response.status_code, message) from None
        raise AdminAPIError(self.url, response.status_code, info.message, info.param)

    def _parse(self, model: type[_M], response: httpx.Response) -> _M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise AdminAPIError(
                self.url, response.status_code, f"unexpected answer from {self.url}: {exc.error_count()} field errors"
            ) from exc

    def listing(self) -> Listing:
        """``GET /admin/patches``: loaded versions, refused files, floors and withdrawn versions."""
        return self._parse(Listing, self._request("GET", "/admin/patches"))

    def upload(self, data: bytes) -> PatchInfo:
        """``POST /admin/patches``: the replica verifies the file, writes it to its patch directory and serves it."""
        headers = {"content-type": "application/octet-stream"}
        return self._parse(PatchInfo, self._request("POST", "/admin/patches", content=data, headers=headers))

    def roll_back(self, name: str, version: int) -> RollbackResult:
        """``POST /admin/patches/{name}/rollback``: back to ``name@version``; newer versions are withdrawn."""
        response = self._request("POST", f"/admin/patches/{name}/rollback", json={"version": version})
        return self._parse(RollbackResult, response)

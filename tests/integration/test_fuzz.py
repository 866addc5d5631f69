"""A schemathesis run over the real server's own OpenAPI schema: zero 5xx, and the server still serves.

Positive and negative cases (``--mode all``) for every operation, seeded so each run generates the
same cases; admin operations get the admin token, ``/v1`` the tenant header. The generated-case count
is read from schemathesis's summary and must be well above zero, so an empty run fails.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from tests.integration.conftest import ADMIN_TOKEN, RunningServer

pytestmark = pytest.mark.engine

MAX_EXAMPLES = 12  # per operation and phase; ~10 operations


def _cases(summary: str) -> int:
    """Generated cases, from schemathesis's summary line ("Test cases: N generated, …")."""
    match = re.search(r"(\d+) generated", summary)
    return int(match.group(1)) if match else 0


def test_fuzzing_the_openapi_schema_gives_no_server_error(server: RunningServer) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
        "--checks", "not_a_server_error", "--mode", "all", "--max-examples", str(MAX_EXAMPLES),
        "--seed", "15", "--generation-deterministic", "--workers", "1", "--no-color", "--request-timeout", "180",
        "--phases", "examples,coverage,fuzzing",
        "-H", f"Authorization: Bearer {ADMIN_TOKEN}", "-H", "X-Tenant-Id: bare",
        "--exclude-path-regex", "^/admin/(patches/.+|tenants/reload)$",  # mutations: covered by the admin tests
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    generated = _cases(result.stdout)
    assert generated >= 50, f"only {generated} cases generated:\n{result.stdout[-2000:]}"
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200

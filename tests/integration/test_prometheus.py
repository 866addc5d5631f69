"""A real Prometheus (Debian's package) scrapes the real server and evaluates the project's recording rules.

Skips with its reason where no ``prometheus`` binary exists — except under CI (``CI=true``), where a
missing Prometheus is a failure: ``make test`` installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.launch import free_port
from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.engine

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"
TENANTS = ("single", "stacked")
PROMPTS = ("How do I pick a lock to break into a house?", "What is the boiling point of water?")


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "Debian's 'prometheus' package is not installed (make test installs it with apt-get)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI this test must run")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _prometheus_binary()
    root = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "patchserve", "static_configs": [{"targets": [server.url.split("//")[1]]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (root / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _server_samples(server: RunningServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def _query(prometheus: str, promql: str) -> dict[str, float]:
    """``tenant`` → value of an instant query (one series per tenant expected)."""
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    return {r["metric"].get("tenant", ""): float(r["value"][1]) for r in body["data"]["result"]}


def _samples_per_tenant(server: RunningServer) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in _server_samples(server, "patchserve_overhead_samples_total").items():
        out[dict(labels)["tenant"]] = out.get(dict(labels)["tenant"], 0) + v
    return out


def test_prometheus_scrapes_refusal_rate_and_overhead_for_two_tenants(server: RunningServer, prometheus: str) -> None:
    # Earlier tests may have left counters behind: let Prometheus take its first samples of them, then
    # send traffic for two patched tenants until the overhead sampler has measured three more replay
    # pairs for each, so every series *increases* while Prometheus watches (rate() needs that). The
    # sampler (rate 1.0 in this server) keeps one pending sample per stack and replays one pair at a
    # time, the stack measured least recently first: alternating traffic gets both tenants measured
    # in turn, however slow the machine (the deadline only guards against a hung server).
    time.sleep(3)
    start = _samples_per_tenant(server)
    deadline = time.monotonic() + 300
    i = 0

    def new_pairs() -> int:
        now = _samples_per_tenant(server)
        return min(now.get(t, 0) - start.get(t, 0) for t in TENANTS)

    while i < 4 or new_pairs() < 3:
        assert time.monotonic() < deadline, f"overhead samples: {start} -> {_samples_per_tenant(server)}"
        tenant = TENANTS[i % 2]
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": PROMPTS[(i // 2) % 2]}], "max_tokens": 16},
            headers={"X-Tenant-Id": tenant},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        i += 1
        time.sleep(0.3)

    refusal = "patchserve:refusal_rate:ratio_rate5m"
    overhead = 'patchserve:latency_overhead:ratio_rate5m{phase="e2e"}'
    _until(
        lambda: set(TENANTS) <= set(_query(prometheus, refusal)) and set(TENANTS) <= set(_query(prometheus, overhead)),
        90,
        "recording rules to produce series for both tenants",
    )
    for tenant, rate in _query(prometheus, refusal).items():
        assert 0 <= rate <= 1, (tenant, rate)
    for tenant, ratio in _query(prometheus, overhead).items():
        assert -1 < ratio < 10, (tenant, ratio)

    # Once traffic has stopped, Prometheus' view of the counters equals the server's own. (The sampler
    # may still be replaying what was pending — at most one pair per stack — hence the gauge waits too.)
    time.sleep(3)
    totals = "sum by (tenant) (patchserve_refusals_total) / sum by (tenant) (patchserve_completions_total)"
    completions = _server_samples(server, "patchserve_completions_total")
    refusals = _server_samples(server, "patchserve_refusals_total")
    for tenant in TENANTS:
        done = sum(v for k, v in completions.items() if dict(k)["tenant"] == tenant)
        refused = sum(v for k, v in refusals.items() if dict(k)["tenant"] == tenant)
        assert done > 0
        _until(lambda t=tenant, r=refused / done: abs(_query(prometheus, totals)[t] - r) < 1e-9, 30, "scrape")

    def gauges_agree() -> bool:
        gauge = _query(prometheus, 'patchserve_latency_overhead_ratio{phase="e2e"}')
        served = _server_samples(server, "patchserve_latency_overhead_ratio")
        for tenant in TENANTS:
            mine = [v for k, v in served.items() if dict(k)["tenant"] == tenant and dict(k)["phase"] == "e2e"]
            if gauge.get(tenant) != pytest.approx(mine[0]):
                return False
        return True

    _until(gauges_agree, 90, "the overhead gauge scraped as the server reports it, once replays drained")
    # vLLM's own engine metrics come through the same endpoint.
    assert _query(prometheus, "vllm:num_requests_running"), "vLLM engine metrics not scraped"

"""Offline checks of docker-compose.yml.

Schema: the Compose Specification JSON schema (compose-spec/compose-spec `schema/compose-spec.json`,
Apache-2.0) as vendored in the check-jsonschema 0.39.0 wheel (`check_jsonschema/builtin_schemas/vendor/`,
licence in `.../vendor/licenses/LICENSE.compose-spec`), validated with jsonschema. Then the cross-references
no schema sees: bind-mounted files exist, the Prometheus scrape target and the Grafana datasource and
dashboard paths name what compose actually runs, and every PATCHSERVE_* variable is a real setting.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    assert schema.get("title") == "Compose Specification"
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE.is_file(), "docker-compose.yml is missing"
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), "use the short volume syntax (source:target[:mode])"
        source, target, *mode = entry.split(":")
        out.append((source, target, mode[0] if mode else "rw"))
    return out


def test_compose_file_validates_against_the_compose_spec(compose, validator):
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["services"]["patchserve"].__setitem__("healtcheck", {}),  # misspelt key
        lambda c: c["services"]["patchserve"].__setitem__("ports", "8000:8000"),  # wrong type
        lambda c: c["services"]["prometheus"].__setitem__("stop_grace_period", ["60s"]),  # wrong type
        lambda c: c.__setitem__("servces", {}),  # unknown top-level key
    ],
)
def test_the_schema_rejects_broken_variants(compose, validator, mutate):
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert list(validator.iter_errors(broken)), "the schema accepted a broken file: is the validator effective?"


def test_services_and_pinned_images(compose):
    services = compose["services"]
    assert {"patchserve", "prometheus", "grafana"} <= services.keys()
    build = services["patchserve"]["build"]
    assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert DIGEST.search(image), f"{name}: {image} is not pinned by digest"
        tag = DIGEST.sub("", image).rpartition(":")[2]
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {image} has no exact version tag"


def test_bind_mounts_exist_and_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    seen_bind = 0
    for name, service in compose["services"].items():
        for source, target, _ in mounts(service):
            if source.startswith((".", "/")):
                seen_bind += 1
                path = (REPO / source).resolve()
                assert path.exists(), f"{name}: bind mount source {source} does not exist"
                assert REPO in path.parents, f"{name}: {source} lies outside the repository"
                assert "keys" not in path.relative_to(REPO).parts, f"{name}: never mount signing keys"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"
            assert target.startswith("/"), target
    assert seen_bind >= 4


def test_demo_patches_reach_the_patch_volume_read_only(compose):
    services = compose["services"]
    server_mounts = {t: (s, m) for s, t, m in mounts(services["patchserve"])}
    env = services["patchserve"].get("environment", {})
    patch_dir = env.get("PATCHSERVE_PATCH_DIR", "/var/lib/patchserve/patches")
    volume = server_mounts[patch_dir][0]
    assert not volume.startswith((".", "/")), "the patch directory should be a named volume"
    seeders = [
        svc
        for svc in services.values()
        if any(s == volume for s, _, _ in mounts(svc)) and any("deploy/demo/patches" in s for s, _, _ in mounts(svc))
    ]
    assert seeders, "nothing copies deploy/demo/patches into the patch volume"
    for svc in seeders:
        demo = [m for s, _, m in mounts(svc) if "deploy/demo/patches" in s]
        assert demo == ["ro"]
    depends = services["patchserve"].get("depends_on", {})
    assert any(cond.get("condition") == "service_completed_successfully" for cond in depends.values())


def test_patchserve_settings_ports_healthcheck_and_grace(compose):
    server = compose["services"]["patchserve"]
    env = server.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    for key in env:
        if key.startswith("PATCHSERVE_"):
            assert key.removeprefix("PATCHSERVE_").lower() in Settings.model_fields, f"{key} is not a setting"
    drain = float(env["PATCHSERVE_DRAIN_TIMEOUT"])
    grace = server["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, f"stop_grace_period {grace!r}: use seconds"
    assert int(match.group(1)) > drain, "stop_grace_period must exceed the drain timeout"
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert server["healthcheck"]["start_period"]
    for port in server["ports"] + compose["services"]["prometheus"]["ports"] + compose["services"]["grafana"]["ports"]:
        assert port.startswith("127.0.0.1:"), f"{port}: demo services listen on loopback only"
    assert any(p.endswith(":8000") for p in server["ports"])


def test_prometheus_scrapes_the_compose_service(compose):
    services = compose["services"]
    targets = {t: (s, m) for s, t, m in mounts(services["prometheus"])}
    assert "/etc/prometheus" in targets and targets["/etc/prometheus"][0] == "./deploy/prometheus"
    command = " ".join(services["prometheus"].get("command", []))
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert PROMETHEUS_CONFIG.is_file(), "deploy/prometheus/prometheus.yml is missing"
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    scraped = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    }
    assert "patchserve:8000" in scraped, f"prometheus.yml scrapes {scraped}, not the compose service"
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), f"rule file {rule_file} is missing"


def test_grafana_provisioning_and_dashboard_paths_line_up(compose):
    grafana = compose["services"]["grafana"]
    targets = {s: t for s, t, _ in mounts(grafana)}
    assert targets.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_in_container = targets.get("./deploy/grafana/dashboards")
    assert dashboards_in_container, "deploy/grafana/dashboards is not mounted"
    datasources = sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml"))
    assert datasources, "no Grafana datasource provisioning file"
    urls = [ds.get("url") for f in datasources for ds in yaml.safe_load(f.read_text()).get("datasources", [])]
    assert "http://prometheus:9090" in urls and "prometheus" in compose["services"]
    providers = sorted((GRAFANA / "provisioning" / "dashboards").glob("*.y*ml"))
    assert providers, "no Grafana dashboard provider file"
    paths = [p["options"]["path"] for f in providers for p in yaml.safe_load(f.read_text()).get("providers", [])]
    assert paths and all(p.rstrip("/") == dashboards_in_container for p in paths), (
        f"dashboard providers read {paths}, compose mounts the dashboards at {dashboards_in_container}"
    )
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_in_container + "/")
    assert (GRAFANA / "dashboards" / home.removeprefix(dashboards_in_container + "/")).is_file()

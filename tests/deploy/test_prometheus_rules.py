"""Offline checks of the monitoring deployment: deploy/prometheus (scrape config, recording and alerting
rules) and deploy/grafana (dashboard, provisioning).

promtool validates the config and rules and runs the unit tests in tests/deploy/promtool/rules_test.yml
(synthetic series with hand-computed expected values). Without promtool those tests skip, except under
CI=true where a missing promtool is an error (install Debian/Ubuntu's `prometheus` package).
The dashboard checks are pure Python: every PromQL expression may only use metrics the server exports or
recording rules defined in rules.yml, datasources all point at the provisioned uid, panel ids are unique.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = Path(__file__).resolve().parent / "promtool" / "rules_test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "patchserve.json"
DS_PROVISIONING = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVISIONING = GRAFANA_DIR / "provisioning" / "dashboards" / "patchserve.yml"

# The metrics GET /metrics exports (names fixed by the server; see README "Metrics").
COUNTERS = {
    "patchserve_requests_total",
    "patchserve_prompt_tokens_total",
    "patchserve_patch_tokens_total",
    "patchserve_patch_cached_tokens_total",
    "patchserve_generation_tokens_total",
    "patchserve_completions_total",
    "patchserve_refusals_total",
    "patchserve_patch_completions_total",
    "patchserve_patch_refusals_total",
    "patchserve_toxicity_scored_total",
    "patchserve_toxic_completions_total",
    "patchserve_patch_toxicity_scored_total",
    "patchserve_patch_toxic_completions_total",
    "patchserve_toxicity_dropped_total",
    "patchserve_overhead_samples_total",
    "patchserve_overhead_patched_seconds_total",
    "patchserve_overhead_baseline_seconds_total",
    "patchserve_patch_load_failures_total",
    "patchserve_patch_swaps_total",
}
GAUGES = {
    "patchserve_requests_in_flight",
    "patchserve_latency_overhead_ratio",
    "patchserve_patch_info",
    "patchserve_patches_loaded",
}
HISTOGRAMS = {
    "patchserve_time_to_first_token_seconds",
    "patchserve_e2e_request_latency_seconds",
    "patchserve_inter_token_latency_seconds",
    "patchserve_patch_swap_seconds",
}
VLLM = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:generation_tokens_total",
}
EXPORTED = (
    COUNTERS
    | GAUGES
    | VLLM
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}  # synthesised by Prometheus for every target
)

REQUIRED_RECORDING_RULES = {
    "patchserve:refusal_rate:ratio_rate5m",
    "patchserve:patch_refusal_rate:ratio_rate5m",
    "patchserve:toxic_rate:ratio_rate5m",
    "patchserve:patch_toxic_rate:ratio_rate5m",
    "patchserve:latency_overhead:ratio_rate5m",
    "patchserve:ttft_seconds:p99_5m",
    "patchserve:ttft_seconds:p50_5m",
    "patchserve:e2e_latency_seconds:p99_5m",
    "patchserve:requests:rate5m",
    "patchserve:request_errors:ratio_rate5m",
    "patchserve:patch_cache_hit:ratio_rate5m",
}

# A metric or rule name each part of the dashboard must show.
REQUIRED_ON_DASHBOARD = {
    "refusal rate per tenant/stack": "patchserve:refusal_rate:ratio_rate5m",
    "refusal rate per patch version": "patchserve:patch_refusal_rate:ratio_rate5m",
    "overhead gauge": "patchserve_latency_overhead_ratio",
    "overhead recording rule": "patchserve:latency_overhead:ratio_rate5m",
    "TTFT p99 per tenant": "patchserve:ttft_seconds:p99_5m",
    "e2e p50": "patchserve:e2e_latency_seconds:p50_5m",
    "e2e p99": "patchserve:e2e_latency_seconds:p99_5m",
    "ITL": "patchserve:itl_seconds:p99_5m",
    "request rate by status": "patchserve:requests:rate5m",
    "patch tokens": "patchserve:patch_tokens:rate5m",
    "patch prefix-cache hit ratio": "patchserve:patch_cache_hit:ratio_rate5m",
    "loaded patches": "patchserve_patch_info",
    "load failures": "patchserve_patch_load_failures_total",
    "swaps": "patchserve_patch_swaps_total",
    "swap latency": "patchserve_patch_swap_seconds_bucket",
    "vLLM running": "vllm:num_requests_running",
    "vLLM waiting": "vllm:num_requests_waiting",
    "vLLM KV cache": "vllm:kv_cache_usage_perc",
}

# --- PromQL identifier extraction ---------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GRAFANA_VAR = re.compile(r"\$\{\w+\}|\$\w+")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
}  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Metric names (and recording rule names) a PromQL expression selects: identifiers that are not
    functions, aggregations, keywords, label names, label values, durations or Grafana variables."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GRAFANA_VAR.sub("", text)
    text = _LABEL_LIST.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_extractor():
    expr = (
        'histogram_quantile(0.99, sum by (tenant, le) (rate(foo_seconds_bucket{tenant=~"$tenant",x="a:b c"}'
        "[$__rate_interval]))) / on (tenant) group_left bar:baz:ratio offset 10m > 0.5 and sum without (x) "
        "(vllm:num_requests_running) unless ignoring(le) qux[5m] * 1e3"
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "bar:baz:ratio", "vllm:num_requests_running", "qux"}
    assert metric_names("sum(rate(x_total[5m])) or 0 * up") == {"x_total", "up"}


# --- loading ------------------------------------------------------------------------------------------


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = load_yaml(RULES)
    return [rule | {"group": group["name"]} for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def recorded(rules) -> set[str]:
    return {r["record"] for r in rules if "record" in r}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and the panels nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(selector, label)
    contributes its selector)."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


# --- promtool -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path:
        reason = "promtool not found: install the `prometheus` package (apt-get install prometheus) or set PROMTOOL"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error rather than a skip")
        pytest.skip(reason)
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"promtool exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_promtool_check_config(promtool):
    proc = run_promtool(promtool, "check", "config", PROM_CONFIG)
    assert_ok(proc)
    assert "1 rule files found" in proc.stdout + proc.stderr  # the relative rule_files entry resolved


def test_promtool_check_rules(promtool):
    assert_ok(run_promtool(promtool, "check", "rules", RULES))


def test_promtool_rule_unit_tests(promtool):
    proc = run_promtool(promtool, "test", "rules", RULES_TEST)
    assert_ok(proc)
    assert "SUCCESS" in proc.stdout


def _mutated_expr(rule_name: str, old: str, new: str):
    def mutate(rules_doc: dict) -> None:
        for group in rules_doc["groups"]:
            for rule in group["rules"]:
                if rule.get("record") == rule_name:
                    assert old in rule["expr"], f"mutation target {old!r} not in {rule_name}"
                    rule["expr"] = rule["expr"].replace(old, new)
                    return
        raise AssertionError(f"no recording rule {rule_name}")

    return mutate


def _wrong_expectation(tests_doc: dict) -> None:
    sample = tests_doc["tests"][0]["promql_expr_test"][0]["exp_samples"][0]
    assert sample["value"] == 0.75
    sample["value"] = 0.7


@pytest.mark.parametrize(
    ("mutate_rules", "mutate_tests", "expect_in_output"),
    [
        pytest.param(None, _wrong_expectation, "patchserve:refusal_rate:ratio_rate5m", id="wrong-expected-value"),
        pytest.param(
            _mutated_expr("patchserve:ttft_seconds:p99_5m", "sum by (tenant, le)", "max by (tenant, le)"),
            None,
            "patchserve:ttft_seconds:p99_5m",
            id="ttft-p99-without-aggregating-stacks",
        ),
        pytest.param(
            _mutated_expr("patchserve:latency_overhead:ratio_rate5m", "- 1", "- 0"),
            None,
            "patchserve:latency_overhead:ratio_rate5m",
            id="overhead-without-minus-one",
        ),
        pytest.param(
            _mutated_expr("patchserve:patch_refusal_rate:ratio_rate5m", "[5m])) > 0)", "[5m])))"),
            None,
            "patchserve:patch_refusal_rate:ratio_rate5m",
            id="patch-refusal-rate-without-zero-guard",
        ),
    ],
)
def test_promtool_unit_tests_catch_mistakes(promtool, tmp_path, mutate_rules, mutate_tests, expect_in_output):
    """The unit tests are not vacuous: a wrong expectation, or a plausible mistake in a rule, fails them."""
    rules_doc, tests_doc = load_yaml(RULES), load_yaml(RULES_TEST)
    if mutate_rules:
        mutate_rules(rules_doc)
    if mutate_tests:
        mutate_tests(tests_doc)
    rules_copy, tests_copy = tmp_path / "rules.yml", tmp_path / "rules_test.yml"
    rules_copy.write_text(yaml.safe_dump(rules_doc, sort_keys=False))
    tests_doc["rule_files"] = [str(rules_copy)]
    tests_copy.write_text(yaml.safe_dump(tests_doc, sort_keys=False))

    assert_ok(run_promtool(promtool, "check", "rules", rules_copy))  # still a valid rule file
    proc = run_promtool(promtool, "test", "rules", tests_copy)
    assert proc.returncode != 0, f"mutation was not caught:\n{proc.stdout}"
    assert expect_in_output in proc.stdout + proc.stderr


def test_dashboard_promql_parses(promtool, dashboard, tmp_path):
    """Every dashboard expression is valid PromQL once Grafana's variables are substituted."""
    substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$tenant": ".*", "$stack": ".*"}
    rules = []
    for i, (where, expr) in enumerate(panel_exprs(dashboard)):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expr_{i}:check", "expr": expr})
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(run_promtool(promtool, "check", "rules", path))


# --- Prometheus config and rules (no promtool needed) -----------------------------------------------


def test_prometheus_config_scrapes_patchserve():
    config = load_yaml(PROM_CONFIG)
    assert config["rule_files"] == ["rules.yml"]
    assert (PROM_CONFIG.parent / config["rule_files"][0]).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["patchserve"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["patchserve:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval", "1m"))
    assert interval in {"5s", "10s"}


def test_recording_rules_names_and_metrics(rules, recorded):
    assert recorded >= REQUIRED_RECORDING_RULES, f"missing: {sorted(REQUIRED_RECORDING_RULES - recorded)}"
    problems = []
    for rule in rules:
        name = rule.get("record") or rule["alert"]
        if "record" in rule:
            if rule["group"] != "patchserve":
                problems.append(f"{name}: recording rule outside group 'patchserve'")
            if not re.fullmatch(r"patchserve:[a-z0-9_]+:[a-z0-9_]+", name):
                problems.append(f"{name}: not level:metric:operations")
        unknown = metric_names(rule["expr"]) - EXPORTED - recorded
        if unknown:
            problems.append(f"{name}: unknown metrics {sorted(unknown)}")
    assert not problems, "\n".join(problems)
    assert len(recorded) == sum("record" in r for r in rules), "duplicate recording rule names"


def test_unit_tests_cover_every_rule(rules):
    """Each recording rule is evaluated by a promql_expr_test and each alert fires in an alert_rule_test."""
    tests = load_yaml(RULES_TEST)["tests"]
    exprs = " ".join(t["expr"] for group in tests for t in group.get("promql_expr_test", []))
    fired = {t["alertname"] for group in tests for t in group.get("alert_rule_test", []) if t["exp_alerts"]}
    not_tested = [r["record"] for r in rules if "record" in r and r["record"] not in metric_names(exprs)]
    not_tested += [r["alert"] for r in rules if "alert" in r and r["alert"] not in fired]
    assert not not_tested, f"rules without a unit test: {not_tested}"
    series = " ".join(s["series"] for group in tests for s in group["input_series"])
    assert set(re.findall(r'tenant="([^"]+)"', series)) >= {"acme", "globex"}
    assert set(re.findall(r'stack="([^"]+)"', series)) >= {"refusal@2", "none"}


# --- Grafana ------------------------------------------------------------------------------------------


def test_dashboard_identity_and_layout(dashboard):
    assert dashboard["uid"] == "patchserve"
    assert dashboard["title"] == "patchserve"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    occupied: dict[tuple[int, int], int] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in occupied, f"panels {occupied[(x, y)]} and {p['id']} overlap"
                occupied[(x, y)] = p["id"]
    for p in panels:
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['id']} {p['title']!r} has no queries"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"panel {p['id']}: duplicate refIds"


def test_dashboard_datasources(dashboard):
    provisioned = load_yaml(DS_PROVISIONING)["datasources"]
    assert len(provisioned) == 1
    uid = provisioned[0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] == uid, "the datasource variable must default to the provisioned uid"
    allowed = {"${datasource}", uid}
    refs = []
    for p in all_panels(dashboard):
        if p["type"] == "row":
            assert "datasource" not in p or p["datasource"] is None
            continue
        refs.append((f"panel {p['id']}", p["datasource"]))
        refs += [(f"panel {p['id']} target {t['refId']}", t["datasource"]) for t in p["targets"]]
    refs += [(f"variable {v['name']}", v["datasource"]) for v in variables.values() if v["type"] == "query"]
    bad = [(where, ds) for where, ds in refs if ds.get("type") != "prometheus" or ds.get("uid") not in allowed]
    assert not bad, f"datasource references not pointing at {allowed}: {bad}"
    assert len({ds["uid"] for _, ds in refs}) == 1, "panels mix datasource references"


def test_dashboard_queries_use_known_metrics(dashboard, recorded):
    found: set[str] = set()
    problems = []
    for where, expr in panel_exprs(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: selects no metric: {expr!r}")
        unknown = {n for n in names - EXPORTED - recorded if not n.startswith("process_")}
        if unknown:
            problems.append(f"{where}: unknown metrics {sorted(unknown)} in {expr!r}")
        found |= names
    assert not problems, "\n".join(problems)
    missing = {what: name for what, name in REQUIRED_ON_DASHBOARD.items() if name not in found}
    assert not missing, f"dashboard lacks: {missing}"


def test_dashboard_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "tenant", "stack"} <= set(variables)
    exprs = [expr for _, expr in panel_exprs(dashboard)]
    for name in ("tenant", "stack"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert any(f'{name}=~"${name}"' in e for e in exprs), f"no query filters on ${name}"
    table = [p for p in all_panels(dashboard) if p["type"] == "table"]
    assert any("patchserve_patch_info" in t["expr"] for p in table for t in p["targets"])


def test_grafana_provisioning():
    (ds,) = load_yaml(DS_PROVISIONING)["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["uid"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(DASH_PROVISIONING)["providers"]
    assert provider["type"] == "file"
    # docker compose mounts deploy/grafana/dashboards at this path
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent == GRAFANA_DIR / "dashboards"
    assert sorted(p.name for p in DASHBOARD.parent.glob("*.json")) == ["patchserve.json"]

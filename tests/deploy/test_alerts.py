"""The alert rules and the Grafana dashboard under deploy/, held against Prometheus itself and against the code.

* ``promtool check rules`` and ``promtool test rules``: every alert has a case where it fires on synthetic series and
  one where it stays silent on a healthy platform's (deploy/monitoring/aidc-alerts.test.yml).
* The PrometheusRule of deploy/k8s holds exactly the rules the local Prometheus loads.
* Every metric the rules and the dashboard's queries name is one the services export (their registries), and every
  dashboard query parses (promtool, as recording rules).

promtool comes from Debian's `prometheus` package (`make prometheus-server`); without it these tests skip, except
under CI=true, where they fail.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from services.mesh.config import SERVICE_NAMES
from services.mesh.metrics import exported_names
from services.platform.metrics import SupervisorMetrics
from tests.conftest import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "aidc-alerts.yml"
RULE_TESTS = MONITORING / "aidc-alerts.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "base" / "prometheus-rules.yaml"
DASHBOARD = MONITORING / "grafana" / "aidc-dashboard.json"
ADAPTER_RULES = MONITORING / "prometheus-adapter-rules.yaml"
AUTOSCALERS = ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "autoscalers.yaml"
#: What the Prometheus adapter puts in its query templates, and values that keep them valid PromQL.
ADAPTER_TEMPLATE = {
    "<<.Series>>": "{series}",
    "<<.LabelMatchers>>": 'namespace="aidc",pod="serving-0"',
    "<<.GroupBy>>": "pod",
}
#: Series Prometheus makes itself, not the services.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
#: Grafana's variables as the dashboard's queries use them, and a value that keeps the query valid PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$service": "auth", "$tenant": "acme"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (`make prometheus-server` installs Debian's prometheus package)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true: the alert rules' tests must run")
        pytest.skip(message)
    return found


def run_promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, variables included."""
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert inner is not None, query
            yield f"variable {variable['name']}", inner.group(1)


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless", "inf",
    "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (it must parse: promtool checks that separately). Strings,
    label matchers, ranges and grouping labels are dropped; what is left is functions (followed by '('), keywords,
    numbers and metric names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word, before = match.group(0), text[: match.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the exponent or unit of a number: 1e6, 5m
        if text[match.end() :].lstrip().startswith("(") or word in _NOT_METRICS:
            continue
        names.add(word)
    return names


def test_metric_names_finds_what_a_query_selects() -> None:
    assert metric_names('sum by (job) (rate(a_total{code=~"x|y"}[5m])) / on (job) b > 1e6 and c offset 5m') == {
        "a_total",
        "b",
        "c",
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[1m])))") == {"h_bucket"}
    assert metric_names("up == 0") == {"up"}


def exported() -> set[str]:
    """Every sample name the services, the mesh and the supervisor can export."""
    for service in SERVICE_NAMES:
        importlib.import_module(f"services.{service}.server")  # registers the service's metrics
    return exported_names(REGISTRY) | exported_names(SupervisorMetrics([]).registry)


def test_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_alert_fires_and_stays_silent_in_promtool_unit_tests() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules()}
    assert alerts - firing == set(), "alerts without a case where they fire"
    assert alerts - silent == set(), "alerts without a case where they stay silent"
    assert (firing | silent) - alerts == set(), "tests of alerts that do not exist"
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_prometheus_rule_holds_the_same_rules() -> None:
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (resource["apiVersion"], resource["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        f"{PROMETHEUS_RULE.relative_to(ROOT)} must hold the groups of {RULES.relative_to(ROOT)}"
    )
    base = yaml.safe_load((PROMETHEUS_RULE.parent / "kustomization.yaml").read_text())
    assert PROMETHEUS_RULE.name in base["resources"]


def test_rules_name_only_exported_metrics() -> None:
    available = exported() | PROMETHEUS_OWN
    for rule in rules():
        named = metric_names(rule["expr"])
        assert named, rule["alert"]
        assert named <= available, f"{rule['alert']} names metrics no service exports: {sorted(named - available)}"


def test_every_dashboard_query_parses_and_names_exported_metrics(tmp_path: Path) -> None:
    queries = list(dashboard_queries())
    assert len(queries) >= 30
    available = exported() | PROMETHEUS_OWN
    for title, expr in queries:
        named = metric_names(expand(expr))
        assert named, (title, expr)
        assert named <= available, f"panel {title!r} names metrics no service exports: {sorted(named - available)}"
    # promtool parses each query as the expression of a recording rule.
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": expand(e)} for i, (_, e) in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(as_rules))
    result = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_dashboard_covers_every_area_of_the_platform() -> None:
    board = json.loads(DASHBOARD.read_text())
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == ["Overview", "RPCs of $service", "Tenants' usage", "Jobs", "Inference"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_the_prometheus_adapter_serves_the_autoscalers_custom_metrics(tmp_path: Path) -> None:
    """Every custom metric the autoscalers ask for is one an adapter rule names, from series the services export,
    each pod's own (namespace and pod labels, as the PodMonitors attach them), by a query promtool parses."""
    adapter = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    served: dict[str, str] = {}
    available = exported()
    for rule in adapter:
        series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", rule["seriesQuery"])
        assert series is not None, rule["seriesQuery"]
        assert series.group(1) in available, f"{series.group(1)} is exported by no service"
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        assert re.fullmatch(rule["name"]["matches"], series.group(1))
        query = rule["metricsQuery"]
        for placeholder, value in ADAPTER_TEMPLATE.items():
            query = query.replace(placeholder, value.format(series=series.group(1)))
        assert "<<" not in query, query
        assert metric_names(query) <= available, query
        served[rule["name"]["as"]] = query
    asked = {
        metric["pods"]["metric"]["name"]
        for doc in yaml.safe_load_all(AUTOSCALERS.read_text())
        for metric in doc["spec"]["metrics"]
        if metric["type"] == "Pods"
    }
    assert asked and asked <= served.keys(), f"autoscalers ask for {asked}, the adapter serves {set(served)}"
    as_rules = {"groups": [{"name": "adapter", "rules": [{"record": n, "expr": q} for n, q in served.items()]}]}
    path = tmp_path / "adapter-queries.yml"
    path.write_text(yaml.safe_dump(as_rules))
    result = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

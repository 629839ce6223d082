"""The Prometheus configuration, the alert rules and the Grafana dashboard, checked by
Prometheus's own promtool (Debian's `prometheus` package) and against the metrics that really
exist: the gateway's registry and a live scrape of the SGLang simulator."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway import metrics
from tests.conftest import _missing
from tests.procs import ROOT, simulator

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "korean-token-limiter.json"
# Grafana's own variables are not PromQL: a duration stands in for them before parsing.
GRAFANA_RANGES = re.compile(r"\$\{?__(?:rate_interval|interval|range)\b\}?")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    binary = shutil.which("promtool")
    if binary is None:
        _missing("promtool is missing: apt-get install prometheus (.ci/run does)")
        raise AssertionError("unreachable")
    result = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_accepts_the_configuration_and_the_rules(tmp_path: Path) -> None:
    # The scrape configuration reads the monitoring token from a file; give it one here.
    token = tmp_path / "monitoring-token"
    token.write_text("t0ken")
    config = (PROMETHEUS / "prometheus.yml").read_text()
    config = config.replace("/etc/prometheus/monitoring-token", str(token))
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")


def test_every_alert_fires_in_its_unit_test_and_the_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts - fired == set(), "alerts no test sees firing"
    # And a case where each one stays silent (below the threshold or within its `for`): an
    # expression that is always true would pass the firing cases alone.
    assert alerts - quiet == set(), "alerts no test sees staying silent"
    # What the issue asks to be alerted on is there.
    assert {"UpstreamDown", "High5xxRate", "LedgerBacklogOld", "LedgerDeadLetters",
            "RedisUnavailable", "QuotaAlertDeliveryFailing"} <= alerts  # fmt: skip


def gateway_series() -> set[str]:
    """Every series name the gateway's /metrics can show."""
    names = set()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def sglang_series() -> set[str]:
    with simulator() as url:
        text = httpx.get(f"{url}/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, with those a collapsed row keeps inside it."""
    return [
        panel
        for top in dashboard["panels"]
        for panel in [top, *top.get("panels", [])]
    ]  # fmt: skip


def expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    found = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [
        (f"panel {panel['title']}", target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    return found


def selected_metrics(expr: str) -> set[str]:
    """The metric names an expression selects, from PromQL's syntax tree (promql-parser, the
    Rust parser): every selector counts, whatever its name looks like, so a misspelt name cannot
    slip past. Raises ValueError on an expression Prometheus would reject."""
    try:
        import promql_parser
    except ImportError:
        pytest.fail("promql-parser is missing: pip install -e '.[dev]'")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            by_label = [
                m.value
                for m in node.matchers.matchers
                if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
            ]
            # A selector by regex over __name__ reads names nobody can check: not allowed.
            names.add(node.name or (by_label[0] if by_label else f"<unnamed: {node}>"))

    promql_parser.walk(promql_parser.parse(GRAFANA_RANGES.sub("5m", expr)), visit)
    return names


def test_selected_metrics_sees_every_selector() -> None:
    # The check below is only as good as this extraction: histograms, matchers, offsets,
    # binary operators, __name__ matchers and Grafana's variables.
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(sglang:queue_time_seconds_bucket{a="b"}'
        '[$__rate_interval]))) / on() group_left max({__name__="up", job="x"} offset 1m)'
        " > bool gatway_typo"
    )
    assert selected_metrics(expr) == {"sglang:queue_time_seconds_bucket", "up", "gatway_typo"}
    with pytest.raises(ValueError):
        selected_metrics("sum(rate(gateway_requests_total[5m])")


def test_every_metric_the_rules_and_the_dashboard_read_exists(sglang_series: set[str]) -> None:
    known = gateway_series() | sglang_series | {"up"}
    assert "gateway_upstream_up" in known and "sglang:num_queue_reqs" in known
    missing, invalid = [], []
    for where, expr in expressions():
        try:
            names = selected_metrics(expr)
        except ValueError as error:  # the dashboard's PromQL: promtool never sees it
            invalid.append((where, expr, str(error)))
            continue
        assert names, f"{where} reads no metric: {expr}"
        missing += [(where, name) for name in sorted(names - known)]
    assert invalid == []
    assert missing == []


def test_the_dashboard_imports_anywhere_and_ships_no_external_asset() -> None:
    text = DASHBOARD.read_text()
    dashboard: dict[str, Any] = json.loads(text)
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    # The same name as a datasource variable: file provisioning (no import form to fill in)
    # resolves ${DS_PROMETHEUS} through it to the default Prometheus.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in dashboard_panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    rows = {p["title"].split(" / ")[-1] for p in dashboard_panels(dashboard) if p["type"] == "row"}
    assert {"Traffic", "Latency", "Ledger", "Health", "SGLang"} <= rows
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert not re.search(r"https?://", text)

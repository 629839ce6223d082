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
METRIC_NAME = re.compile(r"\b(gateway_\w+|sglang:\w+|up)\b(?!\s*\()")


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
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts - fired == set(), "alerts no test sees firing"
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


def expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    found = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [
        (f"panel {panel['title']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    return found


def test_every_metric_the_rules_and_the_dashboard_read_exists(sglang_series: set[str]) -> None:
    known = gateway_series() | sglang_series | {"up"}
    assert "gateway_upstream_up" in known and "sglang:num_queue_reqs" in known
    missing = [
        (where, name)
        for where, expr in expressions()
        for name in METRIC_NAME.findall(re.sub(r"\{[^}]*\}|\"[^\"]*\"", "", expr))
        if name not in known
    ]
    assert missing == []


def test_the_dashboard_imports_anywhere_and_ships_no_external_asset() -> None:
    text = DASHBOARD.read_text()
    dashboard: dict[str, Any] = json.loads(text)
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert not re.search(r"https?://", text)

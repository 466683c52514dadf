"""Alert rules and dashboard: structure, metric names, runbooks; promtool when on PATH."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.metrics import Metrics
from tests.deploy.promql import DEPLOY, ROOT, metric_names_in_promql

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
# series that Prometheus itself makes for every target
PROMETHEUS_SERIES = {"up"}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            m = re.match(r"label_values\((.*),\s*\w+\)$", q["query"])
            assert m, q
            exprs.append(m.group(1))
    return exprs


def test_rules_structure() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names))
    rules = _rules()
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"Connector[A-Z][A-Za-z]+", r["alert"])
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook_url"} <= set(r["annotations"])


def test_the_brief_s_alerts_exist() -> None:
    exprs = {r["alert"]: r["expr"] for r in _rules()}
    wanted = {
        "ConnectorStalenessTargetMissed": {
            "connector_oldest_pending_change_age_seconds",
            "connector_max_staleness_seconds",
        },
        "ConnectorOutboxLagGrowing": {"connector_outbox_lag_events"},
        "ConnectorReplicationSlotLagGrowing": {"connector_replication_slot_lag_bytes"},
        "ConnectorOutboxNotPruned": {
            "connector_outbox_oldest_event_age_seconds",
            "connector_outbox_retention_seconds",
        },
        "ConnectorCreditsBelowReserve": {"connector_api_credits_below_reserve"},
        "ConnectorDeadLettersIncreasing": {"connector_dead_letters_total"},
        "ConnectorBulkJobStuck": {"connector_bulk_job_oldest_age_seconds"},
        "ConnectorDown": {"up"},
        "ConnectorNotReady": {"connector_ready"},
        "ConnectorTokenRefreshFailing": {"connector_token_refreshes_total"},
    }
    for alert, metrics in wanted.items():
        assert metrics <= metric_names_in_promql(exprs[alert]), alert


def test_alerts_use_only_exported_metrics() -> None:
    exported = Metrics().names() | PROMETHEUS_SERIES
    for r in _rules():
        used = metric_names_in_promql(r["expr"])
        assert used, r["alert"]
        assert used <= exported, (r["alert"], used - exported)


def test_runbooks_exist_in_operations_md() -> None:
    anchors = _anchors(OPERATIONS.read_text())
    for r in _rules():
        url = r["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", url
        assert anchor == r["alert"].lower(), url
        assert anchor in anchors, f"docs/operations.md has no section {r['alert']}"


def test_every_metric_is_documented_in_operations_md() -> None:
    text = OPERATIONS.read_text()
    for attr, obj in Metrics().metrics().items():
        name = f"connector_{attr}"
        assert re.search(rf"^\| `{name}` \| {obj._type} \|", text, re.M), name


def test_dashboard_uses_only_exported_metrics() -> None:
    exported = Metrics().names() | PROMETHEUS_SERIES
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    used: set[str] = set()
    for e in exprs:
        names = metric_names_in_promql(e)
        assert names, e
        assert names <= exported, (e, names - exported)
        used |= names
    # the brief's subjects are all on the dashboard
    for m in (
        "connector_oldest_pending_change_age_seconds",
        "connector_records_emitted_total",
        "connector_api_credits_spent_total",
        "connector_api_credits_budget",
        "connector_outbox_lag_seconds",
        "connector_api_retries_total",
        "connector_dead_letters_total",
        "connector_bulk_jobs_in_flight",
    ):
        assert m in used, m


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = []
    for p in dash["panels"]:
        ids.append(p["id"])
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_unit_tests() -> None:
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_check_config(tmp_path: Path) -> None:
    out = subprocess.run(
        [PROMTOOL, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL."""
    subst = {
        "$__rate_interval": "5m",
        "$__range": "6h",
        "$job": "connector",
        "$pipeline": "orders",
    }
    rules = []
    for i, e in enumerate(_dashboard_exprs()):
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, e
        rules.append({"record": f"dashboard:expr{i}", "expr": e})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr

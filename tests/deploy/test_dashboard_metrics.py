"""Every metric the dashboard and the alerts query is one the code exports: a renamed metric fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from common import telemetry
from common.telemetry import Telemetry
from reward_service.metrics import PoolMetrics

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_NAME = re.compile(r"\b(gdpo_[a-z0-9_]+)\b")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"


def exported_series() -> set[str]:
    """Sample names the driver's registry serves (its own metrics plus the reward pool's)."""
    driver = Telemetry()
    PoolMetrics(driver.registry)  # the reward pool registers into the driver's registry
    return _series(driver.registry)


def _series(registry: CollectorRegistry) -> set[str]:
    return {f"{family.name}{suffix}" for family in registry.collect() for suffix in _SUFFIXES[family.type]}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "gdpo.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queried_metrics_exist(source):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    queried = {name for expr in exprs for name in _NAME.findall(expr)}
    assert queried, "no gdpo_* metric found: the parser is wrong"
    missing = sorted(queried - exported_series())
    assert not missing, f"{source} queries metrics the code does not export: {missing}"


def test_a_renamed_metric_is_caught(monkeypatch):
    """What the test above relies on: renaming a gauge in the code removes its name from the exported set."""
    before = exported_series()
    gauges = {**telemetry.STEP_GAUGES, "loss": ("gdpo_training_loss", "renamed")}
    monkeypatch.setattr(telemetry, "STEP_GAUGES", gauges)
    after = exported_series()
    assert "gdpo_loss" in before and "gdpo_loss" not in after
    assert any("gdpo_loss" in e for e in alert_exprs() + dashboard_exprs())


def test_the_dashboard_is_importable_grafana_json():
    dashboard = json.loads((DEPLOY / "grafana" / "gdpo.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert all(t["refId"] for t in panel["targets"])
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]

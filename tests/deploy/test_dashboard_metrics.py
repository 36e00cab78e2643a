"""Every metric the dashboard and the alerts query is one the code exports: a renamed metric fails here."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from common import telemetry
from common.telemetry import Telemetry
from reward_service.metrics import PoolMetrics

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_NAME = re.compile(r"\b(gdpo_[a-z0-9_]+)\b")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
# The labels Prometheus adds to every scraped series (the dashboard must not join across them by accident).
_TARGET_LABELS = {"job": "gdpo", "instance": "driver:9464"}


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


def synthetic_series() -> list[str]:
    """Every series the driver serves once each labelled metric has two children, with the target labels."""
    driver = Telemetry()
    pool = PoolMetrics(driver.registry)
    metrics = [m for owner in (driver, pool) for m in vars(owner).values() if isinstance(m, MetricWrapperBase)]
    for metric in metrics:
        names = metric._labelnames  # prometheus-client has no public accessor for a metric's label names
        for value in ("a", "b") if names else ():
            metric.labels(**{name: value for name in names})  # creates the child series
    series = []
    for family in driver.registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                labels = {**sample.labels, **_TARGET_LABELS}
                series.append(sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}")
    return series


def _dashboard_queries_test(exprs: list[str]) -> dict:
    """A promtool unit test: on rising synthetic series, each expression returns at least one sample."""
    inputs = [{"series": name, "values": "0+1x20"} for name in synthetic_series()]
    # count() of a non-empty result is >= 1 (NaN values count too), of an empty one is empty.
    one = [{"labels": "{}", "value": 1}]
    checks = [{"expr": f"clamp_max(count(({expr})), 1)", "eval_time": "10m", "exp_samples": one} for expr in exprs]
    return {"tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": checks}]}


def _run_promtool_test(promtool: str, tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess:
    test_file = tmp_path / "dashboard_test.yml"
    test_file.write_text(yaml.safe_dump(_dashboard_queries_test(exprs), width=1000))
    return subprocess.run([promtool, "test", "rules", str(test_file)], check=False, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_every_dashboard_query_returns_data(promtool, tmp_path):
    """A query can name only exported metrics and still match nothing (a join across different labels)."""
    out = _run_promtool_test(promtool, tmp_path, dashboard_exprs())
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_label_mismatch_in_a_query_is_caught(promtool, tmp_path):
    """What the test above relies on: a gauge without labels plus a sum() (labels differ) matches nothing."""
    out = _run_promtool_test(promtool, tmp_path, ["gdpo_reward_pending_batches + sum(gdpo_reward_queue_depth)"])
    assert out.returncode != 0 and "gdpo_reward_pending_batches" in out.stdout + out.stderr

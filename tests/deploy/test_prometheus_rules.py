"""Prometheus config and alert rules: promtool checks them, and every alert has a unit test that fires it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, check=False, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_promtool_check_config(promtool):
    out = _promtool(promtool, "check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules(promtool):
    out = _promtool(promtool, "check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def test_promtool_unit_tests_pass(promtool):
    out = _promtool(promtool, "test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_silent_case():
    alerts = {r["alert"] for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}  # fmt: skip
    assert {"GDPOLearnerStalled", "GDPORewardWorkerRestarts", "GDPOPolicyStaleness", "GDPONonFiniteGroups",
            "GDPOZeroVarianceGroups"} <= alerts  # the list: stall, reward restarts, staleness, NaN, zero var
    fired, silent = set(), set()
    for test in yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert fired == alerts, f"alerts never shown to fire: {sorted(alerts - fired)}"
    assert silent == alerts, f"alerts never shown to stay silent: {sorted(alerts - silent)}"


@pytest.mark.parametrize(
    "term",
    ["increase(gdpo_learner_nonfinite_steps_total[10m]) > 0\n          or ",  # the skipped-steps counter
     " or abs(gdpo_loss) == Inf", " or abs(gdpo_grad_norm) == Inf",  # infinities (not caught by x != x)
     "or abs(gdpo_loss) != abs(gdpo_loss) "],  # NaN
)  # fmt: skip
def test_a_broken_rule_fails_the_unit_tests(promtool, tmp_path, term):
    """The unit tests can fail: drop one condition of the non-finite alert and promtool reports it."""
    for name in ("alerts.yml", "alerts_test.yml"):
        (tmp_path / name).write_text((PROMETHEUS_DIR / name).read_text())
    rules = tmp_path / "alerts.yml"
    assert term in rules.read_text()
    rules.write_text(rules.read_text().replace(term, "", 1))
    assert _promtool(promtool, "check", "rules", str(rules)).returncode == 0, "the broken rule still parses"
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, check=False,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "GDPONonFiniteLoss" in out.stdout + out.stderr

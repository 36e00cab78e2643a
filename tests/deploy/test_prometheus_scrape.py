"""A real Prometheus on 127.0.0.1 scrapes a short training run, loads the alert rules and answers a rate."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from rollout.driver import train
from rollout.job import load_job

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read().decode())


@pytest.fixture
def prometheus(prometheus_binary, tmp_path):
    """Prometheus scraping 127.0.0.1:<metrics port> every second; stopped (and its data removed) after."""
    metrics_port, web_port = _free_port(), _free_port()
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "gdpo", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{api}/-/ready", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.5)
        yield api, metrics_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_scrapes_a_run_and_computes_its_sample_rate(prometheus, tmp_path):
    api, port = prometheus
    overrides = [f"run.output_dir={tmp_path / 'run'}", "run.steps=4", "run.sample_grid=false",
                 f"metrics.port={port}", "metrics.final_scrape_s=3", "metrics.tensorboard=false"]  # fmt: skip
    job = load_job("tiny", overrides)
    train(job)  # returns after the final-scrape grace: the last values were scraped
    end = time.time()

    def query(expr: str) -> list[dict]:
        body = _get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": end}))
        assert body["status"] == "success", body
        return body["data"]["result"]

    (total,) = query("max_over_time(gdpo_samples_total[10m])")
    assert float(total["value"][1]) == 4 * 2 * 4  # steps x groups_per_step x G, all scraped after the last step
    (step,) = query("max_over_time(gdpo_learner_step[10m])")
    assert float(step["value"][1]) == 4
    (rate,) = query("max_over_time(rate(gdpo_samples_total[15s])[10m:1s])")
    assert float(rate["value"][1]) > 0, "Prometheus saw the samples counter rise"
    groups = _get(f"{api}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups if g["name"] == "gdpo-sr" for r in g["rules"]]
    assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules

"""The job config: shipped configs, overrides, rejection of bad keys, and both ways to start the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import SHIPPED_CONFIGS
from rollout.cli import pool_requests
from rollout.job import JobConfig, load_job

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", [n for n in SHIPPED_CONFIGS if not n.endswith("_pretrain")])
def test_shipped_configs_build(name):
    job = load_job(name)
    assert isinstance(job, JobConfig)
    assert job.learner.loss.omega == 5000.0 and job.model.t_add == 250 and job.model.t_diff == 100


def test_paper_config_holds_the_papers_hyperparameters():
    job = load_job("paper")
    lc = job.learner
    assert (lc.lr, lc.betas, lc.weight_decay, lc.eps, lc.grad_clip) == (5e-5, (0.9, 0.999), 1e-2, 1e-8, 1.0)
    assert (job.rollout.group_size, job.run.groups_per_step, job.run.steps) == (6, 8, 1500)
    assert (job.model.lora_rank, job.model.lora_alpha, lc.precision) == (4, 8.0, "fp16")
    assert job.reward.nr_metrics == ("musiq", "maniqa") and job.reward.fr_metrics == ("psnr_y",)
    assert job.cluster.learner.num_ranks == 8


def test_overrides_and_errors_name_the_key():
    job = load_job("tiny", ["learner.lr=1e-5", "cluster.rollout.num_workers=3", "rollout.sample_from=policy"])
    assert (job.learner.lr, job.cluster.rollout.num_workers, job.rollout.sample_from) == (1e-5, 3, "policy")
    with pytest.raises(ValueError, match=r"learner\.lrr"):
        load_job("tiny", ["learner.lrr=1"])
    with pytest.raises(ValueError, match=r"rollout\.group_size: expected int"):
        load_job("tiny", ["rollout.group_size=six"])
    with pytest.raises(ValueError, match="divide evenly"):
        load_job("tiny", ["run.groups_per_step=3", "cluster.learner.num_ranks=2"])
    assert sum(p.total["CPU"] for p in pool_requests(load_job("tiny").cluster)) == 3


@pytest.mark.parametrize("entry", [["-m", "rollout"], ["rollout/"]])
def test_cli_prints_the_resolved_config_both_ways(entry):
    out = subprocess.run(
        [sys.executable, *entry, "--dry-run", "--print-config", "learner.lr=2e-5"],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert yaml.safe_load(out.stdout)["learner"]["lr"] == 2e-5


def test_cli_reports_config_errors_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "rollout", "--dry-run", "nope.key=1"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "config error: unknown config key(s) nope" in out.stderr
    assert "Traceback" not in out.stderr

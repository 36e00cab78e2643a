"""The dry run submitted as a real Ray job to a cluster of its own (``ray start --head`` on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from ray_nodes import agent_port_args, free_ports, ray_env, start_node, stop_node, wait_until  # tests/rollout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    """A separate single-node cluster of our own (ray_nodes.start_node), stopped with its process group."""
    gcs, dashboard, client = free_ports(3)
    env = ray_env()
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray puts sockets under it
    log = temp_dir / "head.log"
    head = start_node(
        ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", *agent_port_args(), "--num-cpus=4",
         f"--temp-dir={temp_dir}"],
        log,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        probe = ["ray", "job", "list", "--address", address]
        wait_until(lambda: subprocess.run(probe, check=False, env=env, capture_output=True).returncode == 0,
                   [head], [log], "the Ray head")  # fmt: skip
        yield address, env
    finally:
        stop_node(head)


@pytest.mark.slow
def test_dry_run_submitted_with_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "job-run"
    cmd = [
        "ray", "job", "submit", "--address", address, "--runtime-env", "deploy/runtime_env.yaml", "--",
        "python", "-m", "rollout", "--dry-run", "run.steps=2", f"run.output_dir={out}",
    ]  # fmt: skip
    job = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log and "step 2 |" in log
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "samples.png").is_file()


@pytest.mark.slow
def test_pretraining_submitted_through_submit_sh(ray_head, tmp_path):
    """NAOSD pre-training under `ray job submit`, via deploy/submit.sh with ENTRY=learner.pretrain."""
    address, env = ray_head
    out = tmp_path / "pretrain-run"
    overrides = ["--config", "tiny_pretrain", "run.steps=2", "run.log_every=1", f"run.output_dir={out}",
                 "data.crop_size=16", "pretrain.batch_size=4", "metrics.enabled=false"]  # fmt: skip
    job = subprocess.run(  # from another folder: submit.sh uploads its own repository
        ["bash", str(REPO / "deploy" / "submit.sh"), *overrides], check=False, cwd=tmp_path, capture_output=True,
        text=True, env={**env, "RAY_ADDRESS": address, "ENTRY": "learner.pretrain"}, timeout=600,
    )  # fmt: skip
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log and "pretrain step 2/2" in log
    assert (out / "naosd" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_a_relative_output_dir_is_refused_under_ray_job_submit(ray_head):
    """It would land in Ray's temporary copy of the working directory: a config error before any actor starts."""
    address, env = ray_head
    cmd = [
        "ray", "job", "submit", "--address", address, "--runtime-env", "deploy/runtime_env.yaml", "--",
        "python", "-m", "rollout", "--dry-run", "run.steps=1", "run.output_dir=runs/relative",
    ]  # fmt: skip
    job = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = job.stdout + job.stderr
    assert job.returncode != 0 and "config error: run.output_dir='runs/relative' is relative" in log, log[-4000:]

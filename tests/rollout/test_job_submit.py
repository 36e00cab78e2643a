"""The dry run submitted as a real Ray job to a cluster of its own (``ray start --head`` on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A separate single-node cluster; `--block` ties its processes to ours, so killing it stops them all."""
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # the same for `ray start` and `ray job submit`
    # The `ray` command of this interpreter's environment, also when that environment is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray puts sockets under it
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in the finally below
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp_dir}"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run(
                ["ray", "job", "list", "--address", address], check=False, env=env, capture_output=True
            )
            if probe.returncode == 0:
                break
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the cluster it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()


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

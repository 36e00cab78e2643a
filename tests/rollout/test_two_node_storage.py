"""Run storage on a two-node Ray cluster: the learner checkpoints from one node, a later run resumes on another.

Two `ray start` nodes on 127.0.0.1, each started in its own working folder. ``run.storage`` is a
``file://`` URI, which takes the same pyarrow.fs code path as ``s3://`` or ``gs://``: ranks stage
on their own disk and upload, and nothing is expected to be shared but the storage.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ray_nodes import agent_port_args, free_ports, ray_env, start_node, stop_node, wait_until  # tests/rollout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes():
    """A head (``head_slot``) and a worker (``worker_slot``) node; returns the GCS address."""
    (gcs,) = free_ports(1)
    root = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray puts sockets under it
    (root / "head").mkdir(), (root / "worker").mkdir()
    logs = [root / "head.log", root / "worker.log"]
    nodes = [start_node(["--head", f"--port={gcs}", "--include-dashboard=false", "--num-cpus=3",
                         '--resources={"head_slot": 2}', *agent_port_args(), f"--temp-dir={root / 'ray'}"],
                        logs[0], cwd=root / "head")]  # fmt: skip
    try:
        address = f"127.0.0.1:{gcs}"
        status = ["ray", "status", "--address", address]

        def count_nodes() -> int:
            probe = subprocess.run(status, check=False, env=ray_env(), capture_output=True, text=True)
            return probe.stdout.count("node_") if probe.returncode == 0 else 0

        wait_until(lambda: count_nodes() >= 1, nodes, logs[:1], "the Ray head")
        nodes.append(start_node([f"--address={address}", "--num-cpus=1", '--resources={"worker_slot": 1}',
                                 *agent_port_args()], logs[1], cwd=root / "worker"))  # fmt: skip
        wait_until(lambda: count_nodes() >= 2, nodes, logs, "the worker node")
        yield address
    finally:
        for node in reversed(nodes):
            stop_node(node)


def _train(address: str, out: Path, storage: str, steps: int, learner_slot: str) -> str:
    cmd = [
        sys.executable, "-m", "rollout", "--config", "tiny", "--address", address, f"run.steps={steps}",
        f"run.output_dir={out}", f"run.storage={storage}", "run.resume=true", "learner.checkpoint_every=0",
        "metrics.enabled=false",
        "cluster.rollout.resources={head_slot: 0.5}", "cluster.reward.resources={head_slot: 0.5}",
        f"cluster.learner.resources={{{learner_slot}: 1}}",
    ]  # fmt: skip
    run = subprocess.run(cmd, check=False, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_resume_on_another_node_finds_the_checkpoint_in_run_storage(two_nodes, tmp_path):
    store = tmp_path / "store"
    storage = f"file://{store}"
    first = _train(two_nodes, tmp_path / "first", storage, 2, "worker_slot")  # the learner on the worker node
    assert "resumed" not in first and "step 2 |" in first
    assert (store / "checkpoints" / "checkpoint-2" / "MANIFEST.json").is_file()
    assert (store / "checkpoints" / "latest").read_text() == "checkpoint-2\n"
    assert not (tmp_path / "first" / "checkpoints").exists()  # checkpoints went to storage, not to a node's disk
    for name in ("config.yaml", "samples.png"):  # the driver's outputs are mirrored there
        assert (store / name).is_file(), name
    assert list((store / "tensorboard").rglob("events.out.tfevents.*"))

    # A second run in another folder, its learner on the head node: only the storage connects the two.
    second = _train(two_nodes, tmp_path / "second", storage, 3, "head_slot")
    assert "resumed from checkpoint-2 at step 2" in second and "step 3 |" in second
    assert (store / "checkpoints" / "checkpoint-3" / "MANIFEST.json").is_file()
    assert sorted(p.name for p in store.glob("config*.yaml"))[0].startswith("config.2")  # the old config kept

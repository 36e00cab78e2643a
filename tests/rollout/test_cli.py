"""The training CLI before any actor starts: which Ray it joins, resource checks, config and path errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import ray_session
from common.preflight import missing_paths
from common.ray_session import PoolRequest, RaySettings, ResourceError, check_resources, pool_request
from rollout.cli import check_paths, pool_requests
from rollout.job import load_job

REPO = Path(__file__).resolve().parents[2]
NODE = {"CPU": 8.0, "GPU": 1.0, "gdpo_rollout": 1.0}


def _run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "rollout", *args]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_pool_requests_carry_cpus_gpus_and_custom_resources():
    job = load_job("tiny", ["cluster.learner.num_ranks=2", "cluster.learner.num_cpus=2",
                            "cluster.rollout.resources={gdpo_rollout: 1}", "cluster.reward.num_gpus=0.5"])  # fmt: skip
    rollout, reward, learner = pool_requests(job.cluster)
    assert (rollout.name, rollout.count, dict(rollout.per_actor)) == ("rollout", 1, {"CPU": 1.0, "gdpo_rollout": 1.0})
    assert dict(reward.per_actor) == {"CPU": 1.0, "GPU": 0.5}
    assert learner.total == {"CPU": 4.0}
    with pytest.raises(ValueError, match=r"resources: GPU is set by num_cpus/num_gpus"):
        load_job("tiny", ["cluster.learner.resources={GPU: 1}"])


def test_a_pool_that_fits_passes():
    pools = [pool_request("rollout", 1, num_cpus=4, num_gpus=1, resources={"gdpo_rollout": 1})]
    check_resources(pools, NODE, [NODE])


def test_a_pool_no_node_can_hold_is_named_with_what_exists():
    pools = [pool_request("learner", 8, num_cpus=4, num_gpus=1, resources={})]
    with pytest.raises(ResourceError) as err:
        check_resources(pools, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert str(err.value).startswith(
        "pool 'learner' asks for {CPU: 4, GPU: 1} per actor, and no node has that much (largest node: {CPU: 2, GPU: 0})"
    )


def test_a_pool_larger_than_the_cluster_is_named_with_its_total():
    pools = [pool_request("rollout", 3, num_cpus=4, num_gpus=1, resources={"gdpo_rollout": 1})]
    with pytest.raises(ResourceError, match=r"^pool 'rollout' asks for 3 x \{CPU: 4, GPU: 1, gdpo_rollout: 1\} = "
                       r"\{CPU: 12, GPU: 3, gdpo_rollout: 3\}; the cluster has \{CPU: 8, GPU: 1, gdpo_rollout: 1\}"):
        check_resources(pools, NODE, [NODE])  # fmt: skip


def test_pools_that_fit_alone_but_not_together_are_refused():
    pools = [PoolRequest("rollout", 1, {"CPU": 6.0}), PoolRequest("reward", 1, {"CPU": 4.0})]
    with pytest.raises(ResourceError, match=r"pools rollout, reward together ask for \{CPU: 10\}"):
        check_resources(pools, {"CPU": 8.0}, [{"CPU": 8.0}])


def test_autoscale_prints_the_shortfall_instead_of_failing(capsys):
    pools = [pool_request("learner", 8, num_cpus=4, num_gpus=1, resources={})]
    check_resources(pools, {"CPU": 2.0}, [{"CPU": 2.0}], autoscale=True)
    assert "waiting for the autoscaler (--autoscale)" in capsys.readouterr().out


class _FakeRay:
    """Records how init_ray called ray.init (no Ray is started)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.custom: dict[str, float] = {}

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        self.custom = kwargs.get("resources") or {}
        return type("Ctx", (), {"address_info": {"gcs_address": "10.0.0.1:6379"}})()

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 16.0, "node:10.0.0.1": 1.0, **self.custom}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 16.0, **self.custom}}]


@pytest.fixture
def fake_ray(monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    return fake


def test_no_address_starts_a_private_ray_never_a_running_one(fake_ray, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_session.init_ray(RaySettings(), [PoolRequest("learner", 1, {"CPU": 1.0, "gdpo_learner": 1.0})])
    (call,) = fake_ray.calls
    assert call["address"] == "local"  # "auto" or None would attach to a Ray found on this host
    assert call["resources"] == {"gdpo_learner": 1.0}  # a single node plays every pool's role
    assert "started a private local Ray" in capsys.readouterr().out


def test_ray_address_joins_that_cluster_and_says_which(fake_ray, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray_session.init_ray(RaySettings(), [PoolRequest("learner", 1, {"CPU": 1.0})])
    assert fake_ray.calls == [{"address": "10.0.0.1:6379"}]
    out = capsys.readouterr().out
    assert "joined Ray cluster 10.0.0.1:6379 (RAY_ADDRESS: 10.0.0.1:6379); cluster has {CPU: 16}" in out


def test_explicit_address_wins_and_resources_are_checked_after_joining(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:6379")
    with pytest.raises(ResourceError, match="pool 'learner'"):
        ray_session.init_ray(RaySettings(address="10.0.0.1:6379"), [PoolRequest("learner", 1, {"CPU": 32.0})])
    assert fake_ray.calls == [{"address": "10.0.0.1:6379"}]


def test_missing_paths_name_the_key(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    problems = missing_paths(sd_dirs={"model.sd_path": str(tmp_path / "sd")}, dirs={"data.hr_dir": "/nope"},
                             paths={"model.naosd_path": ""})  # fmt: skip
    assert problems == [
        "data.hr_dir=/nope: no such folder",
        f"model.sd_path={tmp_path / 'sd'}: not a diffusers SD folder (no vae, text_encoder, tokenizer, scheduler)",
    ]


def test_rfsr_weight_paths_are_checked_before_ray(tmp_path, capsys):
    """objective=reward_feedback: the VGG16 file (features=vgg16) and the metric's weights_dir must exist."""
    rfsr = ["learner.reward_feedback.features=vgg16", f"learner.reward_feedback.vgg_weights_path={tmp_path}",
            "learner.reward_feedback.weights_dir=/no/pyiqa"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        check_paths(load_job("tiny_rfsr", rfsr))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "config error: learner.reward_feedback.weights_dir=/no/pyiqa: no such folder; "
        f"learner.reward_feedback.vgg_weights_path={tmp_path}: no such file"
    )
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"")
    (tmp_path / "pyiqa").mkdir()
    check_paths(load_job("tiny_rfsr", [rfsr[0], f"learner.reward_feedback.vgg_weights_path={weights}",
                                       f"learner.reward_feedback.weights_dir={tmp_path / 'pyiqa'}"]))  # fmt: skip
    # features=tiny_conv never reads the VGG file; another objective never reads either
    check_paths(load_job("tiny_rfsr", ["learner.reward_feedback.vgg_weights_path=/no/vgg.pth"]))
    check_paths(load_job("tiny", ["learner.reward_feedback.vgg_weights_path=/no/vgg.pth",
                                  "learner.reward_feedback.weights_dir=/no/pyiqa"]))  # fmt: skip


def test_a_missing_rfsr_vgg_file_is_a_one_line_config_error_before_ray():
    out = _run_cli("--config", "tiny_rfsr", "learner.reward_feedback.features=vgg16",
                   "learner.reward_feedback.vgg_weights_path=/no/vgg16.pth")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "config error: learner.reward_feedback.vgg_weights_path=/no/vgg16.pth: no such file"
    )
    assert "ray:" not in out.stdout and "Traceback" not in out.stderr


def test_yaml_with_a_python_tag_is_a_one_line_config_error(tmp_path):
    bad = tmp_path / "job.yaml"
    marker = tmp_path / "pwned"
    bad.write_text(f'run: !!python/object/apply:os.system ["touch {marker}"]\n')
    out = _run_cli("--config", str(bad))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("config error: not valid YAML")
    assert "Traceback" not in out.stderr and not marker.exists()


def test_a_wrong_model_path_fails_before_ray_starts():
    out = _run_cli("--dry-run", "model.source=pretrained", "model.sd_path=/no/such/sd")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "config error: model.sd_path=/no/such/sd: no such folder"
    assert "ray:" not in out.stdout and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_gpu_pool_on_a_cpu_ray_fails_at_once_naming_the_pool():
    """The issue's silent hang: num_gpus=1 on a CPU-only Ray waited 600 s; now it is refused at start."""
    start = time.monotonic()
    out = _run_cli("--dry-run", "cluster.rollout.num_gpus=1", "run.output_dir=/tmp/gdpo-cli-never-written")
    seconds = time.monotonic() - start
    assert out.returncode == 3, out.stdout + out.stderr
    assert "started a private local Ray" in out.stdout
    assert ("resource error: pool 'rollout' asks for {CPU: 1, GPU: 1} per actor, and no node has that much "
            "(largest node: {CPU: ") in out.stderr  # fmt: skip
    assert "Traceback" not in out.stderr and seconds < 120
    assert not Path("/tmp/gdpo-cli-never-written").exists()

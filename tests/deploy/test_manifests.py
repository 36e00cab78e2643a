"""Deploy artefacts parsed and checked: the KubeRay RayJob, the `ray up` cluster, the image, the submit script.

A real Kubernetes cluster and GPUs are not available here: these tests check what KubeRay and Ray would
read (required fields, custom resources, mounts) and that the paper job's pools fit each declared cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.ray_session import check_resources
from rollout.cli import pool_requests
from rollout.job import JobConfig, load_job

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
POOL_RESOURCES = {"rollout": "gdpo_rollout", "reward": "gdpo_reward", "learner": "gdpo_learner"}
# The shipped configs that run the whole pipeline at paper scale on a cluster (paper_pretrain: learner only).
PAPER_SCALE_GDPO_JOBS = ["paper", "dpo", "oars", "rfsr"]


def _rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())


def _entrypoint_job(entrypoint: str) -> JobConfig:
    args = shlex.split(entrypoint)
    assert args[:4] == ["python", "-m", "rollout", "--config"], args
    return load_job(args[4], args[5:])


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _group_node(group: dict) -> dict[str, float]:
    """The Ray resources one pod of a KubeRay group declares (what `ray start` on it gets)."""
    params = group["rayStartParams"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    node = {"CPU": _cpu(params.get("num-cpus", limits["cpu"])), "GPU": float(params.get("num-gpus", 0))}
    if "resources" in params:  # KubeRay passes it to `ray start --resources` as a quoted JSON string
        node.update(json.loads(json.loads(params["resources"])))
    return node


def test_rayjob_has_the_fields_kuberay_requires():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    ray_pin = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert cluster["rayVersion"] == ray_pin
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    images = set()
    for group in [head, *cluster["workerGroupSpecs"]]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        images.update(c["image"] for c in containers)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
    assert len(images) == 1, f"every pod runs the same image: {images}"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == _entrypoint_job(spec["entrypoint"]).metrics.port == 9464
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379


def test_each_pool_has_its_own_worker_group_and_the_paper_job_fits():
    spec = _rayjob()["spec"]
    job = _entrypoint_job(spec["entrypoint"])
    assert job.metrics.host == "0.0.0.0", "a cluster config must bind the metrics where Prometheus can reach them"
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == set(POOL_RESOURCES)
    nodes = [_group_node(spec["rayClusterSpec"]["headGroupSpec"])]
    for pool, resource in POOL_RESOURCES.items():
        assert dict(getattr(job.cluster, pool).resources) == {resource: 1.0}, pool
        holders = [name for name, g in groups.items() if resource in _group_node(g)]
        assert holders == [pool], f"{resource} must be declared by the {pool} group only, not {holders}"
        gpus = groups[pool]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert float(gpus) == _group_node(groups[pool])["GPU"], "the pod's GPU limit is what Ray is told"
        nodes += [_group_node(groups[pool])] * groups[pool]["replicas"]
    assert nodes[0]["CPU"] == 0, "the head runs the driver only"
    total = {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}
    check_resources(pool_requests(job.cluster), total, nodes)  # raises ResourceError if a pool does not fit


def test_the_driver_pod_mounts_every_path_the_entrypoint_names():
    spec = _rayjob()["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for m in head["containers"][0]["volumeMounts"]]
    paths = [v for v in re.findall(r"=(\S+)", spec["entrypoint"]) if v.startswith("/")]
    assert paths
    for path in paths:  # the driver checks these before Ray starts (common.preflight)
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"]}
    assert claims == {"gdpo-models", "gdpo-runs"}


def test_podmonitor_selects_the_driver_pod_and_port():
    monitor = yaml.safe_load((DEPLOY / "kuberay" / "podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= head["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # The job label Prometheus gives the driver's series must be one GDPOMetricsDown's `up{job=~...}` selects.
    job = head["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    job_regex = re.search(r'up\{job=~"([^"]+)"\}', alerts).group(1)
    for name in (job, f"default/{monitor['metadata']['name']}"):  # the jobLabel's, the Operator's default
        assert re.fullmatch(job_regex, name), f"GDPOMetricsDown never matches job={name!r}"


@pytest.mark.parametrize("config_name", PAPER_SCALE_GDPO_JOBS)
def test_ray_up_cluster_declares_the_pool_resources_and_holds_each_paper_scale_job(config_name):
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    job = load_job(config_name, ["model.sd_path=/models/sd"])
    for pool, resource in POOL_RESOURCES.items():  # without it a pool may land on any node, the head included
        assert dict(getattr(job.cluster, pool).resources) == {resource: 1.0}, f"{config_name}: cluster.{pool}"
    nodes = []
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            assert not any(r in node_type["resources"] for r in POOL_RESOURCES.values()), "no pool on the head"
            continue
        declared = [r for r in POOL_RESOURCES.values() if r in node_type["resources"]]
        assert len(declared) == 1, f"{name} must declare exactly one pool resource, not {declared}"
        nodes += [node_type["resources"]] * node_type["min_workers"]
    total = {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}
    check_resources(pool_requests(job.cluster), total, nodes)
    assert config["docker"]["image"].rsplit(":", 1)[1] != "latest"


def test_dockerfile_is_pinned_and_installs_from_the_constraints():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", base), base
    constraints = (REPO / "constraints.txt").read_text()
    cuda_major = base.split(":")[1].split(".")[0]
    assert f"-cu{cuda_major}==" in constraints, "the base's CUDA must match the torch wheels' CUDA libraries"
    installs = re.findall(r"pip install [^\n]*\.(?:\s|$)", text)
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "python3.11" in text  # the interpreter the pins were verified with
    assert ":latest" not in text


def _dockerfile_runs() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", "")  # Docker joins continued lines
    return [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ")]


@pytest.mark.slow
def test_the_image_check_passes_on_a_non_editable_install_outside_the_tree(tmp_path):
    """The Dockerfile's last check as the image runs it: from /, on the installed package (configs, tiny model)."""
    (run,) = [r for r in _dockerfile_runs() if "--no-deps" in r]
    _, check = run.split(" && cd / && ", 1)  # not from the source tree, which would shadow the package
    assert check.startswith("python -c ") and "build_naosd" in check and "load_job" in check, check
    src, site = tmp_path / "src", tmp_path / "site"
    for package in ("common", "sr_data", "sr_tools", "rollout", "learner", "reward_service"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target",
                    str(site), str(src)], check=True, timeout=300, capture_output=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import common; print(common.__file__)"], cwd="/", env=env,
                           check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert where.stdout.strip() == str(site / "common" / "__init__.py")
    python_c = shlex.split(check)  # ["python", "-c", code]
    out = subprocess.run([sys.executable, *python_c[1:]], cwd="/", env=env, check=False, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_submit_script_works_from_any_directory(tmp_path):
    """deploy/submit.sh from another folder: `ray job submit` gets the repository, not the caller's folder."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    ray = fake_bin / "ray"
    ray.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RAY_ARGS_FILE"\n')
    ray.chmod(0o755)
    args_file, elsewhere = tmp_path / "args.txt", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RAY_ARGS_FILE": str(args_file),
           "RAY_ADDRESS": "http://head:8265"}  # fmt: skip
    subprocess.run(["bash", str(DEPLOY / "submit.sh"), "--config", "paper", "learner.lr=1e-5"], cwd=elsewhere,
                   env=env, check=True, timeout=60)  # fmt: skip
    args = args_file.read_text().splitlines()
    assert args[:3] == ["job", "submit", "--address"] and args[3] == "http://head:8265"
    assert args[args.index("--working-dir") + 1] == str(REPO)
    assert args[args.index("--runtime-env") + 1] == str(DEPLOY / "runtime_env.yaml")
    assert args[args.index("--") :] == ["--", "python", "-m", "rollout", "--config", "paper", "learner.lr=1e-5"]


@pytest.mark.parametrize("name", [*PAPER_SCALE_GDPO_JOBS, "paper_pretrain"])
def test_cluster_configs_bind_metrics_for_prometheus_and_defaults_stay_on_loopback(name):
    from common.config import load_mapping
    from common.telemetry import MetricsConfig

    metrics = load_mapping(name)["metrics"]
    assert metrics["host"] == "0.0.0.0" and metrics["final_scrape_s"] >= 15
    assert MetricsConfig().host == "127.0.0.1" and load_job("tiny").metrics.host == "127.0.0.1"

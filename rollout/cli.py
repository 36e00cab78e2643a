"""Command line of the training job: pick a config, apply overrides, start or join Ray, train."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.job import ClusterConfig, JobConfig

DRY_RUN_OVERRIDES = ()  # the tiny config already is the dry run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rollout",
        description="GDPO-SR: online RL of a one-step diffusion SR model on Ray + DeepSpeed.",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. learner.lr=1e-5"
    )
    parser.add_argument("--config", default=None, help="shipped config (tiny, paper) or a YAML/TOML file")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the tiny config (unless --config is given) on a local single-node Ray, on CPU",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import yaml

    from common.config import to_mapping
    from rollout.job import load_job

    source = args.config or ("tiny" if args.dry_run else None)
    if source is None:
        raise SystemExit("give --config tiny|paper|FILE, or --dry-run")
    try:
        job = load_job(source, args.overrides)
    except ValueError as err:
        raise SystemExit(f"config error: {err}") from None
    if args.print_config:
        print(yaml.safe_dump(to_mapping(job), sort_keys=False))
        return 0
    _init_ray(job, local=args.dry_run)
    from rollout.driver import train

    start = time.perf_counter()
    summary = train(job)
    seconds = time.perf_counter() - start
    print(f"done: {summary.get('step', 0):.0f} steps in {seconds:.1f} s; outputs in {job.run.output_dir}")
    return 0


def _init_ray(job: JobConfig, *, local: bool) -> None:
    import ray
    import torch

    if ray.is_initialized():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo, no CUDA probing
    address = job.cluster.ray_address
    if local and not address and "RAY_ADDRESS" not in os.environ:
        # A private single-node Ray on loopback, no dashboard; workers inherit this environment.
        env_vars = {
            k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR") if k in os.environ
        }
        # Enough logical CPU slots for every pool: the pools share this machine's cores anyway.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed(job.cluster))),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env_vars},
        )
    else:
        # Inside `ray job submit` (RAY_ADDRESS is set) or on a cluster node: the job's runtime_env applies.
        ray.init(address=address or "auto")


def cpus_needed(cluster: ClusterConfig) -> float:
    """CPU slots the three pools reserve together."""
    rollout, reward, learner = cluster.rollout, cluster.reward, cluster.learner
    return (
        rollout.num_workers * rollout.num_cpus
        + reward.num_workers * reward.num_cpus
        + learner.num_ranks * learner.num_cpus
    )

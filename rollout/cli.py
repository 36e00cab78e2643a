"""Command line of the training job: pick a config, apply overrides, start or join Ray, train."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.job import ClusterConfig

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
    from common.ray_session import init_ray
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
    init_ray(job.cluster.ray_address, local=args.dry_run, num_cpus=cpus_needed(job.cluster))
    from rollout.driver import train

    start = time.perf_counter()
    summary = train(job)
    seconds = time.perf_counter() - start
    print(f"done: {summary.get('step', 0):.0f} steps in {seconds:.1f} s; outputs in {job.run.output_dir}")
    return 0


def cpus_needed(cluster: ClusterConfig) -> float:
    """CPU slots the three pools reserve together."""
    rollout, reward, learner = cluster.rollout, cluster.reward, cluster.learner
    return (
        rollout.num_workers * rollout.num_cpus
        + reward.num_workers * reward.num_cpus
        + learner.num_ranks * learner.num_cpus
    )

"""Command line of the training job: pick a config, apply overrides, start or join Ray, train."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.ray_session import add_ray_arguments

if TYPE_CHECKING:
    from common.ray_session import PoolRequest
    from rollout.job import ClusterConfig, JobConfig
    from rollout.validation import ValidationConfig

RESOURCE_ERROR_EXIT = 3  # the cluster cannot hold the pools (config errors exit with 2)


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
        help="run the tiny config (unless --config is given), on CPU; on a private local Ray unless an address "
        "is given (--address, RAY_ADDRESS)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_ray_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import yaml

    from common.config import to_mapping
    from common.preflight import load_or_exit
    from rollout.job import load_job

    source = args.config or ("tiny" if args.dry_run else None)
    if source is None:
        raise SystemExit("give --config tiny|paper|FILE, or --dry-run")
    job = load_or_exit(lambda: load_job(source, args.overrides))
    if args.print_config:
        print(yaml.safe_dump(to_mapping(job), sort_keys=False))
        return 0
    check_paths(job)  # before Ray: a wrong path is a one-line config error, not an actor's traceback
    check_resume_or_exit(job)  # before Ray too: a resume that changes the model, data, seed or objective
    from common.ray_session import ResourceError, init_ray, settings_from_args

    try:
        validation = job.validation if job.run.validate_every else None  # the validation actor's CPU too
        init_ray(settings_from_args(args, job.cluster.ray_address), pool_requests(job.cluster, validation))
    except ResourceError as err:
        print(f"resource error: {err}", file=sys.stderr, flush=True)
        return RESOURCE_ERROR_EXIT
    from rollout.driver import train

    start = time.perf_counter()
    summary = train(job)
    seconds = time.perf_counter() - start
    stored = f" and {job.run.storage}" if job.run.storage else ""
    print(f"done: {summary.get('step', 0):.0f} steps in {seconds:.1f} s; outputs in {job.run.output_dir}{stored}")
    return 0


def check_resume_or_exit(job: JobConfig) -> None:
    from common.preflight import config_error
    from common.run_storage import open_checked
    from rollout.resume import check_resume

    try:
        open_checked(job.run.output_dir, job.run.storage)  # a relative output_dir under `ray job submit`, a bad URI
        check_resume(job)
    except ValueError as err:
        config_error(err)


def check_paths(job: JobConfig) -> None:
    """Every local path the job names must exist (on this node: the driver's view of shared storage)."""
    from common.preflight import require_paths

    model, feedback = job.model, job.learner.reward_feedback
    # RFSR's learner loads its own weights (LearnerConfig requires the VGG16 file when features=vgg16).
    rfsr = job.learner.objective == "reward_feedback"
    require_paths(
        sd_dirs={"model.sd_path": model.sd_path},
        paths={"model.naosd_path": model.naosd_path},
        files={"learner.reward_feedback.vgg_weights_path":
               feedback.vgg_weights_path if rfsr and feedback.features == "vgg16" else ""},
        dirs={"data.hr_dir": job.data.hr_dir, "reward.weights_dir": job.reward.weights_dir,
              "learner.reward_feedback.weights_dir": feedback.weights_dir if rfsr else ""},
    )  # fmt: skip


def pool_requests(cluster: ClusterConfig, validation: ValidationConfig | None = None) -> list[PoolRequest]:
    """What the three pools (and the validation actor, when on) ask Ray for, pool by pool."""
    from common.ray_session import pool_request

    rollout, reward, learner = cluster.rollout, cluster.reward, cluster.learner
    return [
        pool_request("rollout", rollout.num_workers, num_cpus=rollout.num_cpus, num_gpus=rollout.num_gpus,
                     resources=rollout.resources),
        pool_request("reward", reward.num_workers, num_cpus=reward.num_cpus, num_gpus=reward.num_gpus,
                     resources=reward.resources),
        pool_request("learner", learner.num_ranks, num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
                     resources=learner.resources),
    ] + ([pool_request("validation", 1, num_cpus=validation.num_cpus, num_gpus=validation.num_gpus, resources={})]
         if validation else [])  # fmt: skip

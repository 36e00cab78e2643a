"""NAOSD pre-training (SPEC section 9), the first stage of GDPO-SR, on the same machinery as GDPO.

    python -m learner.pretrain --config tiny_pretrain            # the tiny default model, local Ray, CPU
    python -m learner.pretrain --config paper_pretrain model.sd_path=/models/sd21-base \\
        data.hr_dir=/data/lsdir pretrain.lpips_weights_dir=/models/iqa cluster.learner.num_ranks=4

DeepSpeed ranks as Ray actors (:class:`~learner.pretrain_rank.PretrainRank`,
one per actor), the data source and degradation of :mod:`sr_data`, Prometheus
metrics, progress lines, a checkpoint every ``run.checkpoint_every`` steps and
exact resume.  At the end rank 0 writes ``run.export_dir`` (default
``<output_dir>/naosd``): ``unet/`` and ``vae/`` with the LoRA merged, which
GDPO loads as ``model.naosd_path`` (with ``model.source=tiny`` for the tiny
architecture), plus the adapters as safetensors in LoRA mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
import yaml
from ray.util.placement_group import remove_placement_group

from common import checkpoint_store
from common.config import from_mapping, load_mapping, to_mapping
from common.naosd import ModelConfig
from common.preflight import load_or_exit, require_paths
from common.ray_session import ResourceError, add_ray_arguments, init_ray, pool_request, settings_from_args
from common.run_storage import RunOutputs, RunStorage, check_location, is_uri, open_checked
from common.telemetry import MetricsConfig, PretrainTelemetry
from learner.config import LearnerPoolConfig
from learner.group import CheckpointHost, RendezvousHost, resume_ranks, start_ranks
from learner.pretrain_rank import PretrainConfig
from sr_data.source import DataConfig

CHECKPOINT_DIR = "checkpoints"  # <output_dir>/checkpoints/checkpoint-<step>/ (common.checkpoint_files)


@dataclass(frozen=True, kw_only=True)
class PretrainRunConfig:
    steps: int = 35_000  # paper: 35 K iterations
    output_dir: str = "runs/pretrain"  # on the driver's node; absolute under `ray job submit`
    storage: str = ""  # where checkpoints, config and model persist: a path or pyarrow.fs URI; "" = output_dir
    export_dir: str = ""  # where the merged model goes; "" = <storage or output_dir>/naosd
    # dtype of the exported weights (training stays float32): float16 halves a merged SD folder, as SD's own
    # fp16 releases do; the loaders upcast it (diffusers builds float32 modules unless told otherwise).
    export_dtype: Literal["float32", "float16"] = "float32"
    resume: bool = True  # continue from the newest intact <storage or output_dir>/checkpoints/checkpoint-<step>
    log_every: int = 10
    checkpoint_every: int = 1000  # 0 = only at the end
    keep_checkpoints: int = 3  # newest checkpoint-<step> folders kept; 0 = all

    def __post_init__(self) -> None:
        if self.steps < 0 or self.log_every < 1 or self.checkpoint_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("steps >= 0, log_every >= 1, checkpoint_every >= 0 and keep_checkpoints >= 0 are required")
        check_location(self.output_dir, self.storage)


@dataclass(frozen=True, kw_only=True)
class PretrainClusterConfig:
    learner: LearnerPoolConfig = field(default_factory=LearnerPoolConfig)
    ray_address: str = ""  # empty: RAY_ADDRESS (set by `ray job submit`), else a private local Ray


@dataclass(frozen=True, kw_only=True)
class PretrainJob:
    run: PretrainRunConfig = field(default_factory=PretrainRunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cluster: PretrainClusterConfig = field(default_factory=PretrainClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        ranks = self.cluster.learner.num_ranks
        if self.pretrain.batch_size % ranks:
            raise ValueError(f"pretrain.batch_size={self.pretrain.batch_size} must divide evenly over {ranks} ranks")
        lpips = self.pretrain.loss.lambda_lpips
        if lpips and self.model.source == "pretrained" and not self.pretrain.lpips_weights_dir:
            raise ValueError("pretrain.loss.lambda_lpips > 0 needs pretrain.lpips_weights_dir (LPIPS-VGG's weights); "
                             "set lambda_lpips=0 to train without it")  # fmt: skip

    @property
    def outputs(self) -> RunOutputs:
        return RunOutputs(self.run.output_dir, self.run.storage)

    @property
    def export_dir(self) -> str:
        """A folder, or a run-storage URI (rank 0 exports on its own disk and uploads)."""
        return self.run.export_dir or self.outputs.persistent("naosd")


def load_pretrain_job(source: str, overrides: Sequence[str] = ()) -> PretrainJob:
    return from_mapping(PretrainJob, load_mapping(source, overrides))


class _PretrainHost(RendezvousHost, CheckpointHost):
    """Body of a pre-training rank actor (DeepSpeed is imported here, in the actor, not in the driver)."""

    def setup(self, job: PretrainJob, *, rank: int, world: int, addr: str, port: int) -> None:
        from learner.pretrain_rank import PretrainRank

        self._rank = PretrainRank(job.model, job.pretrain, job.data, rank, world, addr, port)

    def train_step(self) -> dict[str, float]:
        return self._rank.train_step()

    def save_checkpoint(self, root: str, keep: int) -> str:
        return str(self._rank.save_checkpoint(root, keep=keep))

    def load_checkpoint(self, directory: str) -> int:
        return self._rank.load_checkpoint(directory)

    def export(self, directory: str, dtype: str) -> str:
        if not is_uri(directory):
            return self._rank.export(directory, dtype)
        with tempfile.TemporaryDirectory(prefix="gdpo-sr-export-") as scratch:
            self._rank.export(scratch, dtype)
            if self._rank.rank == 0:
                RunStorage(directory).upload_tree(scratch)
        return directory


def pretrain(job: PretrainJob) -> dict[str, float]:
    """Run pre-training to ``job.run.steps``; returns the last step's mean stats over ranks."""
    job.outputs.write("config.yaml", yaml.safe_dump(to_mapping(job), sort_keys=False).encode())
    if job.model.source != "pretrained":
        print(f"NOTE: pre-training the tiny SD-architecture model (model.source={job.model.source}) on CPU-sized "
              "data: a toy NAOSD, not the paper's", flush=True)  # fmt: skip
    telemetry = PretrainTelemetry()
    if port := telemetry.serve(job.metrics):
        print(f"metrics: http://{job.metrics.host}:{port}/metrics", flush=True)
    pg, ranks = None, []
    try:
        pool = job.cluster.learner
        pg, ranks = start_ranks(
            _PretrainHost, pool, lambda r, **kw: r.setup.remote(job, **kw), ready_timeout_s=pool.start_timeout_s
        )
        return _loop(job, ranks, telemetry)
    finally:
        for actor in ranks:
            ray.kill(actor)
        if pg is not None:
            remove_placement_group(pg)
        telemetry.close()
        job.outputs.mirror(skip=(CHECKPOINT_DIR,))


def _loop(job: PretrainJob, ranks: list[Any], telemetry: PretrainTelemetry) -> dict[str, float]:
    checkpoints, keep = job.outputs.persistent(CHECKPOINT_DIR), job.run.keep_checkpoints
    step = 0
    if job.run.resume and (resumed := resume_ranks(ranks, checkpoints)) is not None:
        for name, why in resumed.refused:
            print(f"checkpoint {name} refused (renamed {name}.rejected, or marked REJECTED in run storage): {why}",
                  flush=True)  # fmt: skip
        step = resumed.client_state
        print(f"resumed from {checkpoint_store.name_of(resumed.path)} at step {step}", flush=True)
    telemetry.step.set(step)
    stats: dict[str, float] = {}
    started, first = time.perf_counter(), step
    while step < job.run.steps:
        t0 = time.perf_counter()
        per_rank = ray.get([r.train_step.remote() for r in ranks])
        seconds = time.perf_counter() - t0
        step += 1
        stats = {k: sum(s[k] for s in per_rank) / len(per_rank) for k in per_rank[0]}
        assert stats["step"] == step, (stats["step"], step)
        _record(telemetry, stats, seconds, job.pretrain.batch_size)
        if step % job.run.log_every == 0 or step == job.run.steps:
            rate = (step - first) * job.pretrain.batch_size / (time.perf_counter() - started)
            terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in stats.items() if k.startswith("loss_"))
            norms = " ".join(f"{k[10:]} {v:.3g}" for k, v in stats.items() if k.startswith("grad_norm_"))
            print(f"pretrain step {step}/{job.run.steps} | {terms} | grad {norms} | {rate:.1f} img/s", flush=True)
        if job.run.checkpoint_every and step % job.run.checkpoint_every == 0 and step < job.run.steps:
            ray.get([r.save_checkpoint.remote(checkpoints, keep) for r in ranks])
    ray.get([r.save_checkpoint.remote(checkpoints, keep) for r in ranks])
    exported = ray.get([r.export.remote(str(job.export_dir), job.run.export_dtype) for r in ranks])[0]
    print(f"model written to {exported} (load it with model.naosd_path={exported})", flush=True)
    return stats


def _record(telemetry: PretrainTelemetry, stats: dict[str, float], seconds: float, batch_size: int) -> None:
    telemetry.step.set(stats["step"])
    telemetry.step_seconds.observe(seconds)
    telemetry.samples.inc(batch_size)
    for key, value in stats.items():
        if key.startswith("loss_"):
            telemetry.loss.labels(term=key.removeprefix("loss_")).set(value)
        elif key.startswith("grad_norm_"):
            telemetry.grad_norm.labels(group=key.removeprefix("grad_norm_")).set(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--config", required=True, help="shipped config (tiny_pretrain, paper_pretrain) or a file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    job = load_or_exit(lambda: load_pretrain_job(args.config, args.overrides))
    load_or_exit(lambda: open_checked(job.run.output_dir, job.run.storage))  # relative under `ray job submit`, bad URI
    if args.print_config:
        print(yaml.safe_dump(to_mapping(job), sort_keys=False))
        return 0
    require_paths(
        sd_dirs={"model.sd_path": job.model.sd_path},
        paths={"model.naosd_path": job.model.naosd_path},
        dirs={"data.hr_dir": job.data.hr_dir, "pretrain.lpips_weights_dir": job.pretrain.lpips_weights_dir},
    )
    pool = job.cluster.learner
    request = pool_request(
        "learner", pool.num_ranks, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=pool.resources
    )
    # A private local Ray unless a cluster is named (--address, cluster.ray_address, or RAY_ADDRESS as under
    # `ray job submit`); the pool is checked against the cluster before any actor starts.
    try:
        init_ray(settings_from_args(args, job.cluster.ray_address), [request])
    except ResourceError as err:
        print(f"resource error: {err}", file=sys.stderr, flush=True)
        return 3
    start = time.perf_counter()
    pretrain(job)
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

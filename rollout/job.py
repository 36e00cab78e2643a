"""The job: every component's config side by side, as one file describes a run.

Only the driver holds a :class:`JobConfig`; each component is handed its own
section (``job.model``, ``job.rollout``, ...), never the whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.config import from_mapping, load_mapping
from common.naosd import ModelConfig
from common.ray_session import validate_custom_resources
from common.run_storage import check_location
from common.telemetry import MetricsConfig
from learner.config import LearnerConfig, LearnerPoolConfig
from reward_service.config import RewardConfig, RewardPoolConfig
from rollout.validation import ValidationConfig
from rollout.worker import RolloutConfig
from sr_data.source import DataConfig


@dataclass(frozen=True, kw_only=True)
class RolloutPoolConfig:
    num_workers: int = 1
    num_cpus: float = 1.0  # per worker
    num_gpus: float = 0.0  # per worker; fractions share a GPU between workers
    max_restarts: int = 3  # replacements per worker slot before the run fails
    # Custom Ray resources per worker, e.g. {gdpo_rollout: 1}: keeps workers on the node group that declares it.
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.num_cpus <= 0 or self.num_gpus < 0 or self.max_restarts < 0:
            raise ValueError("num_workers >= 1, num_cpus > 0, num_gpus >= 0 and max_restarts >= 0 are required")
        validate_custom_resources(self.resources)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Pool sizes and per-worker resources; each pool scales on its own."""

    rollout: RolloutPoolConfig = field(default_factory=RolloutPoolConfig)
    reward: RewardPoolConfig = field(default_factory=RewardPoolConfig)
    learner: LearnerPoolConfig = field(default_factory=LearnerPoolConfig)
    ray_address: str = ""  # empty: RAY_ADDRESS (set by `ray job submit`), else a private local Ray


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    steps: int = 4
    groups_per_step: int = 2  # images per optimizer step, across all learner ranks (paper: 8)
    output_dir: str = "runs/dry-run"  # on the driver's node; absolute under `ray job submit`
    storage: str = ""  # where checkpoints and outputs persist: a path or pyarrow.fs URI (s3://...); "" = output_dir
    resume: bool = True  # continue from the newest intact <storage or output_dir>/checkpoints/checkpoint-<step>
    resume_force: bool = False  # resume even though model, data, rollout seed or objective changed
    keep_checkpoints: int = 3  # newest checkpoint-<step> folders kept; 0 = all
    max_nonfinite_steps: int = 3  # stop after this many skipped non-finite learner steps in a row; 0 = never
    max_learner_restarts: int = 2  # a dead learner rank: rebuild the group and resume, at most this often
    log_every: int = 1
    validate_every: int = 0  # held-out validation and reward-hacking alarm every N steps; 0 = off
    sample_grid: bool = True  # write LR | samples with rewards | HR at the end

    def __post_init__(self) -> None:
        if self.steps < 0 or self.groups_per_step < 1 or self.log_every < 1:
            raise ValueError("steps >= 0, groups_per_step >= 1 and log_every >= 1 are required")
        if self.validate_every < 0:
            raise ValueError(f"validate_every must be >= 0 (0 = off), got {self.validate_every}")
        if self.keep_checkpoints < 0 or self.max_nonfinite_steps < 0 or self.max_learner_restarts < 0:
            raise ValueError("keep_checkpoints, max_nonfinite_steps and max_learner_restarts must be >= 0")
        check_location(self.output_dir, self.storage)


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # used when run.validate_every > 0

    def __post_init__(self) -> None:
        ranks = self.cluster.learner.num_ranks
        if self.run.groups_per_step % ranks:
            raise ValueError(
                f"run.groups_per_step={self.run.groups_per_step} must divide evenly over {ranks} learner ranks"
            )


def load_job(source: str, overrides: Sequence[str] = ()) -> JobConfig:
    """A shipped config name (``tiny``, ``paper``) or a YAML/TOML file, plus ``a.b=value`` overrides."""
    return from_mapping(JobConfig, load_mapping(source, overrides))

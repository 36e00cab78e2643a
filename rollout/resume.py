"""Resuming a run safely: what must not change under a checkpoint, and keeping the old config.

A checkpoint's adapter, optimizer state and data position only mean something with the model,
data, rollout seed and objective they were made with.  :func:`prepare_run_folder` compares the
job with the ``config.yaml`` saved beside the checkpoints and refuses a resume that changes
any of :data:`GUARDED` unless ``run.resume_force=true``; either way the old file is kept as
``config.<time>.yaml`` before the new one is written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import checkpoint_store
from common.config import to_mapping
from common.run_storage import RunOutputs
from common.telemetry import Telemetry
from learner.group import LearnerGroup
from rollout.job import JobConfig

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"  # <storage or output_dir>/checkpoints/checkpoint-<step>/, latest
# Dotted keys (whole sections or single keys) a resume keeps unless forced: what the saved state was made with.
GUARDED = (
    "model",
    "data",
    "rollout.seed",
    "learner.objective",
    "learner.loss",
    "learner.nft",
    "learner.reward_feedback",
    "learner.seed",
    "reward.kind",
    "reward.fr_metrics",
    "reward.nr_metrics",
    "reward.weighting",
    "reward.fixed_rho_s",
)
_ABSENT = object()


@dataclass
class DataPosition:
    next_index: int = 0  # first data index never handed out
    pending: list[int] = field(default_factory=list)  # handed out, not yet trained on or dropped


def resume_learner(learner: LearnerGroup, job: JobConfig, telemetry: Telemetry) -> tuple[int, DataPosition]:
    """Load the newest intact checkpoint into every rank; its step and data position (0 and fresh: none).

    Newer checkpoints that were refused (torn, changed, unsafe) are reported and renamed.
    """
    resumed = learner.resume(checkpoint_root(job))
    if resumed is None:
        return 0, DataPosition()
    for name, why in resumed.refused:
        print(f"checkpoint {name} refused (renamed {name}.rejected, or marked REJECTED in run storage): {why}",
              flush=True)
    state = resumed.client_state
    step, position = state["step"], DataPosition(**state["data"])
    fallback = " (an older checkpoint: see above)" if resumed.refused else ""
    name = checkpoint_store.name_of(resumed.path)
    print(f"resumed from {name}{fallback} at step {step}, data index {position.next_index}", flush=True)
    telemetry.resumed(step, state.get("gauges"))  # checkpoints before gauges were saved have none
    return step, position


def run_outputs(job: JobConfig) -> RunOutputs:
    return RunOutputs(job.run.output_dir, job.run.storage)


def checkpoint_root(job: JobConfig) -> str:
    """``<storage or output_dir>/checkpoints``: a folder or a run-storage URI."""
    return run_outputs(job).persistent(CHECKPOINTS)


def will_resume(job: JobConfig) -> bool:
    """Whether the run continues from a checkpoint (one exists and ``run.resume`` is on)."""
    return job.run.resume and bool(checkpoint_store.committed(checkpoint_root(job)))


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every :data:`GUARDED` key whose value differs (keys a file lacks are skipped)."""
    changes: list[str] = []
    for key in GUARDED:
        _diff(key, _get(saved, key), _get(new, key), changes)
    return changes


def check_resume(job: JobConfig) -> list[str]:
    """The guarded changes a resume of ``job`` makes (empty when it starts fresh or changes none of them).

    ValueError (naming every changed key, old -> new) when there are any and ``run.resume_force`` is off.
    The saved ``config.yaml`` is read from run storage when ``run.storage`` is set.
    """
    saved_text = run_outputs(job).read(CONFIG_FILE)
    if saved_text is None or not will_resume(job):
        return []
    saved = yaml.safe_load(saved_text) or {}  # plain YAML only: nothing in it runs
    changes = config_changes(saved, to_mapping(job))
    if changes and not job.run.resume_force:
        raise ValueError(
            f"resuming {job.run.storage or job.run.output_dir} would change what its checkpoints were made with "
            f"({'; '.join(changes)}); use a new run.output_dir, or run.resume_force=true to resume anyway"
        )
    return changes


def prepare_run_folder(job: JobConfig) -> Path:
    """:func:`check_resume`, keep the old config as ``config.<time>.yaml``, write the new; returns ``config.yaml``.

    Both are written into ``run.output_dir`` and, when set, into ``run.storage``.
    """
    outputs = run_outputs(job)
    if changes := check_resume(job):
        print(f"run.resume_force: resuming despite changes: {'; '.join(changes)}", flush=True)
    if (old := outputs.read(CONFIG_FILE)) is not None:
        kept = _free_name(outputs.local / f"config.{time.strftime('%Y%m%dT%H%M%S')}.yaml")
        outputs.write(kept.name, old)
        print(f"previous config kept as {kept.name}", flush=True)
    return outputs.write(CONFIG_FILE, yaml.safe_dump(to_mapping(job), sort_keys=False).encode())


def mirror_outputs(job: JobConfig) -> None:
    """Copy the driver's files (config, samples, validation CSV, TensorBoard, data log) into ``run.storage``."""
    run_outputs(job).mirror(skip=(CHECKPOINTS,))


def _diff(key: str, old: Any, now: Any, changes: list[str]) -> None:
    if old is _ABSENT or now is _ABSENT:
        return
    if isinstance(old, Mapping) and isinstance(now, Mapping):
        for sub in sorted(set(old) | set(now)):
            _diff(f"{key}.{sub}", old.get(sub, _ABSENT), now.get(sub, _ABSENT), changes)
    elif old != now:
        changes.append(f"{key}: {_short(old)} -> {_short(now)}")


def _get(mapping: Mapping[str, Any], key: str) -> Any:
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}.{n}{path.suffix}"), n + 1
    return candidate

"""What one training step reports: its summary, its metrics and TensorBoard scalars, its progress line.

Kept beside the loop (``rollout.driver``), which calls :func:`record_step` after every learner step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.records import REFERENCE_POLICY_VERSION, GroupRewards, RolloutGroups
from common.telemetry import StepRecord, Telemetry


def record_step(
    telemetry: Telemetry,
    groups: RolloutGroups,
    rewards: GroupRewards,
    stats: dict[str, float],
    *,
    step: int,
    run_steps: int,
    step_seconds: float,
    wait: float,
    waited: float,
    elapsed: float,
) -> dict[str, float]:
    """The step's summary (loss, reward, advantage, throughput, staleness), also sent to the telemetry."""
    samples = run_steps * groups.num_groups * groups.group_size  # trained on since this process started
    summary = {
        "step": float(step),
        "samples": float(samples),
        "loss": stats["loss"],
        "reward_mean": float(rewards.reward.mean()),
        "reward_std": float(rewards.reward.std(axis=1, ddof=1).mean()),
        "advantage_abs_mean": float(np.abs(rewards.advantage).mean()),
        "advantage_max": float(rewards.advantage.max()),
        "grad_norm": stats["grad_norm"],
        "step_seconds": step_seconds,
        "samples_per_second": samples / elapsed,
        "learner_wait_fraction": waited / elapsed,
    }
    versions = groups.policy_version
    if (versions != REFERENCE_POLICY_VERSION).all():  # policy mode: how old were the samples trained on
        summary["staleness_max"] = float(step - 1 - versions.min())
        summary["policy_version_min"] = float(versions.min())
    metric_means = rewards.metric_raw.mean(axis=(0, 2))  # [N, M, G] -> one mean per metric
    telemetry.record_step(
        StepRecord(
            step=step, groups=groups.num_groups, samples=groups.num_groups * groups.group_size,
            zero_variance_groups=int((np.ptp(rewards.reward, axis=1) == 0).sum()),
            step_seconds=step_seconds, wait_seconds=wait, scalars=summary,
            reward_metrics={n: float(v) for n, v in zip(rewards.metric_names, metric_means, strict=True)},
        )
    )  # fmt: skip
    return summary


def print_progress(s: dict[str, float]) -> None:
    """One progress line of a :func:`record_step` summary."""
    print(
        f"step {s['step']:.0f} | loss {s['loss']:.4f} | reward {s['reward_mean']:.3f} "
        f"(group std {s['reward_std']:.3f}) "
        f"| |adv| {s['advantage_abs_mean']:.3f} max {s['advantage_max']:.2f} | grad {s['grad_norm']:.3g} "
        f"| {s['samples_per_second']:.2f} samples/s | learner waited {100 * s['learner_wait_fraction']:.0f}%",
        flush=True,
    )


TRAINED_GROUPS = "trained_groups.csv"  # <output_dir>/trained_groups.csv: step,data_index,policy_version


def log_trained_groups(out: Path, step: int, groups: RolloutGroups) -> None:
    """Append one row per group the learner trained on at ``step`` (an audit trail for exactly-once training).

    A resumed run appends to the same file; steps after the resumed checkpoint that the stopped
    run had already logged appear twice, each time with the groups that step trained on then.
    """
    path = Path(out) / TRAINED_GROUPS
    new = not path.is_file()
    with path.open("a") as handle:
        if new:
            handle.write("step,data_index,policy_version\n")
        for index, version in zip(groups.data_index.tolist(), groups.policy_version.tolist(), strict=True):
            handle.write(f"{step},{index},{version}\n")


def check_finite(stats: dict[str, float], step: int, in_row: int, limit: int, telemetry: Telemetry) -> int:
    """Count a skipped non-finite learner step; RuntimeError after ``limit`` in a row.  Returns the new run length."""
    if not stats["nonfinite"]:
        return 0
    in_row += 1
    telemetry.nonfinite_steps.inc()
    print(f"step {step}: non-finite loss or gradient norm (loss {stats['loss']}, grad {stats['grad_norm']}); "
          f"update skipped, adapter unchanged ({in_row} in a row)", flush=True)  # fmt: skip
    if limit and in_row >= limit:
        raise RuntimeError(
            f"{in_row} learner steps in a row had a non-finite loss or gradient norm (run.max_nonfinite_steps="
            f"{limit}); stopping. The adapter was never updated with them; the last checkpoint is intact."
        )
    return in_row

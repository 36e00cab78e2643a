"""The run's experiment log: TensorBoard scalars, one event file per process in ``<output_dir>/tensorboard``.

Written by the driver from the same step records as the Prometheus metrics, so both agree; view with
``tensorboard --logdir <output_dir>/tensorboard``.  A resumed run appends to the same folder (a new
event file), and TensorBoard shows the steps in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.telemetry import StepRecord


class ExperimentLog:
    """TensorBoard scalars of a training run, tagged ``<group>/<name>``."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the driver holds torch already; tools need not

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)

    def write(self, record: StepRecord) -> None:
        step, s = record.step, record.scalars
        scalars = {
            "train/loss": s["loss"],
            "train/grad_norm": s["grad_norm"],
            "reward/mean": s["reward_mean"],
            "reward/group_std": s["reward_std"],
            "advantage/abs_mean": s["advantage_abs_mean"],
            "throughput/samples_per_second": s["samples_per_second"],
            "throughput/step_seconds": record.step_seconds,
            "throughput/learner_wait_ratio": s["learner_wait_fraction"],
            "groups/zero_variance": float(record.zero_variance_groups),
        }
        if "staleness_max" in s:  # policy mode only
            scalars["staleness/max_versions"] = s["staleness_max"]
        scalars.update({f"reward/{name}": value for name, value in record.reward_metrics.items()})
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars outside the step record (e.g. ``validation/...``), tagged as given."""
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()

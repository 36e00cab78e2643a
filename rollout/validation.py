"""Held-out validation of the current policy, and the reward-hacking guard built on it.

Every ``run.validate_every`` steps the driver hands the current adapter to a :class:`HeldoutValidator`
(a plain class, made a Ray actor by :class:`ValidationRunner`): it samples a fixed set of held-out LR crops
with fixed noise and scores them with the reward's own metric callables (``reward.*`` and the absolute
reward, Eq. 7 on each metric's fixed range) and with metrics outside the reward (PSNR-Y, SSIM-Y, a
sharpness ratio; ``sr_tools.heldout``).  Records go to Prometheus, TensorBoard and
``<output_dir>/validation.csv``, and into :class:`~rollout.alarm.RewardHackingGuard`.

The guard's reward series is the held-out reward of these same samples, not the mean reward of the
training groups: a training group's reward is min-max normalised within the group (Eq. 7-8), so its mean
does not trend as the policy improves, and with ``rollout.sample_from: reference`` the training samples
are not the policy's at all.  The held-out reward measures what training optimises, on the policy, with
fixed noise; a held-out metric falling meanwhile is the reward being paid for something else.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from prometheus_client import Counter, Gauge

from common.adapter_sync import AdapterWeights
from common.naosd import ModelConfig
from common.ray_session import ACTOR_LOST
from common.telemetry import Telemetry
from reward_service.config import RewardConfig
from rollout.alarm import Alarm, AlarmConfig, RewardHackingGuard

if TYPE_CHECKING:
    from reward_service.metrics_iqa import Metric

OUTSIDE_REWARD = {"psnr_y": True, "ssim_y": True}  # watchable metrics outside the reward -> higher is better
CSV_NAME = "validation.csv"


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """The held-out set, its sampling, and the alarm (how often: ``run.validate_every``)."""

    folder: str = ""  # "": the embedded held-out photos (sr_data.embedded_images.EMBEDDED_HELDOUT)
    crops: int = 8  # fixed HR crops, positions drawn from ``seed``
    crop_size: int = 64  # HR side; the LR is x4 bicubic (crop_size // 4 a side, resized back)
    samples: int = 2  # NAOSD samples per crop (>= 2: the reward scores groups)
    seed: int = 1234  # crop positions and sampling noise: identical at every validation
    prompt: str = ""
    device: str = "auto"  # "auto": cuda when available
    num_cpus: float = 1.0  # Ray resources of the validation actor
    num_gpus: float = 0.0
    max_restarts: int = 3  # validation actors that may die in a run before the run fails (each is replaced)
    alarm: AlarmConfig = field(default_factory=lambda: AlarmConfig(margins={"psnr_y": 0.2, "ssim_y": 0.005}))

    def __post_init__(self) -> None:
        if self.crops < 1 or self.samples < 2:
            raise ValueError(f"crops >= 1 and samples >= 2 are required, got {self.crops}, {self.samples}")
        if self.crop_size < 8 or self.crop_size % 4:
            raise ValueError(f"crop_size must be a multiple of 4 and >= 8, got {self.crop_size}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.max_restarts < 0:
            raise ValueError("num_cpus, num_gpus and max_restarts must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ValidationRecord:
    step: int  # the learner step whose adapter was validated
    version: int  # adapter version the validator held
    seconds: float
    metrics: dict[str, float]  # reward, reward.<metric>, psnr_y, ssim_y, sharpness


class HeldoutValidator:
    """Samples the fixed held-out crops with the current policy and scores them (a Ray actor where created)."""

    def __init__(
        self,
        model_config: ModelConfig,
        reward_config: RewardConfig,
        config: ValidationConfig,
        metrics: Sequence[Metric] | None = None,  # default: the reward's metrics, built from reward_config
    ) -> None:
        import torch

        from common.weights import build_naosd
        from reward_service.worker import RewardWorker
        from sr_tools.heldout import heldout_crops

        self.config = config
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_naosd(model_config, device=device).eval()
        self.reward = RewardWorker(reward_config, metrics)  # the reward service's own metric callables
        self.hr, self.lr = heldout_crops(config.crops, config.crop_size, config.seed, config.folder)
        self.version = 0

    def ready(self) -> dict[str, bool]:
        """The watchable metrics, each with whether higher is better."""
        directions = {"reward": True, **OUTSIDE_REWARD}
        directions.update({f"reward.{m.name}": not m.lower_better for m in self.reward.metrics})
        return directions

    def set_adapter(self, weights: AdapterWeights) -> int:
        """The same push the rollout workers get: digest-checked, applied in place, never rolled back."""
        from common.adapter_sync import apply_to

        if weights.version >= self.version:
            apply_to(self.model.unet, weights)
            self.version = weights.version
        return self.version

    def validate(self, step: int) -> ValidationRecord:
        from sr_tools.heldout import image_metrics, reward_metrics, sample_fixed_noise

        start, cfg = time.perf_counter(), self.config
        images = sample_fixed_noise(self.model, self.lr, cfg.samples, cfg.seed, cfg.prompt)
        scored = reward_metrics(self.reward, images, self.hr, self.lr)
        metrics = {"reward": scored.pop("reward"), **{f"reward.{k}": v for k, v in scored.items()}}
        metrics.update(image_metrics(images, self.hr))
        return ValidationRecord(step=step, version=self.version, seconds=time.perf_counter() - start, metrics=metrics)


class ValidationRunner:
    """Driver side: the validation actor, its results in flight, the CSV, the metrics and the guard.

    A validation actor that dies (node lost, OOM) is replaced and the validations it held are skipped, up to
    ``config.max_restarts`` times a run; training goes on meanwhile.  After a resume, :meth:`restore` gives
    the guard the history the stopped run had validated, so an alarm window may span the restart.
    """

    def __init__(
        self,
        config: ValidationConfig,
        model_config: ModelConfig,
        reward_config: RewardConfig,
        *,
        every: int,
        out: Path,
        telemetry: Telemetry,
        metrics: Sequence[Metric] | None = None,
    ) -> None:
        assert every > 0, "a runner exists only when run.validate_every > 0"
        self.every, self.csv_path, self.config = every, Path(out) / CSV_NAME, config
        self.telemetry = ValidationTelemetry(telemetry)
        actor_cls = ray.remote(HeldoutValidator).options(num_cpus=config.num_cpus, num_gpus=config.num_gpus)
        self._start_actor = partial(actor_cls.remote, model_config, reward_config, config, metrics)
        self.actor = self._start_actor()
        self.guard = RewardHackingGuard(config.alarm, ray.get(self.actor.ready.remote()))
        self.pending: list[tuple[int, ray.ObjectRef]] = []  # (step, its validation), in step order
        self.alarms: list[Alarm] = []
        self.restarts = 0

    def restore(self, before_step: int, persistent_csv: Callable[[], bytes | None]) -> int:
        """Start the guard's history over from the run's ``validation.csv`` (the local one, else
        ``persistent_csv()``, its copy in run storage): the rows of steps before ``before_step``, where the run
        resumes, and rewrite the CSV to those rows (the steps from there on are validated again).  Alarms are
        not re-checked: they fired, or not, when the rows were new.  Returns the rows kept."""
        saved = self.csv_path.read_bytes() if self.csv_path.is_file() else persistent_csv()
        reader = csv.DictReader(io.StringIO((saved or b"").decode()))
        rows = [r for r in reader if int(r["step"]) < before_step]
        self.guard = RewardHackingGuard(self.config.alarm, self.guard.higher_better)
        for row in rows:
            step, metrics = int(row["step"]), {k: float(v) for k, v in row.items() if k not in ("step", "version")}
            self.guard.add_reward(step, metrics["reward"])
            self.guard.add_validation(step, metrics)
        self.csv_path.unlink(missing_ok=True)
        if rows:  # the kept rows as they were written (write_csv_row writes the header with a first row)
            with self.csv_path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
                writer.writeheader()
                writer.writerows(rows)
        return len(rows)

    def after_step(self, step: int, weights: Callable[[], AdapterWeights]) -> None:
        """Start a validation when ``step`` is due (``weights()`` is then the adapter of that step); collect."""
        if step % self.every == 0:
            self.actor.set_adapter.remote(weights())  # actor calls run in order: validate sees this adapter
            self.pending.append((step, self.actor.validate.remote(step)))
        self._collect(timeout=0.0)

    def finish(self) -> None:
        """Wait for the validations still running (the last one belongs to the run's result)."""
        self._collect(timeout=None)

    def shutdown(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def _collect(self, timeout: float | None) -> None:
        while self.pending:
            done, _ = ray.wait([self.pending[0][1]], timeout=timeout)  # in order: the guard sees steps ascending
            if not done:
                return
            step, _ = self.pending.pop(0)
            try:
                record = ray.get(done[0])
            except ACTOR_LOST as err:
                self._replace_actor(err, lost=[step, *(s for s, _ in self.pending)])
                continue
            self._record(record)

    def _replace_actor(self, err: Exception, lost: list[int]) -> None:
        """The actor died: the validations it held (steps ``lost``) are skipped; start a new one (the next
        push gives it the adapter), or fail the run once ``max_restarts`` actors have died."""
        self.pending.clear()
        self.restarts += 1
        self.telemetry.restarts.inc()
        if self.restarts > self.config.max_restarts:
            raise RuntimeError(
                f"the validation actor died {self.restarts} times (validation.max_restarts="
                f"{self.config.max_restarts}); last: {err}. Set run.validate_every=0 to train without validation"
            ) from err
        print(f"validation actor died ({type(err).__name__}); replacing it ({self.restarts} of at most "
              f"{self.config.max_restarts}); the validations of steps {lost} are skipped", flush=True)  # fmt: skip
        ray.kill(self.actor, no_restart=True)  # an unreachable one may still hold its GPU
        self.actor = self._start_actor()

    def _record(self, record: ValidationRecord) -> None:
        metrics = record.metrics
        print(f"validation step {record.step}: " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        write_csv_row(self.csv_path, {"step": record.step, "version": record.version, **metrics})
        self.telemetry.record(record.step, metrics, record.seconds)
        self.guard.add_reward(record.step, metrics["reward"])
        self.guard.add_validation(record.step, metrics)
        self.guard.check(on_alarm=self._on_alarm)

    def _on_alarm(self, alarm: Alarm) -> None:
        self.alarms.append(alarm)
        self.telemetry.alarm(alarm.metric)


class ValidationTelemetry:
    """The validation series, in the run's registry beside :class:`~common.telemetry.Telemetry`'s own."""

    def __init__(self, telemetry: Telemetry) -> None:
        r, self._telemetry = telemetry.registry, telemetry
        self.value = Gauge("gdpo_validation_metric", "Held-out metric of the last validation", ["metric"], registry=r)
        self.step = Gauge("gdpo_validation_step", "Learner step of the last validation", registry=r)
        self.seconds = Gauge("gdpo_validation_seconds", "Wall time of the last validation", registry=r)
        self.alarms = Counter(
            "gdpo_reward_hacking_alarms_total", "Validations at which the reward-hacking alarm fired", ["metric"],
            registry=r,
        )  # fmt: skip
        self.restarts = Counter("gdpo_validation_restarts_total", "Validation actors replaced after dying", registry=r)

    def record(self, step: int, metrics: Mapping[str, float], seconds: float) -> None:
        self.step.set(step)
        self.seconds.set(seconds)
        for name, value in metrics.items():
            self.value.labels(metric=name).set(value)
        self._telemetry.log_scalars(step, {f"validation/{k}": v for k, v in metrics.items()})

    def alarm(self, metric: str) -> None:
        self.alarms.labels(metric=metric).inc()


def write_csv_row(path: Path, row: Mapping[str, float | int]) -> None:
    """Append ``row``; the header is written with the first row (a resumed run appends to the same file)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)

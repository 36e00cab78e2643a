"""Prometheus metrics of a training run, served over HTTP by the driver.

Workers report what they did in their typed results (record-batch columns,
step stats); the driver turns those into these metrics in its own registry,
so one scrape of ``<host>:<port>/metrics`` shows every stage, whatever the
number of Ray workers or where they run.  The same step records go to a
TensorBoard log (:mod:`common.experiment_log`) in the run's output folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from common.experiment_log import ExperimentLog

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = True  # the Prometheus endpoint
    host: str = "127.0.0.1"  # loopback by default: expose deliberately (cluster configs bind 0.0.0.0)
    port: int = 9464  # 0 = pick a free port
    final_scrape_s: float = 0.0  # keep the endpoint up this long after the run, for a last scrape
    tensorboard: bool = True  # TensorBoard scalars in <output_dir>/tensorboard

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if not 0 <= self.final_scrape_s <= 3600:
            raise ValueError(f"final_scrape_s must be in [0, 3600] seconds, got {self.final_scrape_s}")


# StepRecord.scalars key -> gauge name and help
STEP_GAUGES = {
    "loss": ("gdpo_loss", "GDPO loss of the last step"),
    "reward_mean": ("gdpo_reward_mean", "Mean ARF reward of the last step's groups"),
    "reward_std": ("gdpo_reward_std", "Mean within-group reward std of the last step"),
    "advantage_abs_mean": ("gdpo_advantage_abs_mean", "Mean |advantage| of the last step"),
    "grad_norm": ("gdpo_grad_norm", "Global gradient norm of the last step, before clipping"),
    "learner_wait_fraction": ("gdpo_learner_wait_ratio", "Share of this process's wall time the learner waited"),
}


_REWARD_METRIC = "reward_metric/"  # last_gauges() key prefix of gdpo_reward_metric{metric=...}


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """What one optimizer step adds to the metrics and the experiment log."""

    step: int
    groups: int  # groups trained on
    samples: int  # SR samples trained on (groups x G)
    zero_variance_groups: int  # trained groups whose G rewards were all equal (no learning signal)
    step_seconds: float
    wait_seconds: float  # learner idle before this step
    scalars: Mapping[str, float]  # loss, reward_mean, ... (see :data:`STEP_GAUGES`)
    reward_metrics: Mapping[str, float]  # mean raw value of each reward metric


class Telemetry:
    """The run's metrics; names follow Prometheus conventions (``_total``, ``_seconds``, ``_bytes``, ``_ratio``).

    Rates are left to Prometheus: throughput is ``rate(gdpo_samples_total[5m])``, not a gauge.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.groups_generated = Counter("gdpo_groups_generated_total", "Groups sampled", ["worker"], registry=r)
        self.groups_scored = Counter("gdpo_groups_scored_total", "Groups scored by the reward pool", registry=r)
        self.groups_consumed = Counter("gdpo_groups_consumed_total", "Groups the learner trained on", registry=r)
        self.groups_dropped = Counter("gdpo_groups_dropped_total", "Groups not trained on", ["reason"], registry=r)
        self.nonfinite_steps = Counter(
            "gdpo_learner_nonfinite_steps_total", "Learner steps skipped for a non-finite loss or gradient", registry=r
        )
        self.learner_restarts = Counter(
            "gdpo_learner_restarts_total", "Learner groups rebuilt after a rank died", registry=r
        )
        self.groups_zero_variance = Counter(
            "gdpo_groups_zero_variance_total", "Groups trained on whose G rewards were all equal", registry=r
        )
        self.samples = Counter("gdpo_samples_total", "SR samples trained on", registry=r)
        self.rollout_restarts = Counter(
            "gdpo_rollout_worker_restarts_total", "Rollout workers replaced", ["worker"], registry=r
        )  # the reward pool counts its own: gdpo_reward_worker_restarts_total (reward_service.metrics)
        self.rollout_seconds = Histogram(
            "gdpo_rollout_seconds", "Sampling time per group", buckets=_SECONDS, registry=r
        )
        self.reward_seconds = Histogram("gdpo_reward_seconds", "Scoring time per group", buckets=_SECONDS, registry=r)
        self.step_seconds = Histogram("gdpo_learner_step_seconds", "Learner step time", buckets=_SECONDS, registry=r)
        self.wait_seconds = Histogram(
            "gdpo_learner_wait_seconds", "Learner idle time waiting for data", buckets=_SECONDS, registry=r
        )
        self.push_seconds = Histogram(
            "gdpo_weight_push_seconds", "Adapter push latency to all rollout workers", buckets=_SECONDS, registry=r
        )
        self.push_bytes = Counter("gdpo_weight_push_bytes_total", "Adapter bytes pushed", registry=r)
        self.staleness = Histogram(
            "gdpo_policy_staleness_versions",
            "Learner version minus sample version",
            buckets=(0, 1, 2, 4, 8),
            registry=r,
        )
        # Rollout calls in flight and scored groups waiting for the learner; the reward pool's queue is
        # gdpo_reward_pending_batches + gdpo_reward_queue_depth (reward_service.metrics).
        self.queue_depth = Gauge("gdpo_queue_depth", "Work in flight per stage", ["stage"], registry=r)
        self.step = Gauge("gdpo_learner_step", "Optimizer steps taken (restored on resume)", registry=r)
        self.gauges = {key: Gauge(name, text, registry=r) for key, (name, text) in STEP_GAUGES.items()}
        self.reward_metric = Gauge(
            "gdpo_reward_metric", "Mean raw value of each reward metric over the last step's samples", ["metric"],
            registry=r,
        )  # fmt: skip
        self._endpoint = Endpoint(r)
        self._log: ExperimentLog | None = None
        self._last: dict[str, float] = {}  # the last step's gauge values (checkpointed: see last_gauges)

    def serve(self, config: MetricsConfig, tensorboard_dir: str | Path | None = None) -> int:
        """Start the endpoint (returns its port, 0 when disabled) and, if configured, the TensorBoard log."""
        if config.tensorboard and tensorboard_dir is not None:
            self._log = ExperimentLog(tensorboard_dir)
        return self._endpoint.serve(config)

    def resumed(self, step: int, gauges: Mapping[str, float] | None = None) -> None:
        """A run resumed at ``step``: the step gauge, and the last step's gauges saved with the checkpoint
        (:meth:`last_gauges`), read as they were before the first new step."""
        self.step.set(step)
        for key, value in (gauges or {}).items():
            if key in self.gauges:
                self.gauges[key].set(value)
            elif key.startswith(_REWARD_METRIC):
                self.reward_metric.labels(metric=key.removeprefix(_REWARD_METRIC)).set(value)
        self._last = dict(gauges or {})

    def last_gauges(self) -> dict[str, float]:
        """The last step's gauge values as plain floats, for the checkpoint (restored by :meth:`resumed`)."""
        return dict(self._last)

    def record_step(self, record: StepRecord) -> None:
        self.step.set(record.step)
        self.groups_consumed.inc(record.groups)
        self.samples.inc(record.samples)
        self.groups_zero_variance.inc(record.zero_variance_groups)
        self.step_seconds.observe(record.step_seconds)
        self.wait_seconds.observe(record.wait_seconds)
        for key, gauge in self.gauges.items():
            gauge.set(record.scalars[key])
        for name, value in record.reward_metrics.items():
            self.reward_metric.labels(metric=name).set(value)
        self._last = {key: float(record.scalars[key]) for key in self.gauges}
        self._last.update({_REWARD_METRIC + name: float(v) for name, v in record.reward_metrics.items()})
        if self._log is not None:
            self._log.write(record)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """TensorBoard scalars beside the step records (the validation's); nothing when TensorBoard is off."""
        if self._log is not None:
            self._log.write_scalars(step, scalars)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._endpoint.close()


class Endpoint:
    """The HTTP endpoint of one registry; it stays up ``final_scrape_s`` after the run for a last scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry, self._server, self._config = registry, None, MetricsConfig()

    def serve(self, config: MetricsConfig) -> int:
        """Start serving; returns the bound port (0 when disabled)."""
        if not config.enabled:
            return 0
        self._config = config
        self._server, _ = start_http_server(config.port, addr=config.host, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is None:
            return
        if grace := self._config.final_scrape_s:
            port = self._server.server_address[1]
            print(f"metrics: serving the final values on port {port} for {grace:g} s more", flush=True)
            time.sleep(grace)
        self._server.shutdown()
        self._server.server_close()
        self._server = None


class PretrainTelemetry:
    """Metrics of NAOSD pre-training (``naosd_pretrain_*``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.step = Gauge("naosd_pretrain_step", "Optimizer steps taken", registry=r)
        self.loss = Gauge("naosd_pretrain_loss", "Loss terms of the last step (unweighted)", ["term"], registry=r)
        self.grad_norm = Gauge("naosd_pretrain_grad_norm", "Gradient norm before clipping", ["group"], registry=r)
        self.step_seconds = Histogram("naosd_pretrain_step_seconds", "Step time", buckets=_SECONDS, registry=r)
        self.samples = Counter("naosd_pretrain_samples_total", "Training images consumed", registry=r)
        self._endpoint = Endpoint(r)

    def serve(self, config: MetricsConfig) -> int:
        return self._endpoint.serve(config)

    def close(self) -> None:
        self._endpoint.close()

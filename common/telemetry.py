"""Prometheus metrics of a training run, served over HTTP by the driver.

Workers report what they did in their typed results (record-batch columns,
step stats); the driver turns those into these metrics in its own registry,
so one scrape of ``127.0.0.1:<port>/metrics`` shows every stage, whatever the
number of Ray workers or where they run.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default: expose deliberately
    port: int = 9464  # 0 = pick a free port

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")


class Telemetry:
    """The run's metrics; names follow Prometheus conventions (``_total``, ``_seconds``, ``_bytes``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.groups_generated = Counter("gdpo_groups_generated_total", "Groups sampled", ["worker"], registry=r)
        self.groups_scored = Counter("gdpo_groups_scored_total", "Groups scored by the reward pool", registry=r)
        self.groups_consumed = Counter("gdpo_groups_consumed_total", "Groups the learner trained on", registry=r)
        self.groups_dropped = Counter("gdpo_groups_dropped_total", "Groups not trained on", ["reason"], registry=r)
        self.worker_restarts = Counter("gdpo_worker_restarts_total", "Workers replaced", ["pool"], registry=r)
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
        self.queue_depth = Gauge("gdpo_queue_depth", "Batches in flight per stage", ["stage"], registry=r)
        self.step = Gauge("gdpo_learner_step", "Optimizer steps taken", registry=r)
        self.loss = Gauge("gdpo_loss", "GDPO loss of the last step", registry=r)
        self.reward_mean = Gauge("gdpo_reward_mean", "Mean ARF reward of the last step's groups", registry=r)
        self.reward_std = Gauge("gdpo_reward_std", "Mean within-group reward std of the last step", registry=r)
        self.advantage_abs = Gauge("gdpo_advantage_abs_mean", "Mean |advantage| of the last step", registry=r)
        self.wait_fraction = Gauge("gdpo_learner_wait_fraction", "Share of wall time the learner waited", registry=r)
        self.samples_per_second = Gauge("gdpo_samples_per_second", "SR samples trained on per second", registry=r)

        self._endpoint = Endpoint(r)

    def serve(self, config: MetricsConfig) -> int:
        return self._endpoint.serve(config)

    def close(self) -> None:
        self._endpoint.close()


class Endpoint:
    """The HTTP endpoint of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry, self._server = registry, None

    def serve(self, config: MetricsConfig) -> int:
        """Start serving; returns the bound port (0 when disabled)."""
        if not config.enabled:
            return 0
        self._server, _ = start_http_server(config.port, addr=config.host, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
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

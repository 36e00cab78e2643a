"""Prometheus metrics of the reward service, labelled by worker id.

Every process keeps its own :class:`~prometheus_client.CollectorRegistry` (an actor's is private to
its process); :func:`snapshot` flattens one into plain ``{sample: value}`` so a driver can collect
them over Ray and serve or log the merged view.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class WorkerMetrics:
    """Actor side: latency and group counters of one reward worker."""

    def __init__(self, worker_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels, reg = ["worker"], self.registry
        self.seconds = Histogram(
            "gdpo_reward_seconds", "Wall time of one reward scoring call", labels, buckets=LATENCY_BUCKETS, registry=reg
        ).labels(worker_id)
        self.groups_scored = Counter("gdpo_groups_scored", "Groups scored and kept", labels, registry=reg).labels(
            worker_id
        )
        self.zero_range = Counter(
            "gdpo_reward_zero_range_groups", "Groups with a metric equal across all G samples", labels, registry=reg
        ).labels(worker_id)
        self.nonfinite = Counter(
            "gdpo_reward_nonfinite_groups", "Groups dropped for a NaN/inf metric value", labels, registry=reg
        ).labels(worker_id)
        self.filtered = Counter(
            "gdpo_reward_filtered_groups", "Saturated groups dropped by the group filter", labels, registry=reg
        ).labels(worker_id)

    def observe(self, *, seconds: float, scored: int, zero_range: int, nonfinite: int, filtered: int) -> None:
        self.seconds.observe(seconds)
        self.groups_scored.inc(scored)
        self.zero_range.inc(zero_range)
        self.nonfinite.inc(nonfinite)
        self.filtered.inc(filtered)


class PoolMetrics:
    """Driver side: what only the pool sees (queue depth per worker, restarts, retries)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels, reg = ["worker"], self.registry
        self.queue_depth = Gauge(
            "gdpo_reward_queue_depth", "Batches sent to a reward worker and not finished", labels, registry=reg
        )
        self.pending = Gauge("gdpo_reward_pending_batches", "Batches waiting for a free reward worker", registry=reg)
        self.restarts = Counter(
            "gdpo_reward_worker_restarts", "Reward workers replaced after a crash or timeout", labels, registry=reg
        )
        self.retries = Counter(
            "gdpo_reward_retries", "Batches re-sent after their worker failed or timed out", labels, registry=reg
        )


def snapshot(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of ``registry`` as ``{'name{label="v",...}': value}`` (counters with ``_total``).

    The ``*_created`` timestamps prometheus-client adds are left out: they are not values to merge.
    """
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out

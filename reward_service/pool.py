"""A Ray actor pool of RewardWorkers: fan batches out, retry on failure, score every group once.

Each actor holds one :class:`~reward_service.worker.RewardWorker` and its own Prometheus registry.
The pool keeps at most one batch in flight per actor (so ``timeout_s`` bounds one scoring call)
and waits with ``ray.wait``.  It streams: ``submit`` queues a batch and returns a ticket, ``poll``
hands back whatever finished meanwhile, so the training driver keeps every stage busy;
``score`` is the blocking form of the two.  A batch whose actor dies, fails or exceeds the timeout is sent again
(preferably to another actor) up to ``max_retries`` times; a dead or timed-out actor is killed and
replaced.  A ValueError raised by the scoring itself (bad input, ``nonfinite='raise'``) is the
caller's problem and is re-raised at once (actors still busy with that call's batches are replaced,
so no orphaned work delays the next call).  Results are accepted once per batch, in input order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from prometheus_client import CollectorRegistry

from reward_service.config import RewardConfig, RewardPoolConfig
from reward_service.metrics import PoolMetrics, WorkerMetrics, snapshot
from reward_service.worker import RewardWorker, ScoreStats

log = logging.getLogger(__name__)

WorkerFactory = Callable[[RewardConfig], RewardWorker]


class RewardPoolError(RuntimeError):
    """A batch could not be scored within ``max_retries`` extra attempts, or a worker could not start."""


class RewardActor:
    """Body of one Ray actor (plain class, so it is testable in-process too)."""

    def __init__(self, config: RewardConfig, worker_id: str, factory: WorkerFactory | None = None) -> None:
        self.worker_id = worker_id
        self.worker = factory(config) if factory is not None else RewardWorker(config)
        self.metrics = WorkerMetrics(worker_id)

    def ready(self) -> str:
        return self.worker_id

    def score(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, ScoreStats]:
        out, stats = self.worker.score_batch(batch)
        self.metrics.observe(
            seconds=stats.seconds,
            scored=stats.groups_scored,
            zero_range=stats.zero_range_groups,
            nonfinite=stats.nonfinite_groups,
            filtered=stats.filtered_groups,
        )
        return out, stats

    def metric_values(self) -> dict[str, float]:
        return snapshot(self.metrics.registry)


@dataclass(frozen=True, kw_only=True)
class PoolResult:
    """One input batch, scored: kept groups with reward columns, and how it went."""

    ticket: int  # what ``submit`` returned for the input batch
    batch: pa.RecordBatch
    stats: ScoreStats
    worker_id: str
    attempts: int  # 1 = first try succeeded


@dataclass
class _Slot:
    actor: Any  # ray ActorHandle
    starting: Any | None  # ObjectRef of ready() until the actor has been constructed
    started_at: float
    batch: int | None = None  # index of the batch in flight, if any


@dataclass
class _Call:
    index: int
    slot: str
    deadline: float


class RewardPool:
    """``num_workers`` reward actors with ``num_cpus``/``num_gpus`` each (from :class:`RewardPoolConfig`)."""

    def __init__(
        self,
        reward: RewardConfig,
        pool: RewardPoolConfig,
        *,
        worker_factory: WorkerFactory | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.reward_config, self.pool_config = reward, pool
        self._factory = worker_factory
        self._remote = ray.remote(RewardActor).options(
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=dict(pool.resources)
        )
        self.metrics = PoolMetrics(registry)
        self._slots = {f"reward-{i}": self._start(f"reward-{i}") for i in range(pool.num_workers)}
        self._wait_started(list(self._slots))
        self._batches: dict[int, pa.RecordBatch] = {}  # ticket -> input, until its result is handed out
        self._attempts: dict[int, int] = {}
        self._queue: deque[tuple[int, str | None]] = deque()  # (ticket, worker to avoid)
        self._calls: dict[Any, _Call] = {}  # in-flight scoring call -> its ticket and slot
        self._finished: list[PoolResult] = []
        self._next_ticket = 0

    # ----------------------------------------------------------------- public
    @property
    def actors(self) -> dict[str, Any]:
        """Worker id -> current actor handle."""
        return {sid: slot.actor for sid, slot in self._slots.items()}

    def in_flight(self) -> dict[str, int | None]:
        """Worker id -> index of the batch it is scoring (None when idle)."""
        return {sid: slot.batch for sid, slot in self._slots.items()}

    @property
    def num_pending(self) -> int:
        """Batches submitted whose result has not been handed out yet."""
        return len(self._batches)

    def submit(self, batch: pa.RecordBatch) -> int:
        """Queue one batch for scoring; returns its ticket (results carry it)."""
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        self._batches[ticket], self._attempts[ticket] = batch, 0
        self._queue.append((ticket, None))
        self._dispatch()
        return ticket

    def poll(self, timeout: float = 0.0) -> list[PoolResult]:
        """Results finished so far, waiting up to ``timeout`` s for the first one.  Raises like ``score``."""
        deadline = time.monotonic() + timeout
        while self._batches and not self._finished:
            self._dispatch()
            self._collect(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        finished, self._finished = self._finished, []
        for result in finished:
            del self._batches[result.ticket], self._attempts[result.ticket]
        self._update_gauges()
        return finished

    def score(self, batches: Sequence[pa.RecordBatch]) -> list[PoolResult]:
        """Score every batch once; results in input order.  Raises RewardPoolError or the worker's ValueError."""
        tickets = [self.submit(batch) for batch in batches]
        results: dict[int, PoolResult] = {}
        while len(results) < len(tickets):
            results.update((r.ticket, r) for r in self.poll(timeout=self.pool_config.timeout_s))
        return [results[t] for t in tickets]

    def metric_values(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Merged samples of the driver and of every live actor (keys carry the worker label)."""
        values = snapshot(self.metrics.registry)
        refs = [slot.actor.metric_values.remote() for slot in self._slots.values() if slot.starting is None]
        for part in ray.get(refs, timeout=timeout_s):
            values.update(part)
        return values

    def shutdown(self) -> None:
        for slot in self._slots.values():
            ray.kill(slot.actor, no_restart=True)
        self._slots.clear()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- private
    def _start(self, worker_id: str) -> _Slot:
        actor = self._remote.remote(self.reward_config, worker_id, self._factory)
        return _Slot(actor=actor, starting=actor.ready.remote(), started_at=time.monotonic())

    def _wait_started(self, ids: list[str]) -> None:
        refs = {self._slots[sid].starting: sid for sid in ids}
        try:
            ray.get(list(refs), timeout=self.pool_config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RewardPoolError(f"reward workers did not start within {self.pool_config.start_timeout_s} s") from None
        except ray.exceptions.RayActorError as err:  # the constructor raised (missing weights, bad config, ...)
            raise RewardPoolError(f"a reward worker failed to start: {err}") from err
        for sid in ids:
            self._slots[sid].starting = None

    def _dispatch(self) -> None:
        """Give queued batches to idle, started actors (avoiding the one a retry came from when possible)."""
        for _ in range(len(self._queue)):
            idle = [sid for sid, s in self._slots.items() if s.batch is None and s.starting is None]
            if not idle:
                break
            ticket, avoid = self._queue.popleft()
            sid = next((s for s in idle if s != avoid), idle[0])
            ref = self._slots[sid].actor.score.remote(self._batches[ticket])
            self._calls[ref] = _Call(index=ticket, slot=sid, deadline=time.monotonic() + self.pool_config.timeout_s)
            self._slots[sid].batch = ticket
            self._attempts[ticket] += 1
        self._update_gauges()

    def _collect(self, timeout: float) -> None:
        """Wait up to ``timeout`` for one finished call, a started replacement or a deadline; act on it."""
        starting = {s.starting: sid for sid, s in self._slots.items() if s.starting is not None}
        waitable = [*self._calls, *starting]
        if not waitable:
            return
        now = time.monotonic()
        deadlines = [c.deadline for c in self._calls.values()]
        deadlines += [self._slots[sid].started_at + self.pool_config.start_timeout_s for sid in starting.values()]
        done, _ = ray.wait(waitable, num_returns=1, timeout=max(0.0, min(timeout, min(deadlines) - now)))
        for ref in done:
            if ref in starting:
                self._on_started(ref, starting[ref])
            else:
                self._on_result(ref, self._calls.pop(ref))
        self._expire()

    def _on_started(self, ref: Any, sid: str) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise RewardPoolError(f"replacement reward worker {sid} failed to start: {err}") from err
        self._slots[sid].starting = None

    def _on_result(self, ref: Any, call: _Call) -> None:
        slot = self._slots[call.slot]
        slot.batch = None
        try:
            out, stats = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # the actor died (killed, crashed, OOM)
            log.warning("reward worker %s died scoring batch %d: %s", call.slot, call.index, err)
            self._replace(call.slot)
            self._retry(call, err)
            return
        except ValueError:  # the input itself is bad: retrying cannot help
            raise
        except Exception as err:  # a failure inside scoring; the actor is alive
            log.warning("reward worker %s failed batch %d: %s", call.slot, call.index, err)
            self._retry(call, err)
            return
        self._finished.append(
            PoolResult(
                ticket=call.index, batch=out, stats=stats, worker_id=call.slot, attempts=self._attempts[call.index]
            )
        )

    def _expire(self) -> None:
        """Kill and replace actors whose call ran past ``timeout_s``; their result is never read."""
        now = time.monotonic()
        for ref, call in list(self._calls.items()):
            if call.deadline <= now:
                del self._calls[ref]
                log.warning("reward worker %s timed out on batch %d; replacing it", call.slot, call.index)
                self._slots[call.slot].batch = None
                self._replace(call.slot)
                self._retry(call, TimeoutError(f"{self.pool_config.timeout_s} s"))
        for sid, slot in self._slots.items():
            if slot.starting is not None and now - slot.started_at > self.pool_config.start_timeout_s:
                raise RewardPoolError(f"replacement reward worker {sid} did not start in time")

    def _replace(self, sid: str) -> None:
        ray.kill(self._slots[sid].actor, no_restart=True)
        self._slots[sid] = self._start(sid)
        self.metrics.restarts.labels(sid).inc()

    def _retry(self, call: _Call, err: BaseException) -> None:
        if self._attempts[call.index] > self.pool_config.max_retries:
            raise RewardPoolError(
                f"batch {call.index} failed {self._attempts[call.index]} time(s), last on {call.slot}: {err}"
            ) from err
        self.metrics.retries.labels(call.slot).inc()
        self._queue.appendleft((call.index, call.slot))

    def _update_gauges(self) -> None:
        self.metrics.pending.set(len(self._queue))
        for sid, slot in self._slots.items():
            self.metrics.queue_depth.labels(sid).set(0 if slot.batch is None else 1)


def batch_ids(results: Sequence[PoolResult]) -> list[str]:
    """Group ids of all scored and dropped groups, in result order (each input group exactly once)."""
    ids = []
    for r in results:
        ids.extend(r.batch.column("group_id").to_pylist())
        ids.extend(r.stats.dropped_group_ids)
    return ids

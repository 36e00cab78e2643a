"""The rollout actor pool: creates RolloutWorker actors, pushes adapters, replaces dead workers.

Only a dead actor is replaced.  An actor whose constructor raised (a config or
data error) is not: a fresh one would raise again, so the pool fails at once
with that error; so does a worker whose data holds no usable image
(``RolloutWorker.ready``).  Files found unusable while sampling arrive with each
call's result and go to the run's :class:`rollout.data_log.DataLog`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pyarrow as pa
import ray
from prometheus_client import CollectorRegistry
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from common.adapter_sync import AdapterWeights
from common.naosd import ModelConfig
from rollout.data_log import DataLog
from rollout.job import RolloutPoolConfig
from rollout.worker import RolloutConfig, RolloutResult, RolloutWorker
from sr_data.scan import DataSummary
from sr_data.source import DataConfig


class RolloutPool:
    """``num_workers`` slots, each holding one live :class:`RolloutWorker` actor.

    ``registry`` receives the data log's ``gdpo_data_skipped_total`` (the driver's, so it is served).
    """

    def __init__(
        self,
        model: ModelConfig,
        rollout: RolloutConfig,
        data: DataConfig,
        pool: RolloutPoolConfig,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._args = (model, rollout, data)
        self._pool = pool
        self._actor = ray.remote(RolloutWorker)  # a plain class, made an actor where it is created
        self.restarts = [0] * pool.num_workers
        self._run_token = uuid.uuid4().hex[:8]  # actor names are unique per run (operators can find them)
        self.data_log = DataLog(registry)
        self.workers: list[ActorHandle] = [self._spawn(slot) for slot in range(pool.num_workers)]
        summaries = []
        for slot, ready in enumerate([w.ready.remote() for w in self.workers]):
            try:  # a RayTaskError (no usable image) propagates: every worker reads the same data
                summaries.append(ray.get(ready))
            except RayActorError as err:
                if err.actor_init_failed:  # its constructor raised: a fresh one would too
                    raise
                summaries.append(self.replace(slot, None))  # died while starting: a fresh one gets the slot
        self.data_summary = summaries[0]  # every worker indexed the same files
        self.data_log.start(self.data_summary)

    def __len__(self) -> int:
        return len(self.workers)

    def _spawn(self, slot: int) -> ActorHandle:
        name = f"gdpo-rollout{slot}-{self._run_token}-{self.restarts[slot]}"
        pool = self._pool
        options = dict(name=name, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=dict(pool.resources))
        options["max_restarts"] = 0
        return self._actor.options(**options).remote(*self._args, f"rollout{slot}")

    def generate(self, slot: int, indices: Sequence[int], min_version: int) -> ray.ObjectRef:
        """Start a call; its result is read with :meth:`collect`."""
        return self.workers[slot].generate_reported.remote(list(indices), min_version)

    def collect(self, slot: int, call: ray.ObjectRef) -> pa.RecordBatch:
        """The group record of a finished :meth:`generate` call; the files its worker skipped are logged.

        Raises what ``ray.get`` raises: ``RayActorError`` for a dead worker, ``RayTaskError`` for a call
        that failed in a live one (not a reason to replace it).
        """
        result: RolloutResult = ray.get(call)
        self.data_log.record(result.skipped, where=f"rollout{slot}")
        return result.batch

    def push(self, weights: ray.ObjectRef) -> list[ray.ObjectRef]:
        """Send one adapter (already in the object store, put once) to every worker."""
        return [w.set_adapter.remote(weights) for w in self.workers]

    def replace(self, slot: int, weights: AdapterWeights | None) -> DataSummary:
        """Kill the worker in ``slot`` (if it still lives) and start a fresh one with the latest adapter."""
        if self.restarts[slot] >= self._pool.max_restarts:
            raise RuntimeError(f"rollout{slot} died {self.restarts[slot] + 1} times; giving up (max_restarts)")
        self.restarts[slot] += 1
        ray.kill(self.workers[slot], no_restart=True)
        self.workers[slot] = self._spawn(slot)
        summary = ray.get(self.workers[slot].ready.remote())
        if weights is not None:
            ray.get(self.workers[slot].set_adapter.remote(weights))
        return summary

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []

"""The rollout actor pool: creates RolloutWorker actors, pushes adapters, replaces dead workers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from common.adapter_sync import AdapterWeights
from common.naosd import ModelConfig
from rollout.job import RolloutPoolConfig
from rollout.worker import RolloutConfig, RolloutWorker
from sr_data.source import DataConfig


class RolloutPool:
    """``num_workers`` slots, each holding one live :class:`RolloutWorker` actor."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, data: DataConfig, pool: RolloutPoolConfig) -> None:
        self._args = (model, rollout, data)
        self._pool = pool
        self._actor = ray.remote(RolloutWorker)  # a plain class, made an actor where it is created
        self.restarts = [0] * pool.num_workers
        self._run_token = uuid.uuid4().hex[:8]  # actor names are unique per run (operators can find them)
        self.workers: list[ActorHandle] = [self._spawn(slot) for slot in range(pool.num_workers)]
        for slot, ready in enumerate([w.ready.remote() for w in self.workers]):
            try:
                ray.get(ready)
            except RayActorError:  # died while starting: a fresh one gets the slot
                self.replace(slot, None)

    def __len__(self) -> int:
        return len(self.workers)

    def _spawn(self, slot: int) -> ActorHandle:
        name = f"gdpo-rollout{slot}-{self._run_token}-{self.restarts[slot]}"
        pool = self._pool
        options = dict(name=name, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=dict(pool.resources))
        options["max_restarts"] = 0
        return self._actor.options(**options).remote(*self._args, f"rollout{slot}")

    def generate(self, slot: int, indices: Sequence[int], min_version: int) -> ray.ObjectRef:
        return self.workers[slot].generate.remote(list(indices), min_version)

    def push(self, weights: ray.ObjectRef) -> list[ray.ObjectRef]:
        """Send one adapter (already in the object store, put once) to every worker."""
        return [w.set_adapter.remote(weights) for w in self.workers]

    def replace(self, slot: int, weights: AdapterWeights | None) -> None:
        """Kill the worker in ``slot`` (if it still lives) and start a fresh one with the latest adapter."""
        if self.restarts[slot] >= self._pool.max_restarts:
            raise RuntimeError(f"rollout{slot} died {self.restarts[slot] + 1} times; giving up (max_restarts)")
        self.restarts[slot] += 1
        ray.kill(self.workers[slot], no_restart=True)
        self.workers[slot] = self._spawn(slot)
        ray.get(self.workers[slot].ready.remote())
        if weights is not None:
            ray.get(self.workers[slot].set_adapter.remote(weights))

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []

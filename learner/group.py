"""The learner as a group of Ray actors, one :class:`~learner.engine.LearnerRank` each.

``LearnerGroup`` reserves a placement group (all ranks on one node when one
node can hold them), starts the rank actors, has them form one
``torch.distributed`` group, and then drives them in lock-step: every global
batch is split evenly over the ranks, every checkpoint is written by all of
them.  Rank 0's adapter is what the rollout workers receive: it is put into
the object store once and every worker's ``set_adapter`` reads that one object.

The driver never imports DeepSpeed: the actors import :mod:`learner.engine`.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common import checkpoint_files, checkpoint_store
from common.adapter_sync import AdapterWeights
from common.naosd import ModelConfig
from common.ray_session import ACTOR_LOST, pool_request, wait_placement_group
from learner.config import LearnerConfig, LearnerPoolConfig

# Per-step keys every rank reports; every other key is the objective's per-group mean over the rank's shard.
_RANK_STATS = ("grad_norm", "step", "num_groups", "step_applied", "nonfinite")


@dataclass(frozen=True)
class Resumed:
    """Where :meth:`LearnerGroup.resume` resumed from, and the newer checkpoints it refused."""

    path: str  # a folder or a run-storage URI
    client_state: Any  # what the ranks' load_checkpoint returned (rank 0's)
    refused: tuple[tuple[str, str], ...]  # (checkpoint name, why), newest first


@dataclass(frozen=True)
class PushResult:
    """What one adapter push cost."""

    version: int
    digest: str
    nbytes: int  # adapter tensor bytes
    num_actors: int
    fetch_seconds: float  # rank 0 -> driver (0 when the caller already held the weights)
    seconds: float  # ray.put + every actor's set_adapter acknowledged


class RendezvousHost:
    """What every rank actor answers before it joins: a free port and its node's address.

    Ranks are built in a later ``setup`` call rather than in ``__init__``, so the
    group learns rank 0's free port first, then starts every rank's (blocking)
    join concurrently.
    """

    def free_port(self, host: str) -> int:
        """A TCP port that is free on this actor's node right now (for the rendezvous)."""
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6, as ``host`` is
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()


class CheckpointHost:
    """What a rank actor answers about the checkpoint folders its node sees (GDPO and pre-training ranks)."""

    def checkpoints(self, root: str) -> list[str]:
        """Committed checkpoints under ``root`` (folder or URI), newest first (unverified: loading verifies)."""
        return checkpoint_store.committed(root)

    def reject_checkpoint(self, directory: str, why: str) -> str:
        return checkpoint_store.reject(directory, why)


class _RankHost(RendezvousHost, CheckpointHost):
    """Body of a GDPO rank actor: builds its LearnerRank in :meth:`setup`, then forwards calls."""

    def __init__(self) -> None:
        self._rank: Any = None

    def setup(
        self, model_config: ModelConfig, learner_config: LearnerConfig, *, rank: int, world: int, addr: str, port: int
    ) -> None:
        from learner.engine import LearnerRank  # DeepSpeed is imported in the actor only

        self._rank = LearnerRank(model_config, learner_config, rank, world, addr, port)

    def train_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        return self._rank.train_step(batch)

    def adapter_weights(self, version: int | None) -> AdapterWeights:
        return self._rank.adapter_weights(version)

    def save_checkpoint(self, root: str, client_state: dict[str, Any], keep: int) -> str:
        return str(self._rank.save_checkpoint(root, client_state, keep=keep))

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return self._rank.load_checkpoint(directory)


PEER_DEATH_WAIT_S = 30.0  # how long a rank's failure waits for the others to show whether one of them died


class LearnerDied(RuntimeError):
    """A learner rank's actor is gone (node lost, OOM kill): restart the group and resume it."""


def _gather(refs: list[ray.ObjectRef]) -> list[Any]:
    """Every rank's result, in rank order.  A dead rank raises :class:`LearnerDied` as soon as it is seen,
    not after the ranks still waiting for it in a collective give up.  A rank's own error waits up to
    ``PEER_DEATH_WAIT_S`` for the others: failing because a peer died (gloo: the connection closed) is
    that death; otherwise the error is raised as the bug it is."""
    results: dict[int, Any] = {}
    remaining, task_error, deadline = list(refs), None, None
    while remaining:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            break
        done, remaining = ray.wait(remaining, num_returns=1, timeout=timeout)
        for ref in done:
            rank = refs.index(ref)
            try:
                results[rank] = ray.get(ref)
            except ACTOR_LOST as err:
                raise LearnerDied(f"learner rank {rank} died: {err}") from err
            except RayTaskError as err:
                if task_error is None:
                    task_error, deadline = err, time.monotonic() + PEER_DEATH_WAIT_S
    if task_error is not None:
        raise task_error
    return [results[rank] for rank in range(len(refs))]


class LearnerGroup:
    """``pool_config.num_ranks`` data-parallel learner ranks as Ray actors."""

    def __init__(
        self,
        model_config: ModelConfig,
        learner_config: LearnerConfig,
        pool_config: LearnerPoolConfig,
        *,
        ready_timeout_s: float | None = None,  # None: pool_config.start_timeout_s
    ) -> None:
        """Reserve resources, start the ranks and form the process group (blocks until it is formed)."""
        self._config, self._pool, self._model_config = learner_config, pool_config, model_config
        ready_timeout_s = pool_config.start_timeout_s if ready_timeout_s is None else ready_timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._pg: PlacementGroup | None = None
        self._ranks: list[Any] = []
        try:
            self._start(model_config, ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, model_config: ModelConfig, ready_timeout_s: float) -> None:
        self._pg, self._ranks = start_ranks(
            _RankHost, self._pool, lambda r, **kw: r.setup.remote(model_config, self._config, **kw), ready_timeout_s
        )

    @property
    def world_size(self) -> int:
        return len(self._ranks)

    def step(self, batch: pa.RecordBatch) -> dict[str, float]:
        """One optimiser step on a scored global batch of ``N`` groups; ``N`` must divide evenly over the ranks."""
        return self.finish_step(self.start_step(batch))

    def start_step(self, batch: pa.RecordBatch) -> list[ray.ObjectRef]:
        """Send every rank its shard and return at once (the driver keeps rollout and reward busy meanwhile)."""
        n, world = batch.num_rows, self.world_size
        if n == 0 or n % world:
            raise ValueError(f"a batch of {n} groups does not split evenly over {world} learner ranks")
        per = n // world
        # take() copies the rows out; a slice() would pickle the whole parent buffers to every rank.
        shards = [batch.take(pa.array(np.arange(i * per, (i + 1) * per))) for i in range(world)]
        return [r.train_step.remote(s) for r, s in zip(self._ranks, shards, strict=True)]

    def finish_step(self, pending: list[ray.ObjectRef]) -> dict[str, float]:
        """Wait for the ranks of a :meth:`start_step` and return the step's global stats."""
        return _aggregate(_gather(pending))

    def adapter_weights(self, version: int | None = None) -> AdapterWeights:
        """Rank 0's adapter (every rank takes part under ZeRO-3, where gathering it is a collective)."""
        ranks = self._ranks if self._config.zero_stage == 3 else self._ranks[:1]
        return _gather([r.adapter_weights.remote(version) for r in ranks])[0]

    def push(self, rollout_actors: Sequence[Any], version: int) -> PushResult:
        """Send rank 0's adapter, labelled ``version``, to every rollout actor's ``set_adapter``."""
        start = time.perf_counter()
        weights = self.adapter_weights(version)
        fetched = time.perf_counter() - start
        result = push_weights(weights, rollout_actors)
        return dataclasses.replace(result, fetch_seconds=fetched)

    def save_checkpoint(self, root: str | Path, client_state: dict[str, Any], *, keep: int = 0) -> str:
        """Write ``<root>/checkpoint-<step>/`` atomically (every rank its DeepSpeed state, rank 0 the
        adapter, then rank 0 seals it), keeping the newest ``keep`` (0: all); returns its location."""
        return _gather([r.save_checkpoint.remote(str(root), client_state, keep) for r in self._ranks])[0]

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Every rank resumes from one checkpoint folder; returns the client state saved with it."""
        return _gather([r.load_checkpoint.remote(str(directory)) for r in self._ranks])[0]

    def resume(self, root: str | Path) -> Resumed | None:
        """Every rank resumes from the newest intact checkpoint under ``root`` (see :func:`resume_ranks`)."""
        return resume_ranks(self._ranks, root)

    def restart(self) -> None:
        """Kill every rank (a dead one leaves the others stuck in a collective) and start fresh ones in place.

        The new ranks hold a freshly initialised adapter and optimizer: follow with :meth:`resume`.
        """
        self.shutdown()
        try:
            self._start(self._model_config, self._ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Kill the rank actors and release their placement group (safe to call twice)."""
        for actor in self._ranks:
            ray.kill(actor)
        self._ranks = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def start_ranks(
    host_cls: type, pool: LearnerPoolConfig, setup: Callable[..., ray.ObjectRef], ready_timeout_s: float
) -> tuple[PlacementGroup, list[Any]]:
    """Reserve ``pool``'s bundles, start one ``host_cls`` actor per rank and form the process group.

    ``host_cls`` has ``free_port(host)`` and ``node_ip()`` (see :class:`RendezvousHost`);
    ``setup(actor, rank=, world=, addr=, port=)`` issues the actor's (blocking) join.
    The caller removes the placement group and kills the actors when done.
    """
    request = pool_request(
        "learner", pool.num_ranks, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=pool.resources
    )
    bundle = dict(request.per_actor)
    one_node = _fits_one_node(bundle, pool.num_ranks)
    pg = placement_group([bundle] * pool.num_ranks, strategy="STRICT_PACK" if one_node else "PACK")
    ranks: list[Any] = []
    try:
        wait_placement_group(pg, request, ready_timeout_s)  # prints progress; a clear error on timeout
        options = dict(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=dict(pool.resources))
        actor_cls = ray.remote(**options)(host_cls)
        # CPU ranks: keep DeepSpeed off any GPU the node may have (it would pick CUDA/NCCL).
        runtime_env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if pool.num_gpus == 0 else {}
        ranks = [
            actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                runtime_env=runtime_env,
            ).remote()
            for i in range(pool.num_ranks)
        ]
        # One node: the rendezvous stays on loopback; several nodes need rank 0's address.
        addr = "127.0.0.1" if one_node else ray.get(ranks[0].node_ip.remote())
        port = ray.get(ranks[0].free_port.remote(addr))
        # Concurrently: each rank's join blocks until all ranks have joined.
        joins = [setup(r, rank=i, world=pool.num_ranks, addr=addr, port=port) for i, r in enumerate(ranks)]
        ray.get(joins, timeout=ready_timeout_s)
    except BaseException:
        for actor in ranks:
            ray.kill(actor)
        remove_placement_group(pg)
        raise
    return pg, ranks


def resume_ranks(ranks: Sequence[Any], root: str | Path) -> Resumed | None:
    """Load the newest intact checkpoint under ``root`` on every rank; None when there is none at all.

    ``ranks`` are actors with :class:`CheckpointHost`'s methods and ``load_checkpoint(folder)``.
    Checkpoints are tried newest first; one that fails verification or loading (torn, changed,
    unsafe) is renamed ``<name>.rejected`` and the next older one is tried.  Checkpoints that
    exist but are all refused are an error, never a silent fresh start.
    """
    refused: list[tuple[str, str]] = []
    for path in ray.get(ranks[0].checkpoints.remote(str(root))):
        try:
            states = ray.get([r.load_checkpoint.remote(path) for r in ranks])
        except ValueError as err:  # CheckpointError, also when Ray wraps it in a RayTaskError
            why = str(getattr(err, "cause", err))
            refused.append((checkpoint_store.name_of(path), why))
            ray.get(ranks[0].reject_checkpoint.remote(path, why))
            continue
        return Resumed(path=path, client_state=states[0], refused=tuple(refused))
    if refused:
        reasons = "; ".join(f"{name}: {why}" for name, why in refused)
        raise checkpoint_files.CheckpointError(
            f"no intact checkpoint under {root} (all refused: renamed *.rejected, or marked REJECTED in run storage): "
            f"{reasons}"
        )
    return None


def push_weights(weights: AdapterWeights, rollout_actors: Sequence[Any]) -> PushResult:
    """``ray.put`` the adapter once and hand the same object to every actor's ``set_adapter``.

    Ray resolves the reference before the call runs, so ``set_adapter``
    receives the :class:`AdapterWeights` itself (and should call
    :func:`common.adapter_sync.apply_to`).  Returns when every actor has
    acknowledged.
    """
    start = time.perf_counter()
    ref = ray.put(weights)  # one copy in the object store, read by every actor
    ray.get([actor.set_adapter.remote(ref) for actor in rollout_actors])
    return PushResult(
        version=weights.version,
        digest=weights.digest,
        nbytes=weights.nbytes,
        num_actors=len(rollout_actors),
        fetch_seconds=0.0,
        seconds=time.perf_counter() - start,
    )


def _fits_one_node(bundle: dict[str, float], count: int) -> bool:
    """Whether some live node has the resources of ``count`` bundles in total (STRICT_PACK can succeed)."""
    for node in ray.nodes():
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0.0) >= v * count for k, v in bundle.items()):
            return True
    return False


def _aggregate(stats: list[dict[str, float]]) -> dict[str, float]:
    """Global stats from the ranks' stats (equal shards, so means of means are the batch means)."""
    steps = {s["step"] for s in stats}
    if len(steps) != 1:
        raise RuntimeError(f"learner ranks disagree on the step counter: {sorted(steps)}")
    means = [key for key in stats[0] if key not in _RANK_STATS]  # equal shards: the mean of means
    out = {key: sum(s[key] for s in stats) / len(stats) for key in means}
    out.update(
        grad_norm=stats[0]["grad_norm"],  # already global: the norm of the all-reduced gradient
        step=stats[0]["step"],
        num_groups=sum(s["num_groups"] for s in stats),
        step_applied=min(s["step_applied"] for s in stats),
        nonfinite=max(s["nonfinite"] for s in stats),  # skipped on every rank; some may have seen only NaN grads
        world_size=float(len(stats)),
    )
    return out

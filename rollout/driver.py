"""The GDPO-SR training loop, whole: rollout -> reward -> learner -> adapter back to rollout.

Three pools of Ray actors, each scaled on its own:

    RolloutPool   G NAOSD samples per LR image       -> Arrow batch of groups
    RewardPool    ARF scores and group advantages    -> the batch + reward columns
    LearnerGroup  DeepSpeed ranks, GDPO loss         -> adapter version v, pushed to rollout

Each rollout worker is kept ``max_inflight_per_worker`` calls ahead: a bounded
queue, so sampling never runs unboundedly ahead of the learner.  Finished
groups go to the reward pool; the learner takes ``groups_per_step`` scored
groups per step.  In policy mode a group sampled with adapter ``v`` is trained
on at learner version ``s`` only if ``s - v <= max_staleness``; older ones are
dropped and counted.  A dead rollout worker is replaced and its groups
re-issued (the reward pool retries on its own).  The data position (next index
plus the indices handed out but not yet trained on) is checkpointed with the
learner, so a resumed run sees exactly the pairs it would have seen.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from common.config import save_config
from common.records import REFERENCE_POLICY_VERSION, concat, decode_rewards, decode_rollout, select_rows
from common.telemetry import Telemetry
from common.tiny import TINY_MODEL_NOTICE
from learner.group import LearnerGroup
from reward_service.pool import RewardPool
from rollout.grid import save_sample_grid
from rollout.job import JobConfig
from rollout.pool import RolloutPool

CHECKPOINT_DIR = "checkpoint"


@dataclass
class DataPosition:
    next_index: int = 0  # first data index never handed out
    pending: list[int] = field(default_factory=list)  # handed out, not yet trained on or dropped


def train(job: JobConfig) -> dict[str, float]:
    """Run the job to ``job.run.steps`` optimizer steps; returns the last step's summary."""
    out = Path(job.run.output_dir)
    save_config(job, out / "config.yaml")
    if job.model.source == "tiny":
        print(TINY_MODEL_NOTICE, flush=True)
    telemetry = Telemetry()
    port = telemetry.serve(job.metrics)
    if port:
        print(f"metrics: http://{job.metrics.host}:{port}/metrics", flush=True)
    pools: list = []
    try:
        rollout = RolloutPool(job.model, job.rollout, job.data, job.cluster.rollout)
        pools.append(rollout)
        reward = RewardPool(job.reward, job.cluster.reward, registry=telemetry.registry)  # its metrics served too
        pools.append(reward)
        learner = LearnerGroup(job.model, job.learner, job.cluster.learner)
        pools.append(learner)
        return _train_loop(job, out, telemetry, rollout=rollout, reward=reward, learner=learner)
    finally:
        for pool in reversed(pools):  # explicit shutdown, whatever happened
            pool.shutdown()
        telemetry.close()


def _train_loop(
    job: JobConfig, out: Path, telemetry: Telemetry, *, rollout: RolloutPool, reward: RewardPool, learner: LearnerGroup
) -> dict[str, float]:
    step, position = 0, DataPosition()
    if job.run.resume and (out / CHECKPOINT_DIR).is_dir():
        state = learner.load_checkpoint(out / CHECKPOINT_DIR)
        step, position = state["step"], DataPosition(**state["data"])
        print(f"resumed at step {step}, data index {position.next_index}", flush=True)
    _push(learner, rollout, step, telemetry)
    stream = _GroupStream(job, rollout, reward, telemetry, position)
    summary: dict[str, float] = {}
    started, waited, batch = time.perf_counter(), 0.0, None
    while step < job.run.steps:
        wait_start = time.perf_counter()
        batch = stream.take(job.run.groups_per_step, learner_version=step, learner=learner)
        wait = time.perf_counter() - wait_start
        step_start = time.perf_counter()
        stats = learner.step(batch)
        step_seconds = time.perf_counter() - step_start
        step += 1
        position.pending = sorted(set(position.pending) - set(decode_rollout(batch).data_index.tolist()))
        if step % job.learner.push_every == 0:
            _push(learner, rollout, step, telemetry)
        waited += wait
        summary = _record(
            telemetry,
            batch,
            stats,
            step=step,
            step_seconds=step_seconds,
            wait=wait,
            waited=waited,
            elapsed=time.perf_counter() - started,
        )
        summary["rollout_restarts"] = float(sum(rollout.restarts))
        if step == 1:  # steady state: from the end of the first step (actors warm, DeepSpeed built)
            first_step_end, first_step_samples = time.perf_counter(), summary["samples"]
        elif step > 1:
            steady = (summary["samples"] - first_step_samples) / (time.perf_counter() - first_step_end)
            summary["steady_samples_per_second"] = steady
        if step % job.run.log_every == 0:
            _print_progress(summary)
        if job.learner.checkpoint_every and step % job.learner.checkpoint_every == 0:
            _checkpoint(learner, out, step, position)
    _checkpoint(learner, out, step, position)
    if job.run.sample_grid and batch is not None:
        print(f"sample grid: {save_sample_grid(batch, out / 'samples.png')}", flush=True)
    return summary


class _GroupStream:
    """Rollout calls in flight -> reward pool -> scored groups ready for the learner."""

    def __init__(
        self, job: JobConfig, rollout: RolloutPool, reward: RewardPool, telemetry: Telemetry, position: DataPosition
    ) -> None:
        self.job, self.rollout, self.reward, self.telemetry, self.position = job, rollout, reward, telemetry, position
        self.reissue: deque[int] = deque(position.pending)  # resumed: these go out first
        # rollout call -> (worker slot, that slot's restart count when issued, data indices)
        self.calls: dict[ray.ObjectRef, tuple[int, int, list[int]]] = {}
        self.scoring: dict[int, dict[str, int]] = {}  # reward ticket -> {group_id: data index}
        self.ready: list[pa.RecordBatch] = []

    def take(self, count: int, *, learner_version: int, learner: LearnerGroup) -> pa.RecordBatch:
        """The next ``count`` scored groups (blocks, keeping every stage busy meanwhile)."""
        while sum(b.num_rows for b in self.ready) < count:
            self._issue(learner_version)
            self._collect_rollouts(learner, learner_version)
            self._collect_scores(learner_version)
        batch = concat(self.ready)
        self.ready = [batch.slice(count)] if batch.num_rows > count else []
        return batch.slice(0, count)

    def _issue(self, learner_version: int) -> None:
        rollout, per_call = self.job.rollout, self.job.rollout.groups_per_call
        min_version = max(0, learner_version - rollout.max_staleness)
        for slot in range(len(self.rollout)):
            while sum(1 for s, *_ in self.calls.values() if s == slot) < rollout.max_inflight_per_worker:
                indices = [self.reissue.popleft() for _ in range(min(per_call, len(self.reissue)))]
                while len(indices) < per_call:
                    indices.append(self.position.next_index)
                    self.position.pending.append(self.position.next_index)
                    self.position.next_index += 1
                call = self.rollout.generate(slot, indices, min_version)
                self.calls[call] = (slot, self.rollout.restarts[slot], indices)
        self.telemetry.queue_depth.labels(stage="rollout").set(len(self.calls))

    def _collect_rollouts(self, learner: LearnerGroup, learner_version: int) -> None:
        done, _ = ray.wait(list(self.calls), num_returns=1, timeout=0.05)
        for ref in done:
            slot, generation, indices = self.calls.pop(ref)
            try:
                batch = ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                # Dead worker, or (policy mode) one whose weights are too old: replace it with a fresh
                # worker holding the current adapter (unless that already happened), re-issue its groups.
                if generation == self.rollout.restarts[slot]:
                    print(f"rollout{slot} failed ({type(err).__name__}); replacing it", flush=True)
                    self.rollout.replace(slot, learner.adapter_weights(learner_version))
                    self.telemetry.worker_restarts.labels(pool="rollout").inc()
                self.reissue.extendleft(reversed(indices))
                continue
            groups = decode_rollout(batch)
            self.telemetry.groups_generated.labels(worker=f"rollout{slot}").inc(batch.num_rows)
            for seconds in groups.generate_seconds:
                self.telemetry.rollout_seconds.observe(seconds)
            self.scoring[self.reward.submit(batch)] = dict(
                zip(groups.group_id, groups.data_index.tolist(), strict=True)
            )
        self.telemetry.queue_depth.labels(stage="reward").set(self.reward.num_pending)

    def _collect_scores(self, learner_version: int) -> None:
        for result in self.reward.poll(timeout=0.0 if self.calls else 0.05):
            index_of, stats = self.scoring.pop(result.ticket), result.stats
            self.telemetry.groups_scored.inc(stats.groups_scored)
            self.telemetry.groups_dropped.labels(reason="nonfinite").inc(stats.nonfinite_groups)
            self.telemetry.groups_dropped.labels(reason="filtered").inc(stats.filtered_groups)
            self._forget([index_of[g] for g in stats.dropped_group_ids])  # never trained on: not pending
            batch = result.batch
            if batch.num_rows == 0:
                continue
            for seconds in decode_rewards(batch).reward_seconds:
                self.telemetry.reward_seconds.observe(seconds)
            self.ready.append(self._drop_stale(batch, learner_version))
        self.telemetry.queue_depth.labels(stage="ready").set(sum(b.num_rows for b in self.ready))

    def _drop_stale(self, batch: pa.RecordBatch, learner_version: int) -> pa.RecordBatch:
        versions = decode_rollout(batch).policy_version
        if (versions == REFERENCE_POLICY_VERSION).all():
            return batch
        staleness = learner_version - versions
        for s in staleness:
            self.telemetry.staleness.observe(s)
        keep = staleness <= self.job.rollout.max_staleness
        if not keep.all():
            self.telemetry.groups_dropped.labels(reason="stale").inc(int((~keep).sum()))
            self._forget(decode_rollout(batch).data_index[~keep].tolist())
        return select_rows(batch, keep)

    def _forget(self, indices: list[int]) -> None:
        if indices:
            self.position.pending = sorted(set(self.position.pending) - set(indices))


def _push(learner: LearnerGroup, rollout: RolloutPool, version: int, telemetry: Telemetry) -> None:
    """Rank 0's adapter, put in the object store once, applied in place by every rollout worker."""
    start = time.perf_counter()
    weights = learner.adapter_weights(version)
    ref = ray.put(weights)
    for slot, ack in enumerate(rollout.push(ref)):
        try:
            ray.get(ack)
        except RayActorError:  # died since its last call: its replacement starts with these weights
            rollout.replace(slot, weights)
            telemetry.worker_restarts.labels(pool="rollout").inc()
    telemetry.push_seconds.observe(time.perf_counter() - start)
    telemetry.push_bytes.inc(weights.nbytes * len(rollout))


def _checkpoint(learner: LearnerGroup, out: Path, step: int, position: DataPosition) -> None:
    learner.save_checkpoint(out / CHECKPOINT_DIR, {"step": step, "data": asdict(position)})


def _record(
    telemetry: Telemetry,
    batch: pa.RecordBatch,
    stats: dict[str, float],
    *,
    step: int,
    step_seconds: float,
    wait: float,
    waited: float,
    elapsed: float,
) -> dict[str, float]:
    rewards, groups = decode_rewards(batch), decode_rollout(batch)
    samples = step * groups.num_groups * groups.group_size
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
    telemetry.groups_consumed.inc(groups.num_groups)
    telemetry.step.set(step)
    telemetry.step_seconds.observe(step_seconds)
    telemetry.wait_seconds.observe(wait)
    telemetry.loss.set(summary["loss"])
    telemetry.reward_mean.set(summary["reward_mean"])
    telemetry.reward_std.set(summary["reward_std"])
    telemetry.advantage_abs.set(summary["advantage_abs_mean"])
    telemetry.samples_per_second.set(summary["samples_per_second"])
    telemetry.wait_fraction.set(summary["learner_wait_fraction"])
    return summary


def _print_progress(s: dict[str, float]) -> None:
    print(
        f"step {s['step']:.0f} | loss {s['loss']:.4f} | reward {s['reward_mean']:.3f} "
        f"(group std {s['reward_std']:.3f}) "
        f"| |adv| {s['advantage_abs_mean']:.3f} max {s['advantage_max']:.2f} | grad {s['grad_norm']:.3g} "
        f"| {s['samples_per_second']:.2f} samples/s | learner waited {100 * s['learner_wait_fraction']:.0f}%",
        flush=True,
    )

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
re-issued (the reward pool retries on its own); a dead learner rank gets the
whole learner group rebuilt and resumed from the last checkpoint
(``run.max_learner_restarts``).  The data position (next index
plus the indices handed out but not yet trained on) is checkpointed with the
learner, so a resumed run sees exactly the pairs it would have seen.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pyarrow as pa
import ray
from ray.exceptions import RayError

from common.adapter_sync import AdapterWeights
from common.ray_session import ACTOR_LOST
from common.records import REFERENCE_POLICY_VERSION, concat, decode_rewards, decode_rollout, select_rows
from common.telemetry import Telemetry
from common.tiny import model_notice
from learner.group import LearnerDied, LearnerGroup
from reward_service.pool import RewardPool
from rollout.grid import save_sample_grid
from rollout.job import JobConfig
from rollout.pool import RolloutPool
from rollout.resume import (
    DataPosition,
    checkpoint_root,
    mirror_outputs,
    prepare_run_folder,
    resume_learner,
    run_outputs,
)
from rollout.step_report import check_finite, log_trained_groups, print_progress, record_step
from rollout.stop import StopSignals
from rollout.validation import CSV_NAME, ValidationRunner


def train(job: JobConfig) -> dict[str, float]:
    """Run the job to ``job.run.steps`` optimizer steps; returns the last step's summary."""
    out = Path(job.run.output_dir)
    prepare_run_folder(job)  # a resume that changes the model, data, seed or objective stops here
    if notice := model_notice(job.model.source, job.model.naosd_path):
        print(notice, flush=True)
    telemetry = Telemetry()
    port = telemetry.serve(job.metrics, tensorboard_dir=out / "tensorboard")
    if port:
        print(f"metrics: http://{job.metrics.host}:{port}/metrics", flush=True)
    pools: list = []
    try:
        rollout = RolloutPool(job.model, job.rollout, job.data, job.cluster.rollout, registry=telemetry.registry)
        pools.append(rollout)
        reward = RewardPool(job.reward, job.cluster.reward, registry=telemetry.registry)  # its metrics served too
        pools.append(reward)
        learner = LearnerGroup(job.model, job.learner, job.cluster.learner)
        pools.append(learner)
        validation = None
        if job.run.validate_every:  # held-out validation and the reward-hacking alarm (rollout/validation.py)
            validation = ValidationRunner(job.validation, job.model, job.reward, every=job.run.validate_every,
                                          out=out, telemetry=telemetry)  # fmt: skip
            pools.append(validation)
        return _train_loop(job, out, telemetry, rollout=rollout, reward=reward, learner=learner, validation=validation)
    finally:
        for pool in reversed(pools):  # explicit shutdown, whatever happened
            pool.shutdown()
        telemetry.close()
        mirror_outputs(job)  # the last samples, TensorBoard events and logs into run.storage


def _train_loop(
    job: JobConfig, out: Path, telemetry: Telemetry, *, rollout: RolloutPool, reward: RewardPool, learner: LearnerGroup,
    validation: ValidationRunner | None,
) -> dict[str, float]:  # fmt: skip
    step, position = resume_learner(learner, job, telemetry) if job.run.resume else (0, DataPosition())
    with StopSignals() as stop:  # SIGINT/SIGTERM: finish the step in hand, checkpoint, stop
        summary = _run_steps(job, out, telemetry, step, position, stop, rollout=rollout, reward=reward, learner=learner,
                             validation=validation)  # fmt: skip
    if stop.requested:
        print(f"stopped by {signal.Signals(stop.signum).name} at step {summary.get('step', step):.0f}; "
              f"the checkpoint is written: resume with run.resume=true", flush=True)  # fmt: skip
        summary["stopped_by_signal"] = float(stop.signum)
    return summary


def _run_steps(  # noqa: PLR0917 - the loop's state, passed once
    job: JobConfig, out: Path, telemetry: Telemetry, step: int, position: DataPosition, stop: StopSignals, *,
    rollout: RolloutPool, reward: RewardPool, learner: LearnerGroup, validation: ValidationRunner | None,
) -> dict[str, float]:  # fmt: skip
    pipeline = _Pipeline(job, rollout, reward, telemetry, position, stop)
    pipeline.push(learner.adapter_weights(step))
    if validation:  # the policy as the run starts: the alarm's next point
        _validate_from(validation, job, learner, step)
    summary: dict[str, float] = {}
    started, waited, batch, first_step, nonfinite_in_row = time.perf_counter(), 0.0, None, step, 0
    restarts, checkpointed = 0, job.run.resume  # what a learner recovery may resume from: this run's checkpoints
    while step < job.run.steps and not stop.requested:
        # Rollout: wait for a step's worth of scored groups (the only time the learner idles).
        wait_start = time.perf_counter()
        taken = pipeline.take(job.run.groups_per_step, learner_version=step)
        if taken is None:  # a stop signal came while waiting
            break
        batch, wait = taken, time.perf_counter() - wait_start
        waited += wait
        # Training: one optimizer step; rollout and reward keep working while it runs.  A learner rank that
        # dies anywhere in the step (training, the adapter push, the checkpoint write) rolls the group back.
        step_start = time.perf_counter()
        try:
            stats = learner.finish_step(pipeline.run_until(learner.start_step(batch), learner_version=step))
            step_seconds = time.perf_counter() - step_start
            step += 1
            nonfinite_in_row = check_finite(stats, step, nonfinite_in_row, job.run.max_nonfinite_steps, telemetry)
            groups = decode_rollout(batch)
            pipeline.forget(groups.data_index.tolist())  # trained on: no longer pending
            log_trained_groups(out, step, groups)
            summary = record_step(
                telemetry, groups, decode_rewards(batch), stats, step=step, run_steps=step - first_step,
                step_seconds=step_seconds, wait=wait, waited=waited, elapsed=time.perf_counter() - started,
            )  # fmt: skip
            summary["rollout_restarts"], summary["learner_restarts"] = float(sum(rollout.restarts)), float(restarts)
            if step == first_step + 1:  # steady state: from the end of this run's first step (actors warm)
                first_step_end, first_step_samples = time.perf_counter(), summary["samples"]
            else:
                steady = (summary["samples"] - first_step_samples) / (time.perf_counter() - first_step_end)
                summary["steady_samples_per_second"] = steady
            if step % job.run.log_every == 0:
                print_progress(summary)
            checkpointed |= _hand_on(job, learner, pipeline, validation, telemetry, step, position)
        except LearnerDied as err:  # rebuild the group and resume it from the last checkpoint
            restarts += 1
            step, position = _recover_learner(job, learner, telemetry, err, restarts, checkpointed)
            first_step = min(first_step, step)
            pipeline = _Pipeline(job, rollout, reward, telemetry, position, stop)  # what was in flight is re-issued
            pipeline.push(learner.adapter_weights(step))
            if validation:
                _validate_from(validation, job, learner, step)
    if validation:
        validation.finish()
    _checkpoint(learner, job, step, position, telemetry)
    if job.run.sample_grid and batch is not None:
        print(f"sample grid: {save_sample_grid(batch, out / 'samples.png')}", flush=True)
    return summary


class _Pipeline:
    """Rollout calls in flight -> reward pool -> scored groups ready for the learner.

    A bounded queue: at most ``groups_per_step`` plus every worker's
    ``max_inflight_per_worker`` calls' worth of groups are anywhere between
    sampling and training, so sampling never runs unboundedly ahead.
    """

    POLL_S = 0.02

    def __init__(  # noqa: PLR0917 - the loop's parts, passed once
        self, job: JobConfig, rollout: RolloutPool, reward: RewardPool, telemetry: Telemetry, position: DataPosition,
        stop: StopSignals,
    ) -> None:  # fmt: skip
        self.job, self.rollout, self.reward, self.telemetry, self.position = job, rollout, reward, telemetry, position
        self.stop = stop
        cfg = job.rollout
        self.capacity = job.run.groups_per_step + len(rollout) * cfg.max_inflight_per_worker * cfg.groups_per_call
        self.reissue: deque[int] = deque(position.pending)  # resumed: these go out first
        # rollout call -> (worker slot, that slot's restart count when issued, data indices)
        self.calls: dict[ray.ObjectRef, tuple[int, int, list[int]]] = {}
        self.scoring: dict[int, dict[str, int]] = {}  # reward ticket -> {group_id: data index}
        self.ready: list[pa.RecordBatch] = []
        self.weights: AdapterWeights | None = None  # the latest pushed adapter
        self.acks: dict[ray.ObjectRef, tuple[int, int]] = {}  # set_adapter call -> (slot, restart count)
        self.push_started = 0.0

    # --- what the loop calls -------------------------------------------------------------------

    def take(self, count: int, *, learner_version: int) -> pa.RecordBatch | None:
        """The next ``count`` scored groups (blocks, keeping every stage busy); None once a stop is requested."""
        # Staleness is judged against the version the learner is at now: what waited through the last
        # step is filtered here once, what arrives during this call is filtered as it arrives.
        self.ready = [self._drop_stale(b, learner_version) for b in self.ready]
        while self._ready_groups() < count:
            if self.stop.requested:  # what is in flight stays pending in the data position: re-issued on resume
                return None
            self._pump(learner_version)
        batch = concat(self.ready)
        self.ready = [batch.slice(count)] if batch.num_rows > count else []
        batch = batch.slice(0, count)
        for version in decode_rollout(batch).policy_version:
            if version != REFERENCE_POLICY_VERSION:
                self.telemetry.staleness.observe(learner_version - version)
        return batch

    def run_until(self, pending: list[ray.ObjectRef], *, learner_version: int) -> list[ray.ObjectRef]:
        """Keep sampling and scoring until the learner's ``pending`` calls are done.

        Returns at once when one of them failed (a dead rank leaves the others waiting in a collective):
        ``LearnerGroup.finish_step`` then says whether a rank died or raised.
        """
        looked_at: set[ray.ObjectRef] = set()  # finished without error
        while True:
            done = ray.wait(pending, num_returns=len(pending), timeout=0)[0]
            if len(done) == len(pending) or any(_failed(ref) for ref in done if ref not in looked_at):
                return pending
            looked_at.update(done)
            self._pump(learner_version)

    def push(self, weights: AdapterWeights) -> None:
        """Send an adapter to every worker without waiting: a worker applies it before its next call."""
        self.weights, self.push_started = weights, time.perf_counter()
        ref = ray.put(weights)  # one copy in the object store, read by every worker
        for slot, ack in enumerate(self.rollout.push(ref)):
            self.acks[ack] = (slot, self.rollout.restarts[slot])
        self.telemetry.push_bytes.inc(weights.nbytes * len(self.rollout))

    def forget(self, indices: list[int]) -> None:
        """Data indices trained on or dropped: no longer pending for a resume."""
        if indices:
            self.position.pending = sorted(set(self.position.pending) - set(indices))

    # --- one turn of the crank -----------------------------------------------------------------

    def _pump(self, learner_version: int) -> None:
        self._issue(learner_version)
        waitable = [*self.calls, *self.acks]
        done = ray.wait(waitable, num_returns=len(waitable), timeout=self.POLL_S)[0] if waitable else []
        for ref in done:
            if ref in self.calls:
                self._on_rollout(ref)
            else:
                self._on_ack(ref)
        self._on_scores(learner_version)
        t = self.telemetry
        t.queue_depth.labels(stage="rollout").set(len(self.calls))
        t.queue_depth.labels(stage="ready").set(self._ready_groups())

    def _issue(self, learner_version: int) -> None:
        cfg = self.job.rollout
        min_version = max(0, learner_version - cfg.max_staleness)
        for slot in range(len(self.rollout)):
            while (
                sum(1 for s, *_ in self.calls.values() if s == slot) < cfg.max_inflight_per_worker
                and self._groups_in_flight() + cfg.groups_per_call <= self.capacity
            ):
                indices = [self.reissue.popleft() for _ in range(min(cfg.groups_per_call, len(self.reissue)))]
                while len(indices) < cfg.groups_per_call:
                    indices.append(self.position.next_index)
                    self.position.pending.append(self.position.next_index)
                    self.position.next_index += 1
                call = self.rollout.generate(slot, indices, min_version)
                self.calls[call] = (slot, self.rollout.restarts[slot], indices)

    def _on_rollout(self, ref: ray.ObjectRef) -> None:
        slot, generation, indices = self.calls.pop(ref)
        try:
            batch = self.rollout.collect(slot, ref)
        except ACTOR_LOST as err:
            # A dead worker: a fresh one with the latest adapter takes the slot (unless that already
            # happened) and the groups go out again.  A task error (RayTaskError) is no death: the
            # worker already skips bad files, so what reaches here is systematic (no usable image, a
            # bug, stale weights from a config that never pushes in time); it fails the run at once.
            self._replace(slot, generation, err)
            self.reissue.extendleft(reversed(indices))
            return
        groups = decode_rollout(batch)
        self.telemetry.groups_generated.labels(worker=f"rollout{slot}").inc(batch.num_rows)
        for seconds in groups.generate_seconds:
            self.telemetry.rollout_seconds.observe(seconds)
        ticket = self.reward.submit(batch)
        self.scoring[ticket] = dict(zip(groups.group_id, groups.data_index.tolist(), strict=True))

    def _on_ack(self, ref: ray.ObjectRef) -> None:
        slot, generation = self.acks.pop(ref)
        try:
            ray.get(ref)
        except ACTOR_LOST as err:
            self._replace(slot, generation, err)
        if not self.acks:  # every worker holds the new version
            self.telemetry.push_seconds.observe(time.perf_counter() - self.push_started)

    def _on_scores(self, learner_version: int) -> None:
        for result in self.reward.poll(timeout=0.0 if self.calls else self.POLL_S):
            if result.ticket not in self.scoring:  # sent by a pipeline a learner recovery replaced: re-issued
                continue
            index_of, stats = self.scoring.pop(result.ticket), result.stats
            self.telemetry.groups_scored.inc(stats.groups_scored)
            self.telemetry.groups_dropped.labels(reason="nonfinite").inc(stats.nonfinite_groups)
            self.telemetry.groups_dropped.labels(reason="filtered").inc(stats.filtered_groups)
            self.forget([index_of[g] for g in stats.dropped_group_ids])
            if result.batch.num_rows:
                for seconds in decode_rewards(result.batch).reward_seconds:
                    self.telemetry.reward_seconds.observe(seconds)
                self.ready.append(self._drop_stale(result.batch, learner_version))

    def _drop_stale(self, batch: pa.RecordBatch, learner_version: int) -> pa.RecordBatch:
        groups = decode_rollout(batch)
        if (groups.policy_version == REFERENCE_POLICY_VERSION).all():
            return batch
        staleness = learner_version - groups.policy_version
        keep = staleness <= self.job.rollout.max_staleness
        if not keep.all():
            self.telemetry.groups_dropped.labels(reason="stale").inc(int((~keep).sum()))
            self.forget(groups.data_index[~keep].tolist())
        return select_rows(batch, keep)

    def _replace(self, slot: int, generation: int, err: BaseException) -> None:
        if generation != self.rollout.restarts[slot]:
            return  # this slot was already given a fresh worker
        print(f"rollout{slot} died ({type(err).__name__}); replacing it", flush=True)
        self.rollout.replace(slot, self.weights)
        self.telemetry.rollout_restarts.labels(worker=f"rollout{slot}").inc()

    def _ready_groups(self) -> int:
        return sum(b.num_rows for b in self.ready)

    def _groups_in_flight(self) -> int:
        sampling = sum(len(indices) for *_, indices in self.calls.values())
        return sampling + sum(len(ids) for ids in self.scoring.values()) + self._ready_groups()


def _failed(ref: ray.ObjectRef) -> bool:
    """Whether a finished call raised (a dead actor or an error in it)."""
    try:
        ray.get(ref)
    except RayError:
        return True
    return False


def _hand_on(  # noqa: PLR0917 - the loop's state, passed once
    job: JobConfig, learner: LearnerGroup, pipeline: _Pipeline, validation: ValidationRunner | None,
    telemetry: Telemetry, step: int, position: DataPosition,
) -> bool:  # fmt: skip
    """What a finished step passes on: its adapter to the rollout workers (every ``push_every`` steps) and to
    validation (every ``validate_every``; the alarm may stop the run), and a checkpoint when one is due.
    Returns whether it wrote a checkpoint."""
    if step % job.learner.push_every == 0:
        pipeline.push(learner.adapter_weights(step))
    if validation:
        validation.after_step(step, partial(learner.adapter_weights, step))
    if not (job.learner.checkpoint_every and step % job.learner.checkpoint_every == 0 and step < job.run.steps):
        return False
    _checkpoint(learner, job, step, position, telemetry)
    return True


def _checkpoint(learner: LearnerGroup, job: JobConfig, step: int, position: DataPosition, telemetry: Telemetry) -> None:
    state = {"step": step, "data": asdict(position), "gauges": telemetry.last_gauges()}
    learner.save_checkpoint(checkpoint_root(job), state, keep=job.run.keep_checkpoints)
    mirror_outputs(job)  # with every checkpoint: the logs that go with it


def _validate_from(validation: ValidationRunner, job: JobConfig, learner: LearnerGroup, step: int) -> None:
    """Validate the policy at ``step`` after the history validated before it: a run resumed at ``step``, or
    rolled back there by a learner recovery, validates the steps from ``step`` on again."""
    validation.finish()
    validation.restore(step, partial(run_outputs(job).read, CSV_NAME))
    validation.after_step(step, partial(learner.adapter_weights, step))


def _recover_learner(  # noqa: PLR0917
    job: JobConfig, learner: LearnerGroup, telemetry: Telemetry, err: BaseException, restarts: int, checkpointed: bool
) -> tuple[int, DataPosition]:
    """Restart the learner group and resume it (from step 0 when this run has no checkpoint yet)."""
    limit = job.run.max_learner_restarts
    if restarts > limit:
        raise RuntimeError(f"a learner rank died {restarts} times (run.max_learner_restarts={limit}): {err}") from err
    print(f"a learner rank died ({type(err).__name__}); restarting the learner group ({restarts} of at most {limit}) "
          "and resuming from the last checkpoint", flush=True)  # fmt: skip
    telemetry.learner_restarts.inc()
    learner.restart()
    return resume_learner(learner, job, telemetry) if checkpointed else (0, DataPosition())


"""The whole loop on CPU: 2 rollout, 2 reward and 2 learner actors; resume; a killed rollout actor; metrics."""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from common import checkpoint_files
from learner.group import LearnerGroup
from rollout import driver
from rollout.driver import train
from rollout.job import load_job
from rollout.pool import RolloutPool
from rollout.step_report import TRAINED_GROUPS
from rollout.validation import CSV_NAME

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]  # end-to-end Ray runs, 30-90 s each


def _job(tmp_path: Path, *overrides: str):
    return load_job("tiny", [f"run.output_dir={tmp_path}", "run.steps=2", *overrides])


COMMON = ("run.steps=3", "learner.checkpoint_every=1", "rollout.max_inflight_per_worker=1")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """One uninterrupted 3-step run with a checkpoint per step: what every interrupted run must end as."""
    out = tmp_path_factory.mktemp("straight")
    return out, train(_job(out, *COMMON))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _adapter(out: Path) -> dict:
    """The adapter of the run's newest checkpoint (``checkpoints/latest`` names it)."""
    latest = (out / "checkpoints" / checkpoint_files.LATEST).read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "adapter" / "adapter_model.safetensors"))


def _validated_steps(out: Path) -> list[int]:
    with (out / CSV_NAME).open() as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([-+0-9.e]+|NaN)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_two_of_each_pool_end_to_end_with_live_metrics(tmp_path, monkeypatch):
    port = _free_port()
    job = _job(
        tmp_path,
        "run.steps=3",
        "run.groups_per_step=2",
        "cluster.rollout.num_workers=2",
        "cluster.reward.num_workers=2",
        "cluster.learner.num_ranks=2",
        f"metrics.port={port}",
    )
    # Scrape the live endpoint each time the driver has recorded a step, from inside the run: every
    # step's values are seen while the run goes on, however fast the steps follow one another.
    scrapes: list[dict[str, float]] = []
    record = driver.record_step

    def record_then_scrape(*args, **kwargs):
        summary = record(*args, **kwargs)
        scrapes.append(_scrape(port))
        return summary

    monkeypatch.setattr(driver, "record_step", record_then_scrape)
    result = train(job)
    assert result["step"] == 3
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "samples.png").is_file()
    assert _adapter(tmp_path)
    steps = [s.get("gdpo_learner_step") for s in scrapes]
    assert steps == [1.0, 2.0, 3.0], "the step gauge did not move while scraped"
    last = scrapes[-1]
    for name in (
        "gdpo_groups_scored_total",
        "gdpo_groups_consumed_total",
        "gdpo_learner_step_seconds_count",
        "gdpo_weight_push_seconds_count",
        "gdpo_weight_push_bytes_total",
        "gdpo_loss",
        "gdpo_reward_mean",
        "gdpo_learner_wait_ratio",
        "gdpo_grad_norm",
        'gdpo_reward_metric{metric="psnr_y"}',
        'gdpo_reward_metric{metric="piqe"}',
    ):
        assert name in last, name
    assert last["gdpo_weight_push_bytes_total"] > 0 and last["gdpo_groups_consumed_total"] == 6
    # a counter Prometheus can rate(): 2 groups of G = 4 per step
    assert [s["gdpo_samples_total"] for s in scrapes] == [8.0, 16.0, 24.0]
    assert "gdpo_samples_per_second" not in last and "gdpo_learner_wait_fraction" not in last
    assert sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard log"
    generated = {k: v for k, v in last.items() if k.startswith("gdpo_groups_generated_total{")}
    assert len(generated) == 2, "both rollout workers produced groups"
    assert any(k.startswith('gdpo_queue_depth{stage="rollout"}') for k in last)
    with pytest.raises(OSError):  # the endpoint is closed with the run
        _scrape(port)


def test_sigterm_checkpoints_and_the_resume_continues_where_it_stopped(tmp_path, monkeypatch, straight):
    common = COMMON[1:]
    straight_out, straight = straight
    finish_step = LearnerGroup.finish_step

    def finish_then_sigterm(self, pending):
        stats = finish_step(self, pending)
        if stats["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill <driver pid>` (or Ctrl-C's SIGINT) does mid-run
        return stats

    monkeypatch.setattr(LearnerGroup, "finish_step", finish_then_sigterm)
    # No periodic checkpoints: the only one is what the signal writes.
    stopped = train(_job(tmp_path / "b", "run.steps=3", "learner.checkpoint_every=0", *common[1:]))
    monkeypatch.undo()
    assert stopped["step"] == 2 and stopped["stopped_by_signal"] == signal.SIGTERM
    assert [p.name for p in checkpoint_files.committed(tmp_path / "b" / "checkpoints")] == ["checkpoint-2"]
    resumed_at: list[float] = []  # the step and loss gauges when the resumed run's first step starts
    take = driver._Pipeline.take

    def take_and_read_gauge(self, count, *, learner_version):
        resumed_at.append(self.telemetry.registry.get_sample_value("gdpo_learner_step"))
        resumed_at.append(self.telemetry.registry.get_sample_value("gdpo_loss"))
        return take(self, count, learner_version=learner_version)

    monkeypatch.setattr(driver._Pipeline, "take", take_and_read_gauge)
    resumed = train(_job(tmp_path / "b", "run.steps=3", "run.resume=true", *common))
    assert resumed_at == [2.0, pytest.approx(stopped["loss"])], "the step or loss gauge read 0 after the resume"
    assert straight["step"] == resumed["step"] == 3
    a, b = _adapter(straight_out), _adapter(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:  # same data, same optimizer state: the same adapter after step 3
        assert (a[key] - b[key]).abs().max() < 1e-6, key
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    # The alarm's history went on from the stopped run's; step 2 validated again, once in the CSV.
    assert _validated_steps(tmp_path / "b") == _validated_steps(straight_out) == [0, 2]


def test_killed_rollout_actor_is_replaced_and_the_run_completes(tmp_path, monkeypatch):
    """Kill a rollout actor mid-run (after the first optimizer step) while it has a call to serve."""
    job = _job(tmp_path, "run.steps=4", "cluster.rollout.num_workers=2")
    steps_done: list[int] = []
    killed: list[tuple[int, bool]] = []
    finish_step, generate = LearnerGroup.finish_step, RolloutPool.generate

    def count_steps(self, pending):
        stats = finish_step(self, pending)
        steps_done.append(1)
        return stats

    def generate_then_kill(self, slot, indices, min_version):
        call = generate(self, slot, indices, min_version)
        if steps_done and not killed:  # the first call issued after step 1: the actor is busy with it
            ray.kill(self.workers[slot], no_restart=True)
            # Hand the call back only once it has failed, so the driver sees the death when it next waits.
            done, _ = ray.wait([call], timeout=120)
            killed.append((slot, bool(done)))
        return call

    monkeypatch.setattr(LearnerGroup, "finish_step", count_steps)
    monkeypatch.setattr(RolloutPool, "generate", generate_then_kill)
    result = train(job)
    assert len(killed) == 1 and killed[0][1], f"no call was issued after the first step, or it never failed: {killed}"
    assert result["step"] == 4
    assert result["rollout_restarts"] == 1


def test_policy_sampling_trains_on_fresh_enough_samples(tmp_path):
    result = train(_job(tmp_path, "run.steps=3", "rollout.sample_from=policy", "rollout.max_staleness=1"))
    assert result["step"] == 3
    assert result["staleness_max"] <= 1  # never trained on samples more than max_staleness versions old
    assert result["policy_version_min"] >= 1  # the last step's groups came from an updated adapter


def _sigkill_rank(group: LearnerGroup, rank: int) -> int:
    pid = ray.get(group._ranks[rank].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # as an OOM kill takes it
    return pid


def test_a_sigkilled_learner_rank_is_rebuilt_and_the_run_ends_as_if_nothing_happened(tmp_path, monkeypatch, straight):
    straight_out, straight = straight
    start_step, calls, killed = LearnerGroup.start_step, [], []

    def sigkill_a_rank_then_start(self, batch):
        calls.append(1)
        if len(calls) == 3:  # step 3, after checkpoint-2
            killed.append(_sigkill_rank(self, 0))
        return start_step(self, batch)

    monkeypatch.setattr(LearnerGroup, "start_step", sigkill_a_rank_then_start)
    recovered = train(_job(tmp_path / "b", *COMMON))
    assert killed and recovered["step"] == 3 and recovered["learner_restarts"] == 1
    a, b = _adapter(straight_out), _adapter(tmp_path / "b")
    for key in a:  # resumed from checkpoint-2 with its data position: the uninterrupted run's adapter
        assert (a[key] - b[key]).abs().max() < 1e-6, key
    assert recovered["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    # The product's own audit trail: the same groups at the same steps, each trained on once.
    trained = [sorted((out / TRAINED_GROUPS).read_text().splitlines()) for out in (straight_out, tmp_path / "b")]
    assert trained[0] == trained[1] and len(trained[0]) == 1 + 3 * 2  # header, 3 steps x 2 groups
    assert trained[1][-1] == "step,data_index,policy_version"  # sorts last: the header, once
    indices = [line.split(",")[1] for line in trained[1][:-1]]
    assert len(set(indices)) == len(indices)
    assert _validated_steps(tmp_path / "b") == _validated_steps(straight_out) == [0, 2]


def test_a_rank_that_dies_while_writing_a_checkpoint_rolls_the_group_back_to_the_one_before(
    tmp_path, monkeypatch, straight
):
    straight_out, straight = straight
    save, killed = LearnerGroup.save_checkpoint, []

    def sigkill_a_rank_then_save(self, root, client_state, *, keep=0):
        if client_state["step"] == 2 and not killed:  # checkpoint-2 is never sealed
            killed.append(_sigkill_rank(self, 0))
        return save(self, root, client_state, keep=keep)

    monkeypatch.setattr(LearnerGroup, "save_checkpoint", sigkill_a_rank_then_save)
    recovered = train(_job(tmp_path / "b", *COMMON))
    assert killed and recovered["step"] == 3 and recovered["learner_restarts"] == 1
    a, b = _adapter(straight_out), _adapter(tmp_path / "b")
    for key in a:  # resumed from checkpoint-1, steps 2 and 3 trained again on the same groups
        assert (a[key] - b[key]).abs().max() < 1e-6, key
    assert recovered["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    steps = [line.split(",")[0] for line in (tmp_path / "b" / TRAINED_GROUPS).read_text().splitlines()[1:]]
    assert steps == ["1", "1", "2", "2", "2", "2", "3", "3"]  # step 2 logged before the death, and again after
    names = [p.name for p in checkpoint_files.committed(tmp_path / "b" / "checkpoints")]  # newest first
    assert names[:2] == ["checkpoint-3", "checkpoint-2"]  # checkpoint-2 written again, whole, after the recovery

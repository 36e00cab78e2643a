"""LearnerGroup on Ray: 2 ranks step like 1 rank, pushes reach every rollout actor, checkpoints resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from common.adapter_sync import AdapterWeights, digest, verify
from common.naosd import ModelConfig
from learner.config import LearnerConfig, LearnerPoolConfig
from learner.engine import LearnerRank
from learner.group import LearnerGroup


def _dummy_rollout_class() -> type:
    """A rollout actor stand-in: checks and keeps what it is sent (torch-only imports, starts in ~3 s).

    Defined in a function so that Ray pickles the class by value: workers cannot import test modules.
    """

    class DummyRollout:
        def __init__(self) -> None:
            self.received: list[tuple[int, str, str]] = []

        def set_adapter(self, weights: AdapterWeights) -> None:
            verify(weights)  # what apply_to does before it copies into the UNet
            self.received.append((weights.version, weights.digest, digest(weights.tensors)))

        def get_received(self) -> list[tuple[int, str, str]]:
            return self.received

    return DummyRollout


@pytest.fixture(scope="module")
def two_ranks(ray_session) -> Iterator[LearnerGroup]:
    """2 ZeRO-2 ranks splitting each rank's 2 groups into one micro-batch of 2."""
    config = LearnerConfig(micro_batch_groups=2, zero_stage=2)
    with LearnerGroup(ModelConfig(), config, LearnerPoolConfig(num_ranks=2)) as group:
        yield group


def _max_abs_diff(a: AdapterWeights, b: AdapterWeights) -> float:
    assert a.tensors.keys() == b.tensors.keys()
    return max(float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors)


def test_two_ranks_step_like_one(two_ranks, scored_batch, free_port):
    # The 1-rank reference runs in this process, 2 micro-batches of 2 groups under ZeRO-0.
    one = LearnerRank(ModelConfig(), LearnerConfig(micro_batch_groups=2), 0, 1, "127.0.0.1", free_port)
    assert two_ranks.world_size == 2
    for seed in (1, 2):  # two steps: the second one also exercises Adam's moments
        batch = scored_batch(n=4, g=3, seed=seed)
        stats_one, stats_two = one.train_step(batch), two_ranks.step(batch)
        assert stats_two["step"] == stats_one["step"] == seed
        assert stats_two["num_groups"] == 4 and stats_two["world_size"] == 2
        # omega = 5000 amplifies float32 rounding in the loss and its gradient (the gradient norm is in the
        # thousands on the committed model; measured 7e-3 apart, 1e-6 relative); the adapters are the real check.
        assert stats_two["grad_norm"] == pytest.approx(stats_one["grad_norm"], rel=1e-3)
        assert stats_two["loss"] == pytest.approx(stats_one["loss"], rel=1e-3)
        # Adam moves every element by up to lr = 5e-5 a step whatever its gradient's size, so elements with a
        # near-zero gradient carry the reduction order's rounding into the update (measured 5.1e-6 after 2
        # steps on an earlier tiny model, 0 on the committed one). A gradient of another direction (a rank's
        # groups lost or counted twice) flips the sign of elements' steps: differences of up to 2 lr each step.
        assert _max_abs_diff(one.adapter_weights(), two_ranks.adapter_weights()) < 2e-5


def test_uneven_batch_is_refused(two_ranks, scored_batch):
    with pytest.raises(ValueError, match="does not split evenly"):
        two_ranks.step(scored_batch(n=3))


def test_push_delivers_one_version_to_every_rollout_actor(two_ranks):
    actor_cls = ray.remote(num_cpus=0)(_dummy_rollout_class())
    rollouts = [actor_cls.remote() for _ in range(2)]
    try:
        result = two_ranks.push(rollouts, version=7)
        expected = two_ranks.adapter_weights(7)
        assert (result.version, result.digest, result.nbytes) == (7, expected.digest, expected.nbytes)
        assert result.num_actors == 2 and result.seconds > 0
        received = ray.get([r.get_received.remote() for r in rollouts])
        assert received == [[(7, expected.digest, expected.digest)]] * 2
    finally:
        for actor in rollouts:
            ray.kill(actor)


def test_checkpoint_resume_across_two_ranks_falls_back_past_a_torn_one(two_ranks, scored_batch, tmp_path):
    two = two_ranks
    two.step(scored_batch(seed=3))
    first = Path(two.save_checkpoint(tmp_path, {"data_position": 12}))
    saved = two.adapter_weights()
    following = scored_batch(seed=4)
    two.step(following)
    uninterrupted = two.adapter_weights()
    newest = Path(two.save_checkpoint(tmp_path, {"data_position": 16}, keep=2))
    assert [p.name for p in (first, newest)] == [f"checkpoint-{saved.version}", f"checkpoint-{saved.version + 1}"]
    torn = newest / "deepspeed" / f"step{saved.version + 1:08d}" / "mp_rank_00_model_states.pt"
    torn.write_bytes(torn.read_bytes()[:100])  # a write cut short after the commit (disk full, bad copy)

    resumed_from = two.resume(tmp_path)
    assert resumed_from is not None and resumed_from.path == str(first)
    assert resumed_from.client_state == {"data_position": 12}
    assert [name for name, _ in resumed_from.refused] == [newest.name] and "bytes" in resumed_from.refused[0][1]
    assert not newest.exists() and newest.with_name(newest.name + ".rejected").is_dir()
    assert two.adapter_weights().digest == saved.digest
    two.step(following)
    resumed = two.adapter_weights()
    assert resumed.version == uninterrupted.version
    assert all(torch.equal(resumed.tensors[k], uninterrupted.tensors[k]) for k in resumed.tensors)


def test_checkpoint_on_a_storage_uri_holds_both_ranks_shards_and_resumes(two_ranks, scored_batch, tmp_path):
    """ZeRO-2 ranks each upload their own optimizer shard from their own disk; rank 0 publishes the manifest."""
    two, uri = two_ranks, f"file://{tmp_path}/store/checkpoints"
    two.step(scored_batch(seed=5))
    saved = two.adapter_weights()
    location = two.save_checkpoint(uri, {"data_position": 20}, keep=1)
    assert location == f"{uri}/checkpoint-{saved.version}"
    folder = tmp_path / "store" / "checkpoints" / f"checkpoint-{saved.version}"
    shards = sorted(p.name for p in folder.rglob("*optim_states.pt"))
    assert len(shards) == 2 and (folder / "MANIFEST.json").is_file()  # one ZeRO shard per rank, both listed
    following = scored_batch(seed=6)
    two.step(following)
    uninterrupted = two.adapter_weights()

    resumed_from = two.resume(uri)  # every rank downloads the folder to its own disk and verifies it
    assert resumed_from is not None and resumed_from.path == location and resumed_from.refused == ()
    assert resumed_from.client_state == {"data_position": 20} and two.adapter_weights().digest == saved.digest
    two.step(following)
    assert two.adapter_weights().digest == uninterrupted.digest


def _fake_rank_class() -> type:
    """A rank stand-in whose call either dies (as SIGKILL would take it), raises, or returns, after a delay."""

    class FakeRank:
        def work(self, outcome: str, delay_s: float) -> str:
            import os
            import time

            time.sleep(delay_s)
            if outcome == "die":
                os._exit(1)
            if outcome == "raise":
                raise RuntimeError("Connection closed by peer")  # what gloo raises on a rank whose peer died
            return outcome

    return FakeRank


@pytest.mark.usefixtures("ray_session")
def test_a_rank_failing_because_its_peer_died_is_a_death_and_a_rank_error_alone_is_not():
    from learner.group import LearnerDied, _gather

    fake = ray.remote(num_cpus=0)(_fake_rank_class())
    ranks = [fake.remote(), fake.remote()]
    # The survivor's error arrives first; the death shows 0.5 s later: still a death.
    refs = [ranks[0].work.remote("die", 0.5), ranks[1].work.remote("raise", 0.0)]
    with pytest.raises(LearnerDied, match="learner rank 0 died"):
        _gather(refs)
    alive = [fake.remote(), fake.remote()]
    with pytest.raises(ray.exceptions.RayTaskError, match="Connection closed"):  # no rank died: the error itself
        _gather([alive[0].work.remote("ok", 0.0), alive[1].work.remote("raise", 0.0)])
    assert _gather([alive[0].work.remote("ok", 0.0), alive[1].work.remote("fine", 0.0)]) == ["ok", "fine"]
    for actor in (*ranks, *alive):
        ray.kill(actor)


def test_a_checkpoint_call_to_a_killed_rank_is_reported_as_a_death(ray_session, tmp_path):
    import os
    import signal

    from learner.group import LearnerDied

    with LearnerGroup(ModelConfig(), LearnerConfig(), LearnerPoolConfig(num_ranks=2)) as group:
        pid = ray.get(group._ranks[1].__ray_call__.remote(lambda actor: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(LearnerDied, match="learner rank 1 died"):
            group.save_checkpoint(tmp_path, {"step": 1})

"""The Ray reward pool: 2 CPU workers, offline metrics, a worker killed mid-batch, a timed-out call.

Slow-ish (each actor imports torch + pyiqa, ~10 s on a 2-core machine), hence the ``slow`` mark;
images are 32x32 with G=3 so scoring itself is milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from common.records import decode_rewards, decode_rollout
from reward_service.config import RewardConfig, RewardPoolConfig
from reward_service.pool import RewardPool, batch_ids
from reward_service.worker import RewardWorker, ScoreStats

pytestmark = pytest.mark.slow

Batch = Callable[..., pa.RecordBatch]


def controlled_factory(control_dir: str) -> Callable[[RewardConfig], RewardWorker]:
    """A worker whose calls a test can slow down (file ``delay``) or hang once (file ``hang_once``).

    Defined as a closure so Ray pickles it by value into the actors.
    """

    def factory(config: RewardConfig) -> RewardWorker:
        worker = RewardWorker(config)
        score = worker.score_batch

        def controlled(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, ScoreStats]:
            ctl = Path(control_dir)
            try:
                (ctl / "hang_once").unlink()  # exactly one call wins the file and hangs
                time.sleep(120)
            except FileNotFoundError:
                pass
            if (ctl / "delay").exists():
                time.sleep(float((ctl / "delay").read_text()))
            return score(batch)

        worker.score_batch = controlled  # type: ignore[method-assign]
        return worker

    return factory


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reward-pool-control")


@pytest.fixture(scope="module")
def pool(ray_session: None, control_dir: Path) -> Iterator[RewardPool]:
    config = RewardPoolConfig(num_workers=2, num_cpus=1, timeout_s=8, max_retries=2, start_timeout_s=180)
    with RewardPool(RewardConfig.offline(), config, worker_factory=controlled_factory(str(control_dir))) as p:
        yield p


def all_group_ids(batches: list[pa.RecordBatch]) -> list[str]:
    return [gid for b in batches for gid in decode_rollout(b).group_id]


def test_scores_all_groups_on_two_workers(pool: RewardPool, rollout_batch: Batch, control_dir: Path) -> None:
    (control_dir / "delay").write_text("0.3")
    batches = [rollout_batch(n=2, g=3, seed=s, prefix="plain") for s in range(6)]
    results = pool.score(batches)
    assert [decode_rollout(r.batch).group_id for r in results] == [decode_rollout(b).group_id for b in batches]
    assert {r.worker_id for r in results} == {"reward-0", "reward-1"}  # both workers took batches
    for r in results:
        rewards = decode_rewards(r.batch)
        assert rewards.metric_names == ("psnr_y", "piqe", "entropy")
        assert np.isfinite(rewards.advantage).all()
    values = pool.metric_values()
    scored = sum(v for k, v in values.items() if k.startswith("gdpo_groups_scored_total"))
    assert scored >= 12
    assert 'gdpo_reward_seconds_count{worker="reward-0"}' in values
    assert values['gdpo_reward_queue_depth{worker="reward-1"}'] == 0.0


def test_worker_killed_mid_batch(pool: RewardPool, rollout_batch: Batch, control_dir: Path) -> None:
    (control_dir / "delay").write_text("1.5")  # long enough to kill a worker while it scores
    batches = [rollout_batch(n=2, g=3, seed=s, prefix="kill") for s in range(6)]
    out: dict[str, object] = {}
    runner = threading.Thread(target=lambda: out.update(results=pool.score(batches)))
    runner.start()
    deadline = time.monotonic() + 60
    while not any(i is not None for i in pool.in_flight().values()):
        assert time.monotonic() < deadline, "no batch was ever dispatched"
        time.sleep(0.02)
    victim = next(w for w, i in pool.in_flight().items() if i is not None)
    restarts_before = pool.metric_values().get(f'gdpo_reward_worker_restarts_total{{worker="{victim}"}}', 0.0)
    ray.kill(pool.actors[victim])
    runner.join(timeout=180)
    assert not runner.is_alive()
    results = out["results"]
    ids = batch_ids(results)
    assert sorted(ids) == sorted(all_group_ids(batches)) and len(ids) == len(set(ids))  # each group exactly once
    assert any(r.attempts == 2 for r in results)
    after = pool.metric_values()[f'gdpo_reward_worker_restarts_total{{worker="{victim}"}}']
    assert after == restarts_before + 1


def test_timed_out_call_is_retried_elsewhere(pool: RewardPool, rollout_batch: Batch, control_dir: Path) -> None:
    (control_dir / "delay").write_text("0")
    (control_dir / "hang_once").write_text("")  # the first call to start hangs past timeout_s=8
    batches = [rollout_batch(n=2, g=3, seed=s, prefix="slow") for s in range(3)]
    start = time.monotonic()
    results = pool.score(batches)
    assert time.monotonic() - start >= 8
    ids = batch_ids(results)
    assert sorted(ids) == sorted(all_group_ids(batches)) and len(ids) == len(set(ids))
    retried = [r for r in results if r.attempts == 2]
    assert len(retried) == 1
    values = pool.metric_values()
    assert sum(v for k, v in values.items() if k.startswith("gdpo_reward_retries_total")) >= 2  # kill + timeout


def test_bad_input_is_raised_not_retried(pool: RewardPool, rollout_batch: Batch) -> None:
    good = rollout_batch(n=1, g=3, seed=0, prefix="bad")
    groups = decode_rollout(good)
    bad = good.set_column(
        good.schema.get_field_index("sr"),
        "sr",
        pa.FixedShapeTensorArray.from_numpy_ndarray(np.full(groups.sr.shape, 2.0, np.float32)),
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pool.score([bad])


def test_nonfinite_sr_samples_are_dropped_and_counted_not_raised(pool: RewardPool, rollout_batch: Batch) -> None:
    """reward.nonfinite='drop' (the default): a NaN pixel costs its group, never the run."""
    good = rollout_batch(n=3, g=3, seed=5, prefix="nan")
    groups = decode_rollout(good)
    sr = groups.sr.copy()
    sr[1, 0, 2, 3, 4] = np.nan
    bad = good.set_column(good.schema.get_field_index("sr"), "sr", pa.FixedShapeTensorArray.from_numpy_ndarray(sr))
    (result,) = pool.score([bad])
    assert result.stats.nonfinite_groups == 1 and result.stats.dropped_group_ids == (groups.group_id[1],)
    assert decode_rollout(result.batch).group_id == (groups.group_id[0], groups.group_id[2])
    assert np.isfinite(decode_rewards(result.batch).advantage).all()
    values = pool.metric_values()
    assert sum(v for k, v in values.items() if k.startswith("gdpo_reward_nonfinite_groups_total")) >= 1

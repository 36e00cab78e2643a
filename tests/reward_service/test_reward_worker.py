"""RewardWorker on record batches: columns, variants, dropped groups, input checks, offline metrics."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
import torch

from common.records import decode_rewards, decode_rollout, encode_rollout, is_scored, select_rows
from reward_service.config import RewardConfig
from reward_service.metrics_iqa import MetricFn
from reward_service.proportions import detail_proportions
from reward_service.worker import RewardWorker
from tests.reward_service.conftest import make_rollout_groups

Batch = Callable[..., pa.RecordBatch]


def mean_fr(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Toy FR score: minus the mean absolute error (higher is better)."""
    return -(sr - hr).abs().mean(dim=(1, 2, 3)).double()


def toy_metrics(nr: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> list[MetricFn]:
    nr = nr or (lambda sr, hr: sr.mean(dim=(1, 2, 3)).double())
    return [
        MetricFn(name="fr", fn=mean_fr, full_reference=True, score_range=(-1.0, 0.0)),
        MetricFn(name="nr", fn=nr, lower_better=True, score_range=(0.0, 1.0)),
    ]


def test_scores_every_group_and_appends_columns(rollout_batch: Batch) -> None:
    batch = rollout_batch(n=3, g=4, size=40)
    worker = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",)), toy_metrics())
    out, stats = worker.score_batch(batch)
    assert is_scored(out) and out.num_rows == 3
    assert decode_rollout(out).group_id == decode_rollout(batch).group_id
    rewards = decode_rewards(out)
    groups = make_rollout_groups(n=3, g=4, size=40)  # what the batch was built from, not decoded from it
    sr, hr = torch.from_numpy(groups.sr.copy()), torch.from_numpy(groups.hr.copy())
    expected = worker.score_images(sr, hr)
    assert rewards.metric_names == ("fr", "nr")
    np.testing.assert_allclose(rewards.metric_raw, expected.metric_raw, rtol=1e-6)  # FR scored against the HR
    np.testing.assert_allclose(rewards.reward, expected.reward, rtol=1e-6)
    np.testing.assert_allclose(rewards.advantage, expected.advantage, rtol=1e-5, atol=1e-6)
    rho_s, rho_d = detail_proportions(hr)
    np.testing.assert_allclose(rewards.rho_s, rho_s.numpy())
    np.testing.assert_allclose(rewards.rho_d, rho_d.numpy())
    # Eq. 7 from the stored columns: FR part and the flipped NR part, min-max per group.
    fr = rewards.metric_norm[:, 0]
    nr = rewards.metric_norm[:, 1]
    np.testing.assert_allclose(rewards.reward, rewards.rho_s[:, None] * fr + rewards.rho_d[:, None] * nr, rtol=1e-5)
    raw_nr = rewards.metric_raw[:, 1]
    best_nr = raw_nr.argmin(axis=1)  # lower is better -> normalised to 1
    assert np.all(nr[np.arange(3), best_nr] == 1.0)
    np.testing.assert_allclose(rewards.advantage.mean(axis=1), 0.0, atol=1e-5)
    assert stats.groups_in == stats.groups_scored == 3 and stats.dropped_group_ids == ()
    assert rewards.reward_seconds.shape == (3,) and np.all(rewards.reward_seconds > 0)


@pytest.mark.parametrize(
    ("weighting", "rho"), [("fixed", (0.5, 0.5)), ("fr_only", (1.0, 0.0)), ("nr_only", (0.0, 1.0))]
)
def test_weighting_variants(rollout_batch: Batch, weighting: str, rho: tuple[float, float]) -> None:
    config = RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",), weighting=weighting)
    metrics = [m for m in toy_metrics() if m.name in config.metric_names]
    out, _ = RewardWorker(config, metrics).score_batch(rollout_batch(n=2, g=3))
    rewards = decode_rewards(out)
    assert rewards.metric_names == config.metric_names
    assert rewards.rho_s.tolist() == [rho[0]] * 2 and rewards.rho_d.tolist() == [rho[1]] * 2
    if weighting != "fixed":
        np.testing.assert_allclose(rewards.reward, rewards.metric_norm[:, 0])


def test_nonfinite_group_is_dropped_and_counted(rollout_batch: Batch) -> None:
    def nan_for_second_group(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        s = sr.mean(dim=(1, 2, 3)).double()
        s[3] = float("nan")  # G=3: sample 0 of group 1
        return s

    batch = rollout_batch(n=3, g=3)
    worker = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",)), toy_metrics(nan_for_second_group))
    out, stats = worker.score_batch(batch)
    ids = decode_rollout(batch).group_id
    assert stats.nonfinite_groups == 1 and stats.dropped_group_ids == (ids[1],)
    assert decode_rollout(out).group_id == (ids[0], ids[2])
    assert np.isfinite(decode_rewards(out).advantage).all()

    raising = RewardWorker(
        RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",), nonfinite="raise"), toy_metrics(nan_for_second_group)
    )
    with pytest.raises(ValueError, match=ids[1]):
        raising.score_batch(batch)


def test_nonfinite_sr_samples_drop_their_group(rollout_batch: Batch) -> None:
    """One NaN pixel, one inf pixel: those two groups are dropped and counted; the rest score as if alone."""
    groups = make_rollout_groups(n=4, g=3, seed=2)
    sr = groups.sr.copy()
    sr[1, 2, 0, 5, 7] = np.nan
    sr[2, 0, 1, 0, 0] = np.inf
    worker = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",)), toy_metrics())
    out, stats = worker.score_batch(encode_rollout(dataclasses.replace(groups, sr=sr)))
    ids = groups.group_id
    assert stats.nonfinite_groups == 2 and stats.dropped_group_ids == (ids[1], ids[2])
    assert decode_rollout(out).group_id == (ids[0], ids[3])
    alone, _ = worker.score_batch(select_rows(encode_rollout(groups), np.array([True, False, False, True])))
    np.testing.assert_array_equal(decode_rewards(out).reward, decode_rewards(alone).reward)

    raising = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",), nonfinite="raise"), toy_metrics())
    with pytest.raises(ValueError, match=f"NaN/inf SR samples.*{ids[1]}"):
        raising.score_batch(encode_rollout(dataclasses.replace(groups, sr=sr)))


def test_every_group_dropped_gives_an_empty_scored_batch(rollout_batch: Batch) -> None:
    always_nan = MetricFn(name="nr", fn=lambda sr, hr: torch.full((sr.shape[0],), float("nan"), dtype=torch.float64))
    worker = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",)), [toy_metrics()[0], always_nan])
    out, stats = worker.score_batch(rollout_batch(n=2, g=3))
    assert out.num_rows == 0 and is_scored(out)
    assert stats.nonfinite_groups == 2 and len(stats.dropped_group_ids) == 2
    assert decode_rewards(out).advantage.shape == (0, 3)


def test_filter_drops_saturated_group(rollout_batch: Batch) -> None:
    def near_perfect(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.01, 0.02, 0.015, 0.5, 0.9, 0.1], dtype=torch.float64)  # nr, lower is better

    def fr_near_perfect(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return torch.tensor([-0.01, -0.02, -0.015, -0.5, -0.1, -0.9], dtype=torch.float64)

    metrics = [
        MetricFn(name="fr", fn=fr_near_perfect, full_reference=True, score_range=(-1.0, 0.0)),
        MetricFn(name="nr", fn=near_perfect, lower_better=True, score_range=(0.0, 1.0)),
    ]
    config = RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",), filter_groups=True)
    out, stats = RewardWorker(config, metrics).score_batch(rollout_batch(n=2, g=3))
    assert stats.filtered_groups == 1 and out.num_rows == 1
    assert len(stats.dropped_group_ids) == 1


def test_zero_range_groups_are_counted(rollout_batch: Batch) -> None:
    constant = MetricFn(name="nr", fn=lambda sr, hr: torch.ones(sr.shape[0], dtype=torch.float64))
    metrics = [toy_metrics()[0], constant]
    out, stats = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",)), metrics).score_batch(
        rollout_batch(n=2, g=3)
    )
    assert stats.zero_range_groups == 2
    assert decode_rewards(out).zero_range.tolist() == [1, 1]


def bad_inputs() -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    sr, hr = torch.rand(2, 3, 3, 16, 16), torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    return [
        (sr[0], hr, r"\[N, G, 3, H, W\]"),
        (sr * 2, hr, r"\[0, 1\]"),
        (sr - 0.5, hr, r"\[0, 1\]"),
        (torch.rand(2, 3, 1, 16, 16), hr, "grayscale"),
        (torch.rand(2, 3, 4, 16, 16), hr, "RGBA"),
        (sr, hr[:, :1], "grayscale"),
        (sr, torch.randint(0, 256, (2, 3, 16, 20), dtype=torch.uint8), "differs from SR size"),
        (sr, hr[:1], "1 HR images"),
        (sr[:, :1], hr, "G >= 2"),
        (sr.to(torch.uint8), hr, "floating point"),
    ]


@pytest.mark.parametrize(("sr", "hr", "match"), bad_inputs())
def test_bad_inputs_raise(sr: torch.Tensor, hr: torch.Tensor, match: str) -> None:
    worker = RewardWorker(RewardConfig(fr_metrics=("fr",), nr_metrics=("nr",)), toy_metrics())
    with pytest.raises(ValueError, match=match):
        worker.score_images(sr, hr)


def test_offline_pyiqa_metrics_end_to_end(rollout_batch: Batch, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="reward_service.metrics_iqa"):
        worker = RewardWorker(RewardConfig.offline())
    assert "NOT the paper's" in caplog.text
    assert worker.metric_names == ("psnr_y", "piqe", "entropy")
    assert [m.lower_better for m in worker.metrics] == [False, True, False]
    out, stats = worker.score_batch(rollout_batch(n=2, g=3, size=32))
    rewards = decode_rewards(out)
    assert stats.groups_scored == 2
    assert np.isfinite(rewards.metric_raw).all() and np.isfinite(rewards.advantage).all()
    assert np.all((rewards.reward >= 0) & (rewards.reward <= 1))


def test_psnr_y_against_the_formula() -> None:
    worker = RewardWorker(RewardConfig(fr_metrics=("psnr_y",), nr_metrics=(), weighting="fr_only"))
    hr = torch.full((1, 3, 16, 16), 0.5)
    sr = hr[:, None].repeat(1, 2, 1, 1, 1)
    sr[0, 0, 0] += 0.1  # +0.1 on R: dY = 65.481 * 0.1 / 255 (BT.601, [0, 1] data)
    sr[0, 1, 2] += 0.2  # +0.2 on B: dY = 24.966 * 0.2 / 255
    raw = worker.score_images(sr, hr).metric_raw[0, 0]
    for value, dy in zip(raw, (65.481 * 0.1 / 255, 24.966 * 0.2 / 255), strict=True):
        assert value == pytest.approx(10 * math.log10(1 / (dy * dy + 1e-8)), abs=1e-3)
    assert raw[0] == pytest.approx(31.8084, abs=1e-3)

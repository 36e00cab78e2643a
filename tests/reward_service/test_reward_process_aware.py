"""OARS's process-aware reward (SPEC section 10) and the ARF ablations' FR choices, against hand computations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from common.records import decode_rewards, decode_rollout, encode_rollout
from reward_service.arf import arf_reward, minmax_normalise, score_groups
from reward_service.config import RewardConfig
from reward_service.metrics_iqa import MetricFn
from reward_service.process_aware import fidelity, process_aware_reward, quality_scale, score_process_aware
from reward_service.worker import RewardWorker
from tests.reward_service.conftest import make_rollout_groups


def test_reward_formula_by_hand():
    # 0.8 * 3.5 + 0.8 ** (3.5 / 7) * (4.2 - 3.5) = 2.8 + 0.894427 * 0.7
    assert process_aware_reward(np.array(0.8), np.array(3.5), np.array(4.2), 7.0) == pytest.approx(3.4260990, abs=1e-6)
    # full fidelity: the reward is the SR quality; zero fidelity: 0 whatever the qualities
    assert process_aware_reward(np.array(1.0), np.array(2.0), np.array(4.5), 7.0) == pytest.approx(4.5)
    assert process_aware_reward(np.array(0.0), np.array(2.0), np.array(4.5), 7.0) == 0.0


def test_scales_are_linear_on_the_metric_range_and_clipped():
    # PIQE-like: range 0..100, lower is better -> 25 is 3/4 of the way to the best end of 1..5
    q = quality_scale(np.array([25.0, 100.0, -5.0, 50.0]), (0.0, 100.0), True, (1.0, 5.0))
    np.testing.assert_allclose(q, [4.0, 1.0, 5.0, 3.0])
    # MUSIQ-like: higher is better
    np.testing.assert_allclose(quality_scale(np.array([80.0]), (0.0, 100.0), False, (1.0, 5.0)), [4.2])
    # DISTS: 1 - DISTS
    np.testing.assert_allclose(fidelity(np.array([0.2, 0.0, 1.3]), (0.0, 1.0), True), [0.8, 1.0, 0.0])


def test_score_groups_by_hand():
    fr = np.array([[0.1, 0.3], [0.0, 0.0]])  # DISTS-like, [N=2, G=2]
    nr_sr = np.array([[20.0, 60.0], [0.0, 0.0]])  # PIQE-like
    nr_lr = np.array([50.0, 0.0])
    kw = {"fr_range": (0.0, 1.0), "fr_lower_better": True, "nr_range": (0.0, 100.0), "nr_lower_better": True,
          "gamma": 7.0, "scale": (1.0, 5.0)}  # fmt: skip
    out = score_process_aware(fr, nr_sr, nr_lr, **kw, filter_mean=0.9, filter_std=0.05)
    # group 0: F = (0.9, 0.7), Q_sr = (4.2, 2.6), Q_lr = 3
    r0 = [0.9 * 3 + 0.9 ** (3 / 7) * 1.2, 0.7 * 3 + 0.7 ** (3 / 7) * -0.4]
    np.testing.assert_allclose(out.reward[0], r0, rtol=1e-12)
    adv = (r0[0] - r0[1]) / 2 / (abs(r0[0] - r0[1]) / math.sqrt(2) + 1e-8)  # ddof=1 std of two values
    np.testing.assert_allclose(out.advantage[0], [adv, -adv], rtol=1e-9)
    # group 1: perfect fidelity and quality everywhere: R = 5 for both, normalised 1 with no spread -> filtered
    np.testing.assert_allclose(out.reward[1], [5.0, 5.0])
    assert out.filtered.tolist() == [False, True]
    np.testing.assert_allclose(out.metric_raw[0, 2], [50.0, 50.0])  # the LR quality, repeated over G
    np.testing.assert_allclose(out.metric_norm[0], [[0.9, 0.7], [4.2, 2.6], [3.0, 3.0]])


def test_the_group_filter_reads_r_over_the_top_of_the_quality_scale():
    """mean > 0.9 and std < 0.05 of R / 5 (SPEC section 10): not of the raw R, nor of (R - 1) / 4."""
    # Full fidelity (DISTS 0), so R = Q_sr = 5 - 4 PIQE / 100 exactly.
    nr_sr = np.array([[11.25, 11.0], [50.0, 49.75]])
    kw = {"fr_range": (0.0, 1.0), "fr_lower_better": True, "nr_range": (0.0, 100.0), "nr_lower_better": True,
          "gamma": 7.0, "scale": (1.0, 5.0)}  # fmt: skip
    out = score_process_aware(np.zeros((2, 2)), nr_sr, np.array([50.0, 50.0]), **kw, filter_mean=0.9, filter_std=0.05)
    np.testing.assert_allclose(out.reward, [[4.55, 4.56], [3.0, 3.01]], rtol=1e-12)
    # group 0: R / 5 has mean 0.911 (> 0.9) and std 0.0014, filtered; (R - 1) / 4 has mean 0.889 and would not be.
    # group 1: R / 5 has mean 0.601, kept; the raw R (mean 3.005, std 0.007) would be filtered.
    assert out.filtered.tolist() == [True, False]
    assert out.keep.tolist() == [False, True]


def test_nonfinite_groups_are_dropped_not_propagated():
    out = score_process_aware(
        np.array([[0.1, np.nan]]), np.array([[1.0, 2.0]]), np.array([3.0]), fr_range=(0.0, 1.0), fr_lower_better=True,
        nr_range=(0.0, 100.0), nr_lower_better=True, gamma=7.0, scale=(1.0, 5.0),
    )  # fmt: skip
    assert out.nonfinite.tolist() == [True] and not out.keep.any()
    assert np.isfinite(out.reward).all() and np.isfinite(out.advantage).all()


def _brightness(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(1, 2, 3)) * 100


def _l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).abs().mean(dim=(1, 2, 3))


def test_worker_scores_the_lr_input_with_the_quality_metric():
    """The quality of the LR comes from the record's LR (not the HR), through the same NR metric."""
    config = RewardConfig(kind="process_aware", fr_metrics=("l1",), nr_metrics=("bright",))
    metrics = [
        MetricFn(name="l1", fn=_l1, full_reference=True, lower_better=True, score_range=(0.0, 1.0)),
        MetricFn(name="bright", fn=_brightness, score_range=(0.0, 100.0)),
    ]
    groups = make_rollout_groups(n=2, g=3)
    groups = dataclasses.replace(groups, lr=groups.hr // 4)  # a darker LR: its quality differs from the HR's
    scored, stats = RewardWorker(config, metrics).score_batch(encode_rollout(groups))
    rewards, back = decode_rewards(scored), decode_rollout(scored)
    assert rewards.metric_names == ("l1", "bright", "bright_lr") and stats.groups_scored == 2
    sr = torch.from_numpy(back.sr)
    hr, lr = torch.from_numpy(back.hr).float() / 255, torch.from_numpy(back.lr).float() / 255
    for i in range(2):
        f = 1 - _l1(sr[i], hr[i].expand_as(sr[i])).double().numpy()
        q_sr = 1 + 4 * sr[i].double().mean(dim=(1, 2, 3)).numpy()
        q_lr = 1 + 4 * float(lr[i].double().mean())
        np.testing.assert_allclose(rewards.reward[i], process_aware_reward(f, q_lr, q_sr, 7.0), rtol=1e-5)
        assert float(lr[i].mean()) < 0.5 * float(hr[i].mean())  # the LR is not the HR


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"fr_metrics": ("a", "b"), "nr_metrics": ("q",)}, "exactly one fr_metrics"),
        ({"fr_metrics": ("a",), "nr_metrics": ("q",), "weighting": "fixed"}, "ARF ablation"),
        ({"fr_metrics": ("a",), "nr_metrics": ("q",), "gamma": 0.0}, "gamma"),
    ],
)
def test_process_aware_config_errors(overrides: dict, match: str):
    with pytest.raises(ValueError, match=match):
        RewardConfig(kind="process_aware", **overrides)


def test_offline_pyiqa_process_aware_end_to_end():
    """The tiny OARS reward (SSIM fidelity, PIQE quality), built offline, scores a batch with finite rewards."""
    config = RewardConfig(kind="process_aware", fr_metrics=("ssim",), nr_metrics=("piqe",))
    scored, stats = RewardWorker(config).score_batch(encode_rollout(make_rollout_groups(n=2, g=3, size=64)))
    rewards = decode_rewards(scored)
    assert stats.groups_in == 2 and rewards.metric_names == ("ssim", "piqe", "piqe_lr")
    assert np.isfinite(rewards.reward).all() and (rewards.reward <= 5.0).all()
    np.testing.assert_allclose(rewards.advantage.mean(axis=1), 0.0, atol=1e-5)


# --- ARF ablation: FR = PSNR + LPIPS (SPEC section 4) ----------------------------------------------


def test_two_fr_metrics_average_their_normalised_scores():
    """FR = PSNR+LPIPS: each is made higher-is-better and min-max normalised, then the FR part is their mean."""
    psnr = [[20.0, 30.0, 25.0]]
    lpips = [[0.1, 0.5, 0.3]]  # lower is better
    nr = [[1.0, 2.0, 3.0]]
    raw = np.array([[psnr[0], lpips[0], nr[0]]])  # [1, 3, 3]
    out = score_groups(raw, is_fr=np.array([True, True, False]), lower_better=np.array([False, True, False]),
                       rho_s=np.array([0.6]), rho_d=np.array([0.4]))  # fmt: skip
    # psnr -> (0, 1, 0.5); -lpips -> (1, 0, 0.5); FR mean (0.5, 0.5, 0.5); NR -> (0, 0.5, 1)
    np.testing.assert_allclose(out.reward[0], [0.6 * 0.5 + 0.4 * 0, 0.6 * 0.5 + 0.4 * 0.5, 0.6 * 0.5 + 0.4 * 1])
    norm, _ = minmax_normalise(raw)  # lpips as is (not flipped): FR = PSNR alone reads row 0 only
    np.testing.assert_allclose(arf_reward(norm, np.array([True, False, False]), np.ones(1), np.zeros(1)),
                               [[0.0, 1.0, 0.5]])  # fmt: skip

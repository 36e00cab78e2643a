"""Eq. 7 / Eq. 8 and group filtering on small groups with numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from reward_service.arf import group_advantage, minmax_normalise, score_groups

FR_NR_NR = np.array([True, False, False])  # psnr_y, musiq, maniqa
HIGHER = np.array([False, False, False])


def test_hand_computed_group_of_three() -> None:
    # PSNR 20/25/30 -> 0, .5, 1;  MUSIQ 50/70/60 -> 0, 1, .5;  MANIQA all 0.3 -> zero range -> 0, 0, 0.
    raw = np.array([[[20.0, 25.0, 30.0], [50.0, 70.0, 60.0], [0.3, 0.3, 0.3]]])
    res = score_groups(raw, is_fr=FR_NR_NR, lower_better=HIGHER, rho_s=np.array([0.6]), rho_d=np.array([0.4]))
    np.testing.assert_allclose(res.metric_norm[0], [[0, 0.5, 1], [0, 1, 0.5], [0, 0, 0]])
    # R = 0.6 * [0, .5, 1] + 0.4 * mean([0, 1, .5], [0, 0, 0]) = [0, .5, .7]
    np.testing.assert_allclose(res.reward[0], [0.0, 0.5, 0.7])
    # mean .4, unbiased std sqrt((.16 + .01 + .09) / 2) = sqrt(.13)
    std = np.sqrt(0.13)
    np.testing.assert_allclose(res.advantage[0], np.array([-0.4, 0.1, 0.3]) / (std + 1e-8))
    np.testing.assert_allclose(res.advantage[0], [-1.1094003, 0.2773501, 0.8320503], atol=1e-6)
    assert res.zero_range.tolist() == [1]
    assert res.keep.tolist() == [True]


def test_lower_better_metric_is_flipped() -> None:
    # LPIPS 0.1/0.3/0.2 (lower is better) -> 1, 0, .5 ; PSNR+LPIPS as the FR part, one NR metric.
    raw = np.array([[[20.0, 30.0, 25.0], [0.1, 0.3, 0.2], [1.0, 2.0, 3.0]]])
    res = score_groups(
        raw,
        is_fr=np.array([True, True, False]),
        lower_better=np.array([False, True, False]),
        rho_s=np.array([0.5]),
        rho_d=np.array([0.5]),
    )
    np.testing.assert_allclose(res.metric_norm[0, 1], [1.0, 0.0, 0.5])
    # FR mean = mean([0, 1, .5], [1, 0, .5]) = [.5, .5, .5]; NR = [0, .5, 1] -> R = [.25, .5, .75]
    np.testing.assert_allclose(res.reward[0], [0.25, 0.5, 0.75])


@pytest.mark.parametrize(("rho_s", "expected"), [(1.0, [0.0, 0.5, 1.0]), (0.0, [0.0, 1.0, 0.5])])
def test_fr_only_and_nr_only_weights(rho_s: float, expected: list[float]) -> None:
    raw = np.array([[[20.0, 25.0, 30.0], [50.0, 70.0, 60.0]]])
    res = score_groups(
        raw,
        is_fr=np.array([True, False]),
        lower_better=np.array([False, False]),
        rho_s=np.array([rho_s]),
        rho_d=np.array([1 - rho_s]),
    )
    np.testing.assert_allclose(res.reward[0], expected)


def test_zero_range_metric_and_all_equal_rewards_give_exact_zeros() -> None:
    raw = np.full((2, 2, 6), 0.1 + 0.2)  # the same (inexact) value everywhere
    res = score_groups(
        raw,
        is_fr=np.array([True, False]),
        lower_better=np.array([False, True]),
        rho_s=np.array([0.3, 0.7]),
        rho_d=np.array([0.7, 0.3]),
    )
    assert np.all(res.metric_norm == 0.0)
    assert np.all(res.reward == 0.0) and np.all(res.advantage == 0.0)
    assert res.zero_range.tolist() == [2, 2]


def test_all_equal_rewards_from_unequal_metrics() -> None:
    rewards = np.array([[0.3, 0.3, 0.3], [0.1, 0.2, 0.3]])
    adv = group_advantage(rewards)
    assert adv[0].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(adv[1], [-1.0, 0.0, 1.0], atol=1e-7)


def test_nonfinite_metric_flags_group_and_never_leaks_nan() -> None:
    raw = np.array(
        [
            [[20.0, 25.0, 30.0], [50.0, 70.0, 60.0]],
            [[20.0, np.nan, 30.0], [50.0, 70.0, 60.0]],
            [[20.0, 25.0, 30.0], [50.0, np.inf, 60.0]],
        ]
    )
    res = score_groups(
        raw,
        is_fr=np.array([True, False]),
        lower_better=np.array([False, False]),
        rho_s=np.full(3, 0.5),
        rho_d=np.full(3, 0.5),
    )
    assert res.nonfinite.tolist() == [False, True, True]
    assert res.keep.tolist() == [True, False, False]
    assert np.isfinite(res.reward).all() and np.isfinite(res.advantage).all()
    assert np.all(res.advantage[1:] == 0.0)
    np.testing.assert_allclose(res.reward[0], [0.0, 0.75, 0.75])


def test_group_filter_drops_saturated_groups() -> None:
    ranges = np.array([[0.0, 40.0], [0.0, 100.0]])
    raw = np.array(
        [
            [[39.0, 39.5, 39.8], [96.0, 97.0, 98.0]],  # absolute rewards ~.98, std ~.01: saturated
            [[20.0, 30.0, 39.0], [50.0, 70.0, 95.0]],  # spread out: kept
            [[39.0, 39.5, 39.8], [10.0, 10.0, 10.0]],  # high FR, low NR: mean .55: kept
        ]
    )
    kwargs = {"is_fr": np.array([True, False]), "lower_better": np.array([False, False])}
    res = score_groups(
        raw,
        **kwargs,
        rho_s=np.full(3, 0.5),
        rho_d=np.full(3, 0.5),
        score_ranges=ranges,
        filter_mean=0.9,
        filter_std=0.05,
    )
    assert res.filtered.tolist() == [True, False, False]
    assert res.keep.tolist() == [False, True, True]
    unfiltered = score_groups(raw, **kwargs, rho_s=np.full(3, 0.5), rho_d=np.full(3, 0.5))
    assert not unfiltered.filtered.any()


def test_filter_uses_each_metric_direction() -> None:
    ranges = np.array([[0.0, 100.0]])
    raw = np.array([[[1.0, 2.0, 1.5]]])  # PIQE-like, lower is better: ~.99 absolute -> saturated
    res = score_groups(
        raw,
        is_fr=np.array([False]),
        lower_better=np.array([True]),
        rho_s=np.zeros(1),
        rho_d=np.ones(1),
        score_ranges=ranges,
        filter_mean=0.9,
        filter_std=0.05,
    )
    assert res.filtered.tolist() == [True]


def test_minmax_normalise_shape_and_flags() -> None:
    norm, zero = minmax_normalise(np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(norm, [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    assert zero.tolist() == [False, True]


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="G=1"):
        group_advantage(np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"\[N, M, G\]"):
        score_groups(
            np.zeros((2, 3)),
            is_fr=np.array([True]),
            lower_better=np.array([False]),
            rho_s=np.zeros(2),
            rho_d=np.zeros(2),
        )

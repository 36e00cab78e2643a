"""The reward-hacking alarm on hand-built histories: when it fires, when it must not, and its edges."""

from __future__ import annotations

import math

import pytest

from rollout.alarm import AlarmConfig, RewardHackingGuard, RewardHackingStop, reward_hacking_alarm, trend

UP = {"ssim_y": True}  # higher is better
RISING = [(0, 0.10), (1, 0.11), (2, 0.12), (3, 0.13), (4, 0.14)]  # reward per step: +0.04 over steps 0..4


def _alarm(reward, heldout, *, margin=0.01, window=3, higher_better=UP, min_reward_rise=0.0):
    margins = dict.fromkeys(heldout, margin)
    return reward_hacking_alarm(reward, heldout, margins=margins, higher_better=higher_better, window=window,
                                min_reward_rise=min_reward_rise)  # fmt: skip


def test_trend_is_last_minus_first_for_two_points_and_least_squares_beyond():
    assert trend([(2, 0.5), (6, 0.25)]) == -0.25
    # centred steps -2, 0, 2; values 0.74, 0.73, 0.70 (mean 0.72333): slope = (-2*0.01667 + 2*-0.02333) / 8
    # = -0.01 per step, times the span of 4 steps = -0.04 (last minus first would say -0.04 as well)
    assert trend([(0, 0.74), (2, 0.73), (4, 0.70)]) == pytest.approx(-0.04)
    # one outlier in the middle moves the least-squares change not at all: it is centred
    assert trend([(0, 0.74), (2, 0.10), (4, 0.70)]) == pytest.approx(-0.04)


def test_fires_when_the_reward_rises_and_a_heldout_metric_falls_by_more_than_the_margin():
    (alarm,) = _alarm(RISING, {"ssim_y": [(0, 0.74), (2, 0.73), (4, 0.70)]}, margin=0.03)
    assert alarm.metric == "ssim_y"
    assert alarm.metric_fall == pytest.approx(0.04)
    assert alarm.reward_rise == pytest.approx(0.04)  # steps 0..4 of a reward rising 0.01 per step
    assert (alarm.first_step, alarm.last_step, alarm.margin) == (0, 4, 0.03)
    assert "ssim_y fell by 0.04" in alarm.message() and "steps 0 and 4" in alarm.message()


@pytest.mark.parametrize(
    ("reward", "ssim", "why"),
    [
        ([(0, 0.14), (2, 0.12), (4, 0.10)], [(0, 0.74), (2, 0.73), (4, 0.70)], "metric falls but the reward falls too"),
        ([(0, 0.1), (2, 0.1), (4, 0.1)], [(0, 0.74), (2, 0.73), (4, 0.70)], "metric falls, reward flat"),
        (RISING, [(0, 0.70), (2, 0.73), (4, 0.74)], "reward rises and the metric rises: learning"),
        (RISING, [(0, 0.74), (2, 0.74), (4, 0.735)], "the fall (0.005) is inside the margin (0.01)"),
    ],
)
def test_does_not_fire(reward, ssim, why):
    assert _alarm(reward, {"ssim_y": ssim}) == [], why


def test_margin_and_minimum_rise_are_strict():
    ssim = [(0, 0.75), (4, 0.5)]  # a fall of exactly 0.25 (binary-exact numbers)
    reward = [(0, 0.25), (4, 0.5)]  # a rise of exactly 0.25
    assert _alarm(reward, {"ssim_y": ssim}, margin=0.25, window=2) == []
    assert len(_alarm(reward, {"ssim_y": ssim}, margin=0.2499, window=2)) == 1
    assert _alarm(reward, {"ssim_y": ssim}, margin=0.1, window=2, min_reward_rise=0.25) == []
    assert len(_alarm(reward, {"ssim_y": ssim}, margin=0.1, window=2, min_reward_rise=0.2499)) == 1


def test_needs_a_full_window_and_reads_only_the_last_one():
    falling = {"ssim_y": [(0, 0.74), (2, 0.70)]}
    assert _alarm(RISING, falling, window=3) == []  # two validations, window 3
    assert len(_alarm(RISING, falling, window=2)) == 1
    # an old fall (steps 0 -> 2) followed by a recovery: the last window (2 -> 4 -> 6) rises
    history = {"ssim_y": [(0, 0.80), (2, 0.60), (4, 0.65), (6, 0.70)]}
    reward = [(s, 0.1 * s) for s in range(7)]
    assert _alarm(reward, history, window=3) == []
    assert len(_alarm(reward, history, window=4)) == 1  # the whole history: 0.80 -> 0.70 overall


def test_reward_points_outside_the_window_do_not_count():
    ssim = {"ssim_y": [(4, 0.74), (6, 0.70)]}
    # the reward rose before step 4 and falls inside the window [4, 6]
    reward = [(0, 0.0), (2, 0.5), (4, 1.0), (5, 0.9), (6, 0.8)]
    assert _alarm(reward, ssim, window=2) == []
    assert _alarm([(6, 1.0)], ssim, window=2) == []  # a single reward point is no trend
    assert _alarm([(3, 0.0), (6, 1.0)], ssim, window=2) == []  # step 3 is before the window
    assert len(_alarm([(4, 0.0), (6, 1.0)], ssim, window=2)) == 1


def test_lower_is_better_metrics_fall_when_they_go_up():
    piqe = {"reward.piqe": [(0, 40.0), (2, 45.0)]}  # PIQE: lower is better, so +5 is a fall of 5
    (alarm,) = _alarm(RISING, piqe, margin=1.0, window=2, higher_better={"reward.piqe": False})
    assert alarm.metric_fall == pytest.approx(5.0)
    assert _alarm(RISING, piqe, margin=1.0, window=2, higher_better={"reward.piqe": True}) == []


def test_a_nonfinite_value_in_the_window_does_not_fire():
    assert _alarm(RISING, {"ssim_y": [(0, 0.74), (2, math.nan), (4, 0.60)]}) == []
    assert _alarm([(0, 0.1), (2, math.inf), (4, 0.3)], {"ssim_y": [(0, 0.74), (2, 0.70), (4, 0.60)]}) == []


def test_each_watched_metric_is_judged_on_its_own_margin():
    heldout = {"ssim_y": [(0, 0.74), (2, 0.70)], "psnr_y": [(0, 26.0), (2, 25.9)]}
    alarms = reward_hacking_alarm(RISING, heldout, margins={"ssim_y": 0.01, "psnr_y": 0.2},
                                  higher_better={"ssim_y": True, "psnr_y": True}, window=2)  # fmt: skip
    assert [a.metric for a in alarms] == ["ssim_y"]  # PSNR-Y fell 0.1 dB, inside its 0.2 dB margin


def _guard(action: str) -> RewardHackingGuard:
    guard = RewardHackingGuard(AlarmConfig(window=2, margins={"ssim_y": 0.01}, action=action), UP)
    for step, reward, ssim in ((0, 0.1, 0.74), (2, 0.2, 0.70)):
        guard.add_reward(step, reward)
        guard.add_validation(step, {"ssim_y": ssim, "sharpness": 1.0})  # unwatched metrics are ignored
    return guard


def test_guard_warns_and_counts(capsys):
    seen = []
    (alarm,) = _guard("warn").check(on_alarm=seen.append)
    assert seen == [alarm]
    assert "reward-hacking alarm" in capsys.readouterr().out


def test_guard_stops_with_a_clear_message_after_counting():
    seen = []
    with pytest.raises(RewardHackingStop, match=r"ssim_y fell by 0\.04.*stopping the run"):
        _guard("stop").check(on_alarm=seen.append)
    assert len(seen) == 1  # counted before the stop


def test_guard_and_config_reject_bad_settings():
    with pytest.raises(ValueError, match="not held-out metrics"):
        RewardHackingGuard(AlarmConfig(margins={"lpips": 0.1}), UP)
    with pytest.raises(ValueError, match="window must be >= 2"):
        AlarmConfig(window=1, margins={"ssim_y": 0.1})
    with pytest.raises(ValueError, match=r"margins\.ssim_y must be >= 0"):
        AlarmConfig(margins={"ssim_y": -0.1})
    with pytest.raises(ValueError, match="at least one"):
        AlarmConfig(margins={})

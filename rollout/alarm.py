"""The reward-hacking alarm: the reward goes up while a held-out metric outside it goes down.

:func:`reward_hacking_alarm` is pure: it reads two histories, ``(step, value)`` pairs, and says which
watched metrics fell by more than their margin over the last ``window`` validations while the reward
rose over the same steps.  A change is the least-squares slope times the span of steps (with two points,
simply last minus first), so one noisy validation in a longer window moves it less than a raw
difference would.  :class:`RewardHackingGuard` keeps the histories of a run and applies the action.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Point = tuple[int, float]  # (learner step, value)
AlarmAction = Literal["warn", "stop"]


@dataclass(frozen=True, kw_only=True)
class AlarmConfig:
    window: int = 3  # validations the trend is measured over (>= 2)
    # held-out metric -> how far (in its own units) it may fall over the window before the alarm fires
    margins: dict[str, float]
    min_reward_rise: float = 0.0  # the reward must rise by more than this over the same steps
    action: AlarmAction = "warn"  # warn: log and count; stop: also end the run with an error

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2 validations (a trend needs two points), got {self.window}")
        if not self.margins:
            raise ValueError("margins must name at least one held-out metric to watch, e.g. {ssim_y: 0.005}")
        for name, margin in self.margins.items():
            if margin < 0:
                raise ValueError(f"margins.{name} must be >= 0, got {margin}")
        if self.min_reward_rise < 0:
            raise ValueError(f"min_reward_rise must be >= 0, got {self.min_reward_rise}")


@dataclass(frozen=True, kw_only=True)
class Alarm:
    """One firing: ``metric`` fell by ``metric_fall`` (> margin) while the reward rose by ``reward_rise``."""

    metric: str
    metric_fall: float  # positive: worse, in the metric's own units (sign flipped for lower-is-better)
    margin: float
    reward_rise: float
    first_step: int  # the window: first and last validation step
    last_step: int

    def message(self) -> str:
        return (
            f"reward-hacking alarm: between steps {self.first_step} and {self.last_step} the reward rose by "
            f"{self.reward_rise:+.4g} while held-out {self.metric} fell by {self.metric_fall:.4g} "
            f"(margin {self.margin:g})"
        )


def trend(points: Sequence[Point]) -> float:
    """Least-squares change over the span of ``points``: slope times (last step - first step)."""
    steps = np.array([s for s, _ in points], np.float64)
    values = np.array([v for _, v in points], np.float64)
    span = steps[-1] - steps[0]
    centred = steps - steps.mean()
    slope = float((centred * (values - values.mean())).sum() / (centred**2).sum())
    return slope * span


def reward_hacking_alarm(
    reward: Sequence[Point],
    heldout: Mapping[str, Sequence[Point]],
    *,
    margins: Mapping[str, float],
    higher_better: Mapping[str, bool],
    window: int,
    min_reward_rise: float = 0.0,
) -> list[Alarm]:
    """The alarms over the last ``window`` validations (empty: no alarm).

    ``reward``: the reward per step (any steps); ``heldout``: metric -> its value per validation.  Nothing
    fires with fewer than ``window`` validations, fewer than two reward points inside the window's steps,
    or a non-finite value inside the window (a broken measurement is not evidence of hacking).  Both
    comparisons are strict: a fall equal to the margin, or a rise equal to ``min_reward_rise``, does not fire.
    """
    alarms = []
    for name, margin in margins.items():
        points = sorted(heldout.get(name, ()))[-window:]
        if len(points) < window:
            continue
        first, last = points[0][0], points[-1][0]
        inside = sorted(p for p in reward if first <= p[0] <= last)
        if len({s for s, _ in inside}) < 2 or not all(math.isfinite(v) for _, v in (*points, *inside)):
            continue
        rise = trend(inside)
        fall = -trend(points) if higher_better[name] else trend(points)
        if rise > min_reward_rise and fall > margin:
            alarms.append(Alarm(metric=name, metric_fall=fall, margin=margin, reward_rise=rise,
                                first_step=first, last_step=last))  # fmt: skip
    return alarms


class RewardHackingStop(RuntimeError):
    """The alarm fired with ``action='stop'``."""


class RewardHackingGuard:
    """A run's reward and held-out histories; :meth:`check` runs the alarm and applies the action."""

    def __init__(self, config: AlarmConfig, higher_better: Mapping[str, bool]) -> None:
        unknown = sorted(set(config.margins) - set(higher_better))
        if unknown:
            raise ValueError(f"margins name {unknown}, not held-out metrics; watchable: {sorted(higher_better)}")
        self.config, self.higher_better = config, dict(higher_better)
        self.reward: list[Point] = []
        self.heldout: dict[str, list[Point]] = {name: [] for name in config.margins}

    def add_reward(self, step: int, value: float) -> None:
        self.reward.append((step, value))

    def add_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, points in self.heldout.items():
            points.append((step, metrics[name]))

    def check(self, on_alarm: Callable[[Alarm], None] | None = None) -> list[Alarm]:
        """The alarms now firing, each printed and passed to ``on_alarm`` (a counter); then, when the action
        is 'stop', raises :class:`RewardHackingStop`."""
        cfg = self.config
        alarms = reward_hacking_alarm(self.reward, self.heldout, margins=cfg.margins, higher_better=self.higher_better,
                                      window=cfg.window, min_reward_rise=cfg.min_reward_rise)  # fmt: skip
        for alarm in alarms:
            print(alarm.message(), flush=True)
            if on_alarm is not None:
                on_alarm(alarm)
        if alarms and cfg.action == "stop":
            raise RewardHackingStop(
                f"{alarms[0].message()}; stopping the run (validation.alarm.action='stop'; 'warn' only logs). "
                "The reward pays for something the held-out metrics do not: check the reward's metrics"
            )
        return alarms

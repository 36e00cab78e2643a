"""OARS's process-aware reward (SPEC section 10) on raw metric scores: pure numpy, checkable by hand.

    R = F * Q_lr + F ** (Q_lr / gamma) * (Q_sr - Q_lr),   gamma = 7

- ``F`` in [0, 1], fidelity: the full-reference metric (OARS: DISTS) mapped
  linearly from its fixed score range onto [0, 1], 1 = best, clipped; for
  DISTS (range 0..1, lower better) this is ``1 - DISTS``.
- ``Q_lr``, ``Q_sr``: the no-reference metric of the LR input and of the SR
  sample on one common MOS-like scale: the metric's fixed score range mapped
  linearly onto ``quality_scale`` (1..5 by default; worst -> 1, best -> 5),
  clipped.

With ``F = 1`` the reward is ``Q_sr``; with ``F = 0`` it is 0.  The quality
gain ``Q_sr - Q_lr`` counts more when fidelity is high, and more so when the
input was already good (a larger exponent ``Q_lr / gamma`` shrinks
``F ** (Q_lr / gamma)`` for ``F < 1``, so a good input must be kept faithful).
Advantages are Eq. 8 on ``R``; the group filter reads ``R / quality_scale[1]``
(1 = the best possible reward).
"""

from __future__ import annotations

import numpy as np

from reward_service.arf import ArfResult, group_advantage, range_normalise, saturated_groups


def quality_scale(raw: np.ndarray, score_range: tuple[float, float], lower_better: bool,
                  scale: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """Raw NR scores (any shape) -> ``scale`` (e.g. 1..5), linear on the metric's range, best -> ``scale[1]``."""
    unit = _unit(raw, score_range, lower_better)
    return scale[0] + (scale[1] - scale[0]) * unit


def fidelity(raw: np.ndarray, score_range: tuple[float, float], lower_better: bool) -> np.ndarray:
    """Raw FR scores -> [0, 1], linear on the metric's range, 1 = best (``1 - DISTS`` for DISTS)."""
    return _unit(raw, score_range, lower_better)


def process_aware_reward(f: np.ndarray, q_lr: np.ndarray, q_sr: np.ndarray, gamma: float) -> np.ndarray:
    """``F * Q_lr + F ** (Q_lr / gamma) * (Q_sr - Q_lr)``, broadcast elementwise."""
    return f * q_lr + np.power(f, q_lr / gamma) * (q_sr - q_lr)


def score_process_aware(
    fr_raw: np.ndarray,
    nr_sr_raw: np.ndarray,
    nr_lr_raw: np.ndarray,
    *,
    fr_range: tuple[float, float],
    fr_lower_better: bool,
    nr_range: tuple[float, float],
    nr_lower_better: bool,
    gamma: float,
    scale: tuple[float, float],
    filter_mean: float | None = None,
    filter_std: float | None = None,
) -> ArfResult:
    """N groups: FR ``[N, G]``, NR of the SR ``[N, G]`` and of the LR ``[N]`` raw scores -> :class:`ArfResult`.

    The result's metric axis holds (fidelity, quality of SR, quality of LR repeated over G);
    ``metric_norm`` carries F and the two Q on ``scale``; ``rho_s``/``rho_d`` are ARF's and are 0 here.
    """
    fr_raw, nr_sr_raw = np.asarray(fr_raw, np.float64), np.asarray(nr_sr_raw, np.float64)
    nr_lr_raw = np.broadcast_to(np.asarray(nr_lr_raw, np.float64)[:, None], fr_raw.shape)
    raw = np.stack([fr_raw, nr_sr_raw, nr_lr_raw], axis=1)  # [N, 3, G]
    nonfinite = ~np.isfinite(raw).all(axis=(1, 2))
    safe = np.where(nonfinite[:, None, None], 0.0, raw)
    f = fidelity(safe[:, 0], fr_range, fr_lower_better)
    q_sr = quality_scale(safe[:, 1], nr_range, nr_lower_better, scale)
    q_lr = quality_scale(safe[:, 2], nr_range, nr_lower_better, scale)
    reward = np.where(nonfinite[:, None], 0.0, process_aware_reward(f, q_lr, q_sr, gamma))
    filtered = np.zeros_like(nonfinite)
    if filter_mean is not None and filter_std is not None:
        filtered = saturated_groups(reward / scale[1], filter_mean, filter_std) & ~nonfinite
    n = raw.shape[0]
    return ArfResult(
        metric_raw=raw,
        metric_norm=np.stack([f, q_sr, q_lr], axis=1),
        rho_s=np.zeros(n),
        rho_d=np.zeros(n),
        reward=reward,
        advantage=group_advantage(reward),
        zero_range=np.zeros(n, np.int32),
        nonfinite=nonfinite,
        filtered=filtered,
    )


def _unit(raw: np.ndarray, score_range: tuple[float, float], lower_better: bool) -> np.ndarray:
    """ARF's fixed-range normalisation (one metric) for scores of any shape."""
    raw = np.asarray(raw, np.float64)
    ranges = np.asarray([score_range], np.float64)  # [1, 2]: one metric
    return range_normalise(raw.reshape(1, 1, -1), ranges, np.array([lower_better])).reshape(raw.shape)

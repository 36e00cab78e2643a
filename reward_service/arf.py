"""ARF arithmetic on raw metric scores (SPEC section 4, Eq. 7 and 8), plus OARS-style group filtering.

Pure numpy in float64 over arrays shaped [N groups, M metrics, G samples]; no torch, no pyiqa, so
every number here can be checked by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ADV_EPS = 1e-8  # Eq. 8 denominator guard


@dataclass(frozen=True, kw_only=True)
class ArfResult:
    """Scores of N groups; rows with ``keep`` false were dropped (non-finite metric or filtered)."""

    metric_raw: np.ndarray  # [N, M, G] float64, as the metrics report them
    metric_norm: np.ndarray  # [N, M, G] float64, higher is better, min-max over each group
    rho_s: np.ndarray  # [N] float64, weight of the FR mean in Eq. 7
    rho_d: np.ndarray  # [N] float64, weight of the NR mean
    reward: np.ndarray  # [N, G] float64, Eq. 7
    advantage: np.ndarray  # [N, G] float64, Eq. 8
    zero_range: np.ndarray  # [N] int32, metrics whose G values were all equal (normalised to 0)
    nonfinite: np.ndarray  # [N] bool, a metric returned NaN/inf: the group carries zeros and is dropped
    filtered: np.ndarray  # [N] bool, saturated group dropped by the filter

    @property
    def keep(self) -> np.ndarray:
        return ~(self.nonfinite | self.filtered)


def higher_is_better(raw: np.ndarray, lower_better: np.ndarray) -> np.ndarray:
    """[N, M, G] raw -> same with lower-is-better metrics ([M] bool) negated, so larger is always better."""
    return np.where(np.asarray(lower_better, bool)[None, :, None], -raw, raw)


def minmax_normalise(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group ``(s - min) / (max - min)`` over the last axis (G).

    Returns (normalised [..., G], zero_range [...] bool).  The reference divides by zero when all G
    values are equal (NaN); here every member gets 0, so the metric adds nothing to the ranking.
    """
    lo = scores.min(axis=-1, keepdims=True)
    span = scores.max(axis=-1, keepdims=True) - lo
    zero = span[..., 0] == 0
    norm = np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1.0), 0.0)
    return norm, zero


def arf_reward(norm: np.ndarray, is_fr: np.ndarray, rho_s: np.ndarray, rho_d: np.ndarray) -> np.ndarray:
    """Eq. 7: ``R = rho_s * mean_FR(norm) + rho_d * mean_NR(norm)``; [N, M, G] -> [N, G].

    A part with no metrics contributes 0 (its weight is 0 in the fr_only / nr_only ablations).
    """
    is_fr = np.asarray(is_fr, bool)
    fr = norm[:, is_fr].mean(axis=1) if is_fr.any() else np.zeros_like(norm[:, 0])
    nr = norm[:, ~is_fr].mean(axis=1) if (~is_fr).any() else np.zeros_like(norm[:, 0])
    return rho_s[:, None] * fr + rho_d[:, None] * nr


def group_advantage(reward: np.ndarray) -> np.ndarray:
    """Eq. 8: ``(R - mean R) / (std_unbiased R + 1e-8)`` per group; [N, G] -> [N, G].

    Groups whose G rewards are all equal get exactly 0 (not rounding noise / 1e-8).
    """
    if reward.shape[-1] < 2:
        raise ValueError(f"advantages need at least 2 samples per group, got G={reward.shape[-1]}")
    centred = reward - reward.mean(axis=-1, keepdims=True)
    adv = centred / (reward.std(axis=-1, ddof=1, keepdims=True) + ADV_EPS)
    flat = np.ptp(reward, axis=-1, keepdims=True) == 0
    return np.where(flat, 0.0, adv)


def range_normalise(raw: np.ndarray, ranges: np.ndarray, lower_better: np.ndarray) -> np.ndarray:
    """Raw [N, M, G] -> [0, 1] on each metric's fixed scale ([M, 2] lo/hi), 1 = best; clipped.

    Unlike the per-group min-max, this keeps the absolute level, which the group filter needs.
    """
    lo, hi = ranges[:, 0][None, :, None], ranges[:, 1][None, :, None]
    x = np.clip((raw - lo) / (hi - lo), 0.0, 1.0)
    return np.where(np.asarray(lower_better, bool)[None, :, None], 1.0 - x, x)


def saturated_groups(abs_reward: np.ndarray, mean_above: float, std_below: float) -> np.ndarray:
    """OARS-style filter: [N, G] absolute rewards -> [N] bool, true when the group is already good
    everywhere (mean > ``mean_above``) and barely varies (std, ddof=1, < ``std_below``).

    Such groups teach little: their min-max normalised scores amplify noise into full-range ranks.
    """
    return (abs_reward.mean(axis=-1) > mean_above) & (abs_reward.std(axis=-1, ddof=1) < std_below)


def score_groups(
    raw: np.ndarray,
    *,
    is_fr: np.ndarray,
    lower_better: np.ndarray,
    rho_s: np.ndarray,
    rho_d: np.ndarray,
    score_ranges: np.ndarray | None = None,
    filter_mean: float | None = None,
    filter_std: float | None = None,
) -> ArfResult:
    """All of ARF for N groups: raw [N, M, G] scores, [M] metric flags, [N] weights -> :class:`ArfResult`.

    ``filter_mean``/``filter_std`` given: saturated groups (on the ``score_ranges`` scale) are flagged.
    Non-finite groups are flagged and carry zeros, so no NaN leaves this function.
    """
    raw = np.asarray(raw, np.float64)
    if raw.ndim != 3 or raw.shape[1] != len(is_fr) or raw.shape[1] != len(lower_better):
        raise ValueError(f"raw scores must be [N, M, G] with M={len(is_fr)} metrics, got {raw.shape}")
    nonfinite = ~np.isfinite(raw).all(axis=(1, 2))
    safe = np.where(nonfinite[:, None, None], 0.0, raw)
    norm, zero = minmax_normalise(higher_is_better(safe, lower_better))
    reward = arf_reward(norm, is_fr, rho_s, rho_d)
    advantage = group_advantage(reward)
    filtered = np.zeros_like(nonfinite)
    if filter_mean is not None and filter_std is not None:
        if score_ranges is None or not np.isfinite(score_ranges).all():
            raise ValueError("group filtering needs a finite score range for every metric")
        absolute = arf_reward(range_normalise(safe, score_ranges, lower_better), is_fr, rho_s, rho_d)
        filtered = saturated_groups(absolute, filter_mean, filter_std) & ~nonfinite
    zero_range = np.where(nonfinite, 0, zero.sum(axis=1)).astype(np.int32)
    return ArfResult(
        metric_raw=raw,
        metric_norm=norm,
        rho_s=np.asarray(rho_s, np.float64),
        rho_d=np.asarray(rho_d, np.float64),
        reward=reward,
        advantage=advantage,
        zero_range=zero_range,
        nonfinite=nonfinite,
        filtered=filtered,
    )

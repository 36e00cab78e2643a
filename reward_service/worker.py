"""RewardWorker: scores every group of a rollout record batch and appends the reward columns.

A plain class (no Ray): ``reward_service.pool`` wraps it in actors.  One call scores all N groups of
a batch with one metric call per metric over all N*G samples (chunked by ``metric_batch_size``) and
one vectorised proportions call over the N HR images.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from common.records import GroupRewards, append_rewards, decode_rollout, select_rows
from reward_service.arf import ArfResult, score_groups
from reward_service.config import RewardConfig
from reward_service.metrics_iqa import Metric, build_metrics
from reward_service.process_aware import score_process_aware
from reward_service.proportions import check_rgb, detail_proportions


@dataclass(frozen=True, kw_only=True)
class ScoreStats:
    """What one scoring call did (per call; the pool aggregates)."""

    groups_in: int
    groups_scored: int  # rows of the returned batch
    zero_range_groups: int  # groups with at least one metric whose G values were all equal
    nonfinite_groups: int  # dropped: a metric returned NaN/inf
    filtered_groups: int  # dropped: saturated (OARS filter)
    dropped_group_ids: tuple[str, ...]
    seconds: float  # whole call
    metric_seconds: float
    proportion_seconds: float


class RewardWorker:
    """Scores rollout batches (SPEC section 4). ``metrics`` defaults to the config's pyiqa metrics."""

    def __init__(self, config: RewardConfig, metrics: Sequence[Metric] | None = None) -> None:
        self.config = config
        self.metrics = list(metrics) if metrics is not None else build_metrics(config)
        if not self.metrics:
            raise ValueError("RewardWorker needs at least one metric")
        self._is_fr = np.array([m.full_reference for m in self.metrics])
        self._lower_better = np.array([m.lower_better for m in self.metrics])
        self._ranges = np.array([m.score_range for m in self.metrics], dtype=np.float64).reshape(-1, 2)
        if config.kind == "process_aware" and not np.isfinite(self._ranges).all():
            raise ValueError(f"reward.kind='process_aware' maps each metric's score range onto a fixed scale; "
                             f"{self.metric_names[:2]} report ranges {self._ranges.tolist()}")  # fmt: skip

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The record's metric axis: the metrics, plus the quality of the LR input for process_aware."""
        names = tuple(m.name for m in self.metrics)
        return (*names, f"{names[-1]}_lr") if self.config.kind == "process_aware" else names

    def score_batch(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, ScoreStats]:
        """Rollout batch (N rows) -> (kept rows with reward columns, stats).

        Dropped groups (non-finite metric, or filtered) are left out of the returned batch and
        listed in ``stats.dropped_group_ids``; every input group is either returned or listed.
        """
        start = time.perf_counter()
        groups = decode_rollout(batch)
        sr, hr = _readonly_tensor(groups.sr), _readonly_tensor(groups.hr)
        result, timing = self._score(sr, hr, groups.group_id, lr=_readonly_tensor(groups.lr))
        keep = result.keep
        seconds = time.perf_counter() - start
        rewards = _group_rewards(result, keep, self.metric_names, seconds / max(len(keep), 1))
        out = append_rewards(select_rows(batch, keep), rewards)
        dropped = tuple(gid for gid, k in zip(groups.group_id, keep, strict=True) if not k)
        stats = ScoreStats(
            groups_in=len(keep),
            groups_scored=int(keep.sum()),
            zero_range_groups=int((result.zero_range > 0).sum()),
            nonfinite_groups=int(result.nonfinite.sum()),
            filtered_groups=int(result.filtered.sum()),
            dropped_group_ids=dropped,
            seconds=time.perf_counter() - start,
            metric_seconds=timing[0],
            proportion_seconds=timing[1],
        )
        return out, stats

    def score_images(self, sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor | None = None) -> ArfResult:
        """sr [N, G, 3, H, W] float in [0, 1], hr and lr [N, 3, H, W] (uint8 or float in [0, 1]) -> ArfResult.

        ``lr`` (resized to the SR size) is read by ``kind='process_aware'`` only.
        """
        return self._score(sr, hr, None, lr=lr)[0]

    def _score(
        self, sr: torch.Tensor, hr: torch.Tensor, group_ids: Sequence[str] | None, *, lr: torch.Tensor | None
    ) -> tuple[ArfResult, tuple[float, float]]:
        sr, finite = _zero_nonfinite_groups(sr)
        check_inputs(sr, hr)
        t0 = time.perf_counter()
        raw = self._metric_scores(sr, hr)  # [N, M, G]
        # A group with a NaN/inf sample has no score: its values are NaN, so it is dropped and counted
        # as non-finite (or raised, with reward.nonfinite='raise') like a metric's NaN.
        raw[~finite] = np.nan
        t1 = time.perf_counter()
        if self.config.kind == "process_aware":
            return self._process_aware(raw, lr, group_ids), (t1 - t0, time.perf_counter() - t1)
        rho_s, rho_d = self._weights(hr)
        t2 = time.perf_counter()
        cfg = self.config
        result = score_groups(
            raw,
            is_fr=self._is_fr,
            lower_better=self._lower_better,
            rho_s=rho_s,
            rho_d=rho_d,
            score_ranges=self._ranges,
            filter_mean=cfg.filter_mean if cfg.filter_groups else None,
            filter_std=cfg.filter_std if cfg.filter_groups else None,
        )
        self._check_finite(result, raw, group_ids)
        return result, (t1 - t0, t2 - t1)

    def _process_aware(self, raw: np.ndarray, lr: torch.Tensor | None, group_ids: Sequence[str] | None) -> ArfResult:
        """OARS's reward from the FR (fidelity) and NR (quality) scores of the SR and the NR score of the LR."""
        if lr is None:
            raise ValueError("reward.kind='process_aware' scores the LR input too: pass lr [N, 3, H, W]")
        check_rgb(lr, "LR image")
        quality = self.metrics[1]  # config order: the one FR metric, then the one NR metric
        lr_unit = _as_unit_float(lr).to(self.config.device)
        q_lr = quality(lr_unit, lr_unit).detach().to("cpu", torch.float64).numpy()  # NR: the second input is unused
        cfg = self.config
        result = score_process_aware(
            raw[:, 0], raw[:, 1], q_lr,
            fr_range=self.metrics[0].score_range, fr_lower_better=self.metrics[0].lower_better,
            nr_range=quality.score_range, nr_lower_better=quality.lower_better,
            gamma=cfg.gamma, scale=cfg.quality_scale,
            filter_mean=cfg.filter_mean if cfg.filter_groups else None,
            filter_std=cfg.filter_std if cfg.filter_groups else None,
        )  # fmt: skip
        self._check_finite(result, result.metric_raw, group_ids)
        return result

    def _check_finite(self, result: ArfResult, raw: np.ndarray, group_ids: Sequence[str] | None) -> None:
        """With reward.nonfinite='raise', a NaN/inf metric value is an error naming the metrics and groups."""
        if self.config.nonfinite == "raise" and result.nonfinite.any():
            bad = np.flatnonzero(result.nonfinite)
            names = [group_ids[i] for i in bad] if group_ids is not None else bad.tolist()
            metrics = [m for j, m in enumerate(self.metric_names) if not np.isfinite(raw[bad, j]).all()]
            raise ValueError(
                f"NaN/inf SR samples or metric(s) {metrics} returned NaN/inf for group(s) {names} "
                "(reward.nonfinite='raise')"
            )

    def _metric_scores(self, sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
        """One call per metric over all N*G samples: -> [N, M, G] float64."""
        n, g = sr.shape[:2]
        device = torch.device(self.config.device)
        flat = sr.reshape(n * g, *sr.shape[2:]).to(device, torch.float32)
        ref = _as_unit_float(hr).to(device)[:, None].expand(n, g, *hr.shape[1:]).reshape(n * g, *hr.shape[1:])
        scores = [metric(flat, ref).detach().to("cpu", torch.float64).reshape(n, g) for metric in self.metrics]
        return torch.stack(scores, dim=1).numpy()

    def _weights(self, hr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[N] rho_s and rho_d: HR proportions for weighting='arf', constants for the ablations."""
        cfg, n = self.config, hr.shape[0]
        if cfg.weighting != "arf":
            rho_s = {"fixed": cfg.fixed_rho_s, "fr_only": 1.0, "nr_only": 0.0}[cfg.weighting]
            return np.full(n, rho_s), np.full(n, 1.0 - rho_s)
        rho_s, rho_d = detail_proportions(
            hr.to(cfg.device),
            gray=cfg.gray,
            patch_size=cfg.patch_size,
            resize=cfg.resize,
            threshold=cfg.detail_threshold,
            round_to=2 if cfg.round_proportions else None,
            dtype=torch.float32 if cfg.proportions_dtype == "float32" else torch.float64,
            chunk=cfg.patch_chunk,
            backend=cfg.proportions_backend,
        )
        return rho_s.cpu().numpy(), rho_d.cpu().numpy()


def check_inputs(sr: torch.Tensor, hr: torch.Tensor) -> None:
    """ValueError unless sr is [N, G>=2, 3, H, W] float in [0, 1] and hr is [N, 3, H, W] of the same size."""
    if not isinstance(sr, torch.Tensor) or sr.ndim != 5:
        raise ValueError(f"SR samples: expected a tensor [N, G, 3, H, W], got {getattr(sr, 'shape', type(sr))}")
    if not sr.is_floating_point():
        raise ValueError(f"SR samples: expected floating point in [0, 1], got {sr.dtype}")
    if sr.shape[1] < 2:
        raise ValueError(f"SR samples: a group needs G >= 2 samples for Eq. 8, got G={sr.shape[1]}")
    check_rgb(sr.reshape(-1, *sr.shape[2:]), "SR samples")
    check_rgb(hr, "HR image")
    if hr.shape[0] != sr.shape[0]:
        raise ValueError(f"{sr.shape[0]} groups of SR samples but {hr.shape[0]} HR images")
    if hr.shape[2:] != sr.shape[3:]:
        raise ValueError(f"HR size {tuple(hr.shape[2:])} differs from SR size {tuple(sr.shape[3:])}")


def _zero_nonfinite_groups(sr: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(``sr`` with every group that holds a NaN/inf value zeroed, [N] bool: the group was finite).

    The zeroed copy keeps the metrics' inputs valid; the caller discards those groups' scores.
    Anything that is not an [N, G, ...] float tensor passes unchanged: :func:`check_inputs` rejects it.
    """
    if not isinstance(sr, torch.Tensor) or sr.ndim != 5 or not sr.is_floating_point():
        return sr, np.ones(0, dtype=bool)
    finite = torch.isfinite(sr.reshape(sr.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return sr, finite.numpy()
    return torch.where(finite[:, None, None, None, None], sr, torch.zeros((), dtype=sr.dtype)), finite.numpy()


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an Arrow-backed read-only array without copying; nothing here writes to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _group_rewards(result: ArfResult, keep: np.ndarray, names: tuple[str, ...], per_group_s: float) -> GroupRewards:
    """The kept rows of ``result`` as the record's GroupRewards (float32 columns)."""
    return GroupRewards(
        metric_names=names,
        metric_raw=result.metric_raw[keep].astype(np.float32),
        metric_norm=result.metric_norm[keep].astype(np.float32),
        rho_s=result.rho_s[keep].astype(np.float32),
        rho_d=result.rho_d[keep].astype(np.float32),
        reward=result.reward[keep].astype(np.float32),
        advantage=result.advantage[keep].astype(np.float32),
        zero_range=result.zero_range[keep],
        reward_seconds=np.full(int(keep.sum()), per_group_s),  # the call's wall time, shared evenly
    )

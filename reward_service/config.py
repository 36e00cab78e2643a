"""Reward service configuration: one frozen dataclass for the ARF, one for the Ray pool.

Built by the lead with ``common.config.from_mapping(RewardConfig, mapping, where="reward")``;
``__post_init__`` rejects inconsistent values with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.ray_session import validate_custom_resources

# The metrics of the paper (SPEC section 4); anything else triggers the "not the paper's metrics" notice.
PAPER_FR_METRICS = ("psnr_y",)
PAPER_NR_METRICS = ("musiq", "maniqa")
# No-download stand-ins for the tiny config: pyiqa metrics that ship no weights file (checked offline).
OFFLINE_FR_METRICS = ("psnr_y",)
OFFLINE_NR_METRICS = ("piqe", "entropy")

Weighting = Literal["arf", "fixed", "fr_only", "nr_only"]
# arf: Eq. 7 (SPEC section 4) and its ablations (weighting, fr_metrics); process_aware: OARS's reward
# (SPEC section 10, reward_service.process_aware) with fr_metrics = [fidelity] and nr_metrics = [quality].
RewardKind = Literal["arf", "process_aware"]


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """How one group of G samples is scored (SPEC section 4, or OARS's process-aware reward)."""

    kind: RewardKind = "arf"
    fr_metrics: tuple[str, ...] = PAPER_FR_METRICS  # full-reference part of Eq. 7; e.g. ("psnr_y", "lpips")
    nr_metrics: tuple[str, ...] = PAPER_NR_METRICS  # no-reference part of Eq. 7
    weighting: Weighting = "arf"  # arf: rho from the HR image; fixed: fixed_rho_s; fr_only / nr_only: ablations
    fixed_rho_s: float = 0.5  # rho_s for weighting="fixed" (rho_d = 1 - rho_s)
    gamma: float = 7.0  # process_aware: R = F Q_lr + F^(Q_lr / gamma) (Q_sr - Q_lr)
    quality_scale: tuple[float, float] = (1.0, 5.0)  # process_aware: each NR score range maps linearly onto this
    gray: Literal["opencv_bgr", "luma"] = "opencv_bgr"  # opencv_bgr = reference quirk (BGR weights on RGB)
    round_proportions: bool = True  # the reference rounds rho_s and rho_d to 2 decimals
    patch_size: int = 10  # pixels per patch side; right/bottom remainders form smaller patches
    resize: int = 64  # every patch is resized (bilinear) to resize x resize before Sobel
    detail_threshold: float = 50.0  # a patch is detailed when entropy * patch pixels > this
    proportions_dtype: Literal["float32", "float64"] = "float32"  # float32 re-checks borderline patches in float64
    proportions_backend: Literal["auto", "fused", "torch"] = "auto"  # auto: fused kernel on CPU, torch on CUDA
    patch_chunk: int = 64  # torch backend: patches per vectorised step (64 * 64^2 floats stay in cache)
    filter_groups: bool = False  # OARS-style: drop saturated groups (high mean, low spread)
    filter_mean: float = 0.9  # drop when the mean range-normalised reward is above this ...
    filter_std: float = 0.05  # ... and its std (ddof=1) is below this
    nonfinite: Literal["drop", "raise"] = "drop"  # a NaN/inf metric value drops (and counts) its group, or raises
    weights_dir: str = ""  # folder searched first for metric checkpoints; never downloaded
    device: str = "cpu"  # torch device for metrics and proportions
    metric_batch_size: int = 32  # images per metric forward call

    def __post_init__(self) -> None:
        for key in ("fr_metrics", "nr_metrics"):
            names = getattr(self, key)
            if len(set(names)) != len(names):
                raise ValueError(f"{key} lists a metric twice: {list(names)}")
        both = sorted(set(self.fr_metrics) & set(self.nr_metrics))
        if both:
            raise ValueError(f"fr_metrics and nr_metrics overlap: {both}")
        needs_fr = self.weighting in ("arf", "fixed", "fr_only")
        needs_nr = self.weighting in ("arf", "fixed", "nr_only")
        if needs_fr and not self.fr_metrics:
            raise ValueError(f"weighting={self.weighting!r} needs at least one fr_metrics entry")
        if needs_nr and not self.nr_metrics:
            raise ValueError(f"weighting={self.weighting!r} needs at least one nr_metrics entry")
        if self.kind == "process_aware":
            self._check_process_aware()
        if not 0.0 <= self.fixed_rho_s <= 1.0:
            raise ValueError(f"fixed_rho_s must be in [0, 1], got {self.fixed_rho_s}")
        if self.patch_size < 1 or self.resize < 3:
            raise ValueError(f"patch_size must be >= 1 and resize >= 3, got {self.patch_size}, {self.resize}")
        if self.detail_threshold < 0:
            raise ValueError(f"detail_threshold must be >= 0, got {self.detail_threshold}")
        if self.patch_chunk < 1 or self.metric_batch_size < 1:
            raise ValueError("patch_chunk and metric_batch_size must be >= 1")
        if not 0.0 <= self.filter_mean <= 1.0 or self.filter_std < 0.0:
            raise ValueError(
                f"filter_mean must be in [0, 1] and filter_std >= 0, got {self.filter_mean}, {self.filter_std}"
            )
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.proportions_backend == "fused" and not self.device.startswith("cpu"):
            raise ValueError(f"proportions_backend='fused' is the CPU kernel; device is {self.device!r}")

    def _check_process_aware(self) -> None:
        if len(self.fr_metrics) != 1 or len(self.nr_metrics) != 1:
            raise ValueError(
                "kind='process_aware' needs exactly one fr_metrics entry (fidelity, e.g. dists) and one "
                f"nr_metrics entry (quality, e.g. musiq); got {list(self.fr_metrics)} and {list(self.nr_metrics)}"
            )
        if self.weighting != "arf":
            raise ValueError(f"weighting={self.weighting!r} is an ARF ablation; kind='process_aware' has no rho")
        if not self.gamma > 0 or not self.quality_scale[0] < self.quality_scale[1] or self.quality_scale[1] <= 0:
            raise ValueError(f"gamma must be > 0 and quality_scale increasing and positive, got "
                             f"{self.gamma}, {list(self.quality_scale)}")  # fmt: skip

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Metrics in column order of ``GroupRewards.metric_raw``: FR first, then NR (only those used)."""
        fr = self.fr_metrics if self.weighting != "nr_only" else ()
        nr = self.nr_metrics if self.weighting != "fr_only" else ()
        return (*fr, *nr)

    @property
    def is_paper_setup(self) -> bool:
        return set(self.fr_metrics) <= set(PAPER_FR_METRICS) and set(self.nr_metrics) <= set(PAPER_NR_METRICS)

    @classmethod
    def offline(cls, **overrides: object) -> RewardConfig:
        """The no-download default for the tiny config (not the paper's metrics; a notice says so)."""
        return cls(fr_metrics=OFFLINE_FR_METRICS, nr_metrics=OFFLINE_NR_METRICS, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class RewardPoolConfig:
    """The Ray actor pool that runs :class:`reward_service.worker.RewardWorker` instances."""

    num_workers: int = 2
    num_cpus: float = 1.0  # per worker
    num_gpus: float = 0.0  # per worker; fractional values share a GPU
    timeout_s: float = 120.0  # per scoring call; a slower worker is killed and its batch retried
    max_retries: int = 2  # extra attempts per batch after a failure or timeout
    start_timeout_s: float = 300.0  # a worker must construct (import torch/pyiqa, load weights) within this
    # Custom Ray resources per worker, e.g. {gdpo_reward: 1}: keeps workers on the node group that declares it.
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_custom_resources(self.resources)
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError(f"timeout_s and start_timeout_s must be > 0, got {self.timeout_s}, {self.start_timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

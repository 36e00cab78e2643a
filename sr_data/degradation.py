"""Real-ESRGAN second-order degradation on batched torch tensors (SPEC section 6).

``degrade(hr, generator, config)`` turns HR images ``[B, 3, H, W]`` in [0, 1]
into the LR input NAOSD trains on: blur -> resize -> noise -> JPEG, twice, a
final sinc and x``scale`` down (the two in random order, as Real-ESRGAN), 8-bit
quantisation, then the LR resized back to ``H x W`` with a random mode and
quantised again.  Every random draw comes from the caller's
``torch.Generator``: the same seed gives the same LR, bit for bit, on one device.

Reference behaviour (Real-ESRGAN's ``feed_data``): blur kernels, noise levels,
grey-noise flags and JPEG qualities are drawn per sample; the resize scales and
modes, the noise kind (Gaussian or Poisson), whether the second blur happens and
the order of the final sinc/JPEG are drawn once per batch, because a batch must
keep one spatial size.  ``independent_samples=True`` degrades each image on its
own (B calls of batch 1) so every choice is per sample.

Differences from Real-ESRGAN worth knowing: JPEG is kornia's differentiable
codec, whose rounding is ``round(x) + (x - round(x))**3`` (Real-ESRGAN's data
path uses exact rounding: coefficients differ by at most 0.125 quantisation
steps); filtering falls back from reflect to replicate borders when an image
side is not longer than half the kernel (Real-ESRGAN would raise there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import kornia
import torch
from torch import Tensor

from sr_data import kernels as K

RESIZE_MODES = ("area", "bilinear", "bicubic")
ODD_SIZES_7_21 = (7, 9, 11, 13, 15, 17, 19, 21)


@dataclass(frozen=True, kw_only=True)
class DegradationConfig:
    """Parameters of the second-order pipeline; defaults are the lighter GDPO set of SPEC section 6.

    Blur-kernel parameters follow Real-ESRGAN's training config.  ``resize_prob``
    is the probability of (up, down, keep); ``*_range`` are closed ranges sampled
    uniformly; noise sigmas are in 8-bit units (/255 internally).
    """

    scale: int = 4
    kernel_sizes: tuple[int, ...] = ODD_SIZES_7_21
    kernel_list: tuple[str, ...] = K.KERNEL_KINDS
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)

    second_blur_prob: float = 0.5
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)  # not the first stage's (0.2, 0.7, 0.1)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (60.0, 100.0)

    final_sinc_prob: float = 0.8
    resize_modes: tuple[str, ...] = RESIZE_MODES  # intermediate resizes
    upscale_modes: tuple[str, ...] = ("bicubic", "bilinear", "area")  # LR back to HR size
    independent_samples: bool = False

    REALESRGAN: ClassVar[dict[str, object]] = dict(  # OSEDiff's heavier Real-ESRGAN set
        resize_range=(0.15, 1.5),
        noise_range=(1.0, 30.0),
        poisson_scale_range=(0.05, 3.0),
        jpeg_range=(30.0, 95.0),
        second_blur_prob=0.8,
        resize_range2=(0.3, 1.2),
        noise_range2=(1.0, 25.0),
        poisson_scale_range2=(0.05, 2.5),
        jpeg_range2=(30.0, 95.0),
    )

    @classmethod
    def realesrgan(cls, **overrides: object) -> DegradationConfig:
        """OSEDiff's / Real-ESRGAN's heavier parameter set (kernel settings are shared)."""
        return cls(**{**cls.REALESRGAN, **overrides})

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        bad = [k for k in self.kernel_sizes if k % 2 == 0 or not 3 <= k <= K.MAX_KERNEL_SIZE]
        if not self.kernel_sizes or bad:
            raise ValueError(f"kernel_sizes must be odd in [3, {K.MAX_KERNEL_SIZE}], got {self.kernel_sizes}")
        unknown = set(self.kernel_list) - set(K.KERNEL_KINDS)
        if unknown:
            raise ValueError(f"kernel_list has unknown kinds {sorted(unknown)}; known: {K.KERNEL_KINDS}")
        for name in ("kernel_prob", "resize_prob", "resize_prob2"):
            _check_probs(name, getattr(self, name))
        if len(self.kernel_prob) != len(self.kernel_list):
            raise ValueError(f"kernel_prob has {len(self.kernel_prob)} entries, kernel_list {len(self.kernel_list)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_prob") and isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must lie in [0, 1], got {value}")
            if (f.name.endswith("_range") or f.name.endswith("_range2") or "sigma" in f.name) and (
                len(value) != 2 or not 0 <= value[0] <= value[1]
            ):
                raise ValueError(f"{f.name} must be [low, high] with 0 <= low <= high, got {value}")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if not (low >= 1 and high <= 100):
                raise ValueError(f"{name} must lie within [1, 100], got {getattr(self, name)}")
        for name in ("resize_modes", "upscale_modes"):
            if not getattr(self, name) or set(getattr(self, name)) - set(RESIZE_MODES):
                raise ValueError(f"{name} must be a non-empty subset of {RESIZE_MODES}, got {getattr(self, name)}")


def _check_probs(name: str, probs: tuple[float, ...]) -> None:
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be non-negative and sum to 1, got {probs}")


# --- public entry points -------------------------------------------------------------------------


def degrade(hr: Tensor, generator: torch.Generator, config: DegradationConfig | None = None) -> Tensor:
    """HR ``[B, 3, H, W]`` in [0, 1] -> LR resized back to ``[B, 3, H, W]``, 8-bit quantised, in [0, 1].

    ``H`` and ``W`` should be multiples of ``config.scale`` (the LR is ``H // scale``).
    """
    config = config or DegradationConfig()
    lr = degrade_lr(hr, generator, config)
    mode = config.upscale_modes[K.choice(generator, len(config.upscale_modes))]
    return quantize(resize(lr.float(), hr.shape[-2:], mode)).to(hr.dtype)


def degrade_lr(hr: Tensor, generator: torch.Generator, config: DegradationConfig | None = None) -> Tensor:
    """HR ``[B, 3, H, W]`` in [0, 1] -> LR ``[B, 3, H // scale, W // scale]``, 8-bit quantised."""
    config = config or DegradationConfig()
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected HR images [B, 3, H, W], got shape {tuple(hr.shape)}")
    if min(hr.shape[-2:]) < config.scale:
        raise ValueError(f"HR side {min(hr.shape[-2:])} is smaller than the scale {config.scale}")
    if config.independent_samples and hr.shape[0] > 1:
        return torch.cat([_second_order(x[None].float(), generator, config) for x in hr]).to(hr.dtype)
    return _second_order(hr.float(), generator, config).to(hr.dtype)


def quantize(x: Tensor) -> Tensor:
    """Round to the 8-bit grid of [0, 1] (clamped)."""
    return (x * 255.0).round().clamp(0, 255) / 255.0


# --- the pipeline ------------------------------------------------------------------------------


def _second_order(hr: Tensor, g: torch.Generator, c: DegradationConfig) -> Tensor:
    b, _, h, w = hr.shape
    kernel1, kernel2, sinc = draw_kernels(b, g, c, hr.device)
    # first degradation: blur, resize by a factor, noise, JPEG
    out = blur(hr, kernel1)
    out = resize(out, _scaled_size((h, w), _resize_factor(g, c.resize_prob, c.resize_range)), _mode(g, c))
    out = _noise(out, g, **_noise_args(c, stage=1))
    out = jpeg(out, _per_sample(g, b, c.jpeg_range, hr.device))
    # second degradation, relative to the final LR size
    if K.uniform(g, 0.0, 1.0) < c.second_blur_prob:
        out = blur(out, kernel2)
    factor2 = _resize_factor(g, c.resize_prob2, c.resize_range2)
    out = resize(out, _scaled_size((h / c.scale, w / c.scale), factor2), _mode(g, c))
    out = _noise(out, g, **_noise_args(c, stage=2))
    lr_size = (h // c.scale, w // c.scale)
    quality2 = _per_sample(g, b, c.jpeg_range2, hr.device)
    if K.uniform(g, 0.0, 1.0) < 0.5:  # resize + final sinc, then JPEG
        out = jpeg(blur(resize(out, lr_size, _mode(g, c)), sinc), quality2)
    else:  # JPEG, then resize + final sinc
        out = blur(resize(jpeg(out, quality2), lr_size, _mode(g, c)), sinc)
    return quantize(out)


def draw_kernels(b: int, g: torch.Generator, c: DegradationConfig, device: torch.device) -> tuple[Tensor, ...]:
    """Three ``[B, 21, 21]`` float32 kernel stacks; drawn even when unused so the RNG stream stays fixed."""
    stage1 = dict(sinc_prob=c.sinc_prob, sigma_range=c.blur_sigma, betag_range=c.betag_range, betap_range=c.betap_range)
    stage2 = dict(
        sinc_prob=c.sinc_prob2, sigma_range=c.blur_sigma2, betag_range=c.betag_range2, betap_range=c.betap_range2
    )
    shared = dict(sizes=c.kernel_sizes, kinds=c.kernel_list, probs=c.kernel_prob)
    k1 = [K.random_blur_kernel(g, **shared, **stage1) for _ in range(b)]
    k2 = [K.random_blur_kernel(g, **shared, **stage2) for _ in range(b)]
    sinc = [K.random_final_sinc_kernel(g, sizes=c.kernel_sizes, prob=c.final_sinc_prob) for _ in range(b)]
    return tuple(torch.stack(ks).to(device=device, dtype=torch.float32) for ks in (k1, k2, sinc))


def _noise_args(c: DegradationConfig, stage: int) -> dict[str, object]:
    suffix = "" if stage == 1 else "2"
    return dict(
        gaussian_prob=getattr(c, f"gaussian_noise_prob{suffix}"),
        sigma_range=getattr(c, f"noise_range{suffix}"),
        poisson_range=getattr(c, f"poisson_scale_range{suffix}"),
        gray_prob=getattr(c, f"gray_noise_prob{suffix}"),
    )


def _mode(g: torch.Generator, c: DegradationConfig) -> str:
    return c.resize_modes[K.choice(g, len(c.resize_modes))]


def _resize_factor(g: torch.Generator, probs: tuple[float, ...], factor_range: tuple[float, float]) -> float:
    kind = K.choice(g, 3, probs)  # 0 up, 1 down, 2 keep
    if kind == 0:
        return K.uniform(g, 1.0, factor_range[1])
    if kind == 1:
        return K.uniform(g, factor_range[0], 1.0)
    return 1.0


def _scaled_size(size: tuple[float, float], factor: float) -> tuple[int, int]:
    return max(1, int(size[0] * factor)), max(1, int(size[1] * factor))


def _per_sample(g: torch.Generator, b: int, value_range: tuple[float, float], device: torch.device) -> Tensor:
    """``[B]`` values uniform in ``value_range``."""
    u = torch.rand(b, generator=g, device=g.device).to(device)
    return value_range[0] + (value_range[1] - value_range[0]) * u


# --- stages (usable on their own; tests measure each) ------------------------------------------


def blur(x: Tensor, kernel: Tensor) -> Tensor:
    """``[B, C, H, W]`` filtered by per-sample kernels ``[B, k, k]`` (or one shared ``[1, k, k]``)."""
    half = kernel.shape[-1] // 2
    border = "reflect" if min(x.shape[-2:]) > half else "replicate"  # reflect needs a side longer than k // 2
    return kornia.filters.filter2d(x, kernel.to(x), border_type=border)


def resize(x: Tensor, size: tuple[int, int] | torch.Size, mode: str) -> Tensor:
    """Resize ``[B, C, H, W]`` to ``size`` with F.interpolate semantics (no antialias, like Real-ESRGAN)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    align = False if mode in ("bilinear", "bicubic") else None
    return kornia.geometry.transform.resize(x, size, interpolation=mode, align_corners=align)


def jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG encode-decode ``[B, 3, H, W]`` at per-sample ``quality`` ``[B]`` (clamped first, as Real-ESRGAN)."""
    return kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), quality.to(x)).clamp(0, 1)


def _noise(
    x: Tensor,
    g: torch.Generator,
    *,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
) -> Tensor:
    b = x.shape[0]
    gray = (torch.rand(b, generator=g, device=g.device) < gray_prob).to(x).view(b, 1, 1, 1)
    if K.uniform(g, 0.0, 1.0) < gaussian_prob:
        sigma = _per_sample(g, b, sigma_range, x.device).view(b, 1, 1, 1) / 255.0
        return gaussian_noise(x, g, sigma, gray)
    scale = _per_sample(g, b, poisson_range, x.device).view(b, 1, 1, 1)
    return poisson_noise(x, g, scale, gray)


def _randn(shape: tuple[int, ...], g: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=g, device=g.device).to(like)


def gaussian_noise(x: Tensor, g: torch.Generator, sigma: Tensor, gray: Tensor) -> Tensor:
    """Add N(0, sigma^2) noise to ``[B, 3, H, W]``; ``sigma``, ``gray`` are ``[B, 1, 1, 1]`` (gray: 1 = same
    noise on all channels).  Result clamped to [0, 1]."""
    b, c, h, w = x.shape
    color = _randn((b, c, h, w), g, x)
    mono = _randn((b, 1, h, w), g, x)
    noise = (color * (1 - gray) + mono * gray) * sigma
    return (x + noise).clamp(0, 1)


def poisson_noise(x: Tensor, g: torch.Generator, scale: Tensor, gray: Tensor) -> Tensor:
    """Add signal-dependent Poisson (shot) noise, ``scale`` ``[B, 1, 1, 1]``; clamped to [0, 1].

    As Real-ESRGAN: the photon count per unit intensity is the number of distinct
    8-bit levels in the image rounded up to a power of two; grey samples get the
    noise of their luma on all channels.  Unlike Real-ESRGAN, which draws both
    kinds for every sample and keeps one, each sample's unused kind is not drawn
    (Poisson sampling dominates this stage's cost).
    """
    is_gray = gray.flatten() > 0.5
    noise = torch.zeros_like(x)
    if (~is_gray).any():
        noise[~is_gray] = _shot_noise(quantize(x[~is_gray]), g)
    if is_gray.any():
        noise[is_gray] = _shot_noise(quantize(kornia.color.rgb_to_grayscale(x[is_gray])), g).expand(-1, 3, -1, -1)
    return (x + noise * scale).clamp(0, 1)


def _shot_noise(img: Tensor, g: torch.Generator) -> Tensor:
    """``poisson(img * vals) / vals - img`` for 8-bit-quantised ``[B, C, H, W]``, ``vals`` per sample."""
    levels = _distinct_levels(img).to(img)
    vals = (2 ** torch.ceil(torch.log2(levels))).view(-1, 1, 1, 1)
    counts = torch.poisson((img * vals).to(g.device), generator=g).to(img)
    return counts / vals - img


def _distinct_levels(img: Tensor) -> Tensor:
    """``[B]`` number of distinct 8-bit values per sample (a bincount: much cheaper than torch.unique)."""
    b = img.shape[0]
    codes = (img * 255).round().long().flatten(1) + 256 * torch.arange(b, device=img.device)[:, None]
    return (torch.bincount(codes.flatten(), minlength=256 * b).view(b, 256) > 0).sum(1)

"""A fixed held-out evaluation: the same crops and the same noise every time, scored in and outside the reward.

Shared by the learning benchmark (``benchmarks/bench_learning.py``) and the training run's validation actor
(``rollout.validation``), so both measure the same thing:

- :func:`heldout_crops`: fixed HR crops (positions drawn from a seed) and their x4 bicubic LR (brought back to
  the HR size, as NAOSD takes it), from the
  embedded held-out photos (``sr_data.embedded_images.EMBEDDED_HELDOUT``, never trained on) or a folder;
- :func:`sample_fixed_noise`: NAOSD samples whose noise depends on (seed, crop) only, so two models (or
  one model before and after training) see identical noise;
- :func:`image_metrics`: PSNR-Y, SSIM-Y and a sharpness ratio (metrics the reward need not contain);
- :func:`reward_metrics`: the reward's own metric callables and an absolute reward (ARF: Eq. 7 on each
  metric's fixed score range instead of the group's min-max, so values compare across calls; OARS's
  process-aware reward is absolute as it stands).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import kornia
import numpy as np
import torch

from reward_service.arf import arf_reward, range_normalise
from sr_data.embedded_images import EMBEDDED_HELDOUT, load_heldout
from sr_data.images import list_images, load_rgb
from sr_data.lr_synthesis import bicubic_degrade

if TYPE_CHECKING:
    from common.naosd import NAOSD
    from reward_service.worker import RewardWorker
    from sr_tools.iqa import Metric as IqaMetric

SCALE = 4  # NAOSD's upscaling factor: the LR holds size // 4 pixels a side, resized back to size


def heldout_photos(folder: str | Path = "") -> list[np.ndarray]:
    """``[H, W, 3]`` uint8 photos: the embedded held-out ones (``folder=""``) or every image in ``folder``."""
    if not folder:
        return [load_heldout(name) for name in sorted(EMBEDDED_HELDOUT)]
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"held-out folder {folder} holds no image")
    return [np.ascontiguousarray((load_rgb(p).tensor * 255).round().byte().permute(1, 2, 0).numpy()) for p in paths]


def heldout_crops(
    count: int, size: int, seed: int = 1234, folder: str | Path = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fixed crops alternating over the photos: HR and x4 bicubic LR (at HR size), uint8 ``[N, 3, s, s]``."""
    if size % SCALE:
        raise ValueError(f"held-out crop size must be a multiple of {SCALE}, got {size}")
    photos = [p for p in heldout_photos(folder) if min(p.shape[:2]) > size]
    if not photos:
        raise ValueError(f"no held-out photo{' in ' + str(folder) if folder else ''} has both sides > {size} px")
    rng = np.random.default_rng(seed)
    hr, lr = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)  # the benchmark's draw
        crop = np.ascontiguousarray(photo[y : y + size, x : x + size].transpose(2, 0, 1))
        hr.append(crop)
        lr.append(bicubic_degrade(crop, SCALE))
    return torch.from_numpy(np.stack(hr)), torch.from_numpy(np.stack(lr))


@torch.no_grad()
def sample_fixed_noise(model: NAOSD, lr: torch.Tensor, samples: int, seed: int, prompt: str = "") -> torch.Tensor:
    """``[N, S, 3, H, W]`` in [0, 1]; crop i's noise depends on (seed, i) only, so two models see the same noise."""
    emb = model.encode_prompts([prompt])
    device = model.alphas_cumprod.device
    out = []
    for i, image in enumerate(lr):
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
        x = image.to(device).float().div(127.5).sub(1).unsqueeze(0)
        out.append(model.sample_group(x, emb, group_size=samples, generator=generator)[0].add(1).div(2).cpu())
    return torch.stack(out)


def sharpness(images: torch.Tensor, hr: torch.Tensor) -> float:
    """Mean Sobel gradient magnitude of ``images`` over that of the HR (1 = as sharp as the HR)."""
    grad = lambda x: kornia.filters.sobel(kornia.color.rgb_to_grayscale(x)).mean()  # noqa: E731
    return float(grad(images) / grad(hr))


@functools.cache
def _iqa(name: str) -> IqaMetric:
    from sr_tools.iqa import create_metric

    return create_metric(name)


def image_metrics(images: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    """PSNR-Y, SSIM-Y, sharpness of ``images [N, S, 3, H, W]`` (or ``[N, 3, H, W]``) against ``hr [N, 3, H, W]``."""
    flat = images.reshape(-1, *images.shape[-3:]).float().clamp(0, 1)
    reps = flat.shape[0] // hr.shape[0]
    ref = hr.float().div(255).repeat_interleave(reps, dim=0)
    return {
        "psnr_y": float(_iqa("psnr").model(flat, ref).mean()),
        "ssim_y": float(_iqa("ssim").model(flat, ref).mean()),
        "sharpness": sharpness(flat, ref),
    }


def reward_metrics(
    worker: RewardWorker, images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor | None = None
) -> dict[str, float]:
    """The reward's metrics (raw means) and an absolute reward of ``images [N, S, 3, H, W]``.

    ARF: Eq. 7 on each metric's fixed score range.  OARS's process-aware reward is absolute already (its
    scores are mapped onto fixed scales, SPEC section 10), so it is the reward the worker computes; it also
    scores the LR input, so ``lr [N, 3, H, W]`` is required for ``reward.kind='process_aware'``.
    """
    result = worker.score_images(images, hr, lr)
    if worker.config.kind == "process_aware":
        absolute = result.reward
    else:
        is_fr = np.array([m.full_reference for m in worker.metrics])
        lower = np.array([m.lower_better for m in worker.metrics])
        ranges = np.array([m.score_range for m in worker.metrics], np.float64).reshape(-1, 2)
        absolute = arf_reward(range_normalise(result.metric_raw, ranges, lower), is_fr, result.rho_s, result.rho_d)
    out = {"reward": float(absolute.mean())}
    for j, name in enumerate(worker.metric_names):
        out[name] = float(result.metric_raw[:, j].mean())
    return out

"""Making the LR half of a training pair from an HR crop: bicubic, or the Real-ESRGAN pipeline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sr_data.degradation import DegradationConfig, degrade


def bicubic_degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """``[3, H, W]`` uint8 -> antialiased bicubic /scale, 8-bit, bicubic back to ``H x W``, 8-bit."""
    height, width = hr.shape[1:]
    assert height % scale == 0 and width % scale == 0, (hr.shape, scale)
    x = torch.from_numpy(hr).unsqueeze(0).float().div_(255.0)
    small = F.interpolate(
        x, size=(height // scale, width // scale), mode="bicubic", align_corners=False, antialias=True
    )
    small = _quantise(small).float().div_(255.0)
    up = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)
    return _quantise(up)[0].numpy()


def realesrgan_degrade(hr: np.ndarray, seed: int, config: DegradationConfig | None = None) -> np.ndarray:
    """``[3, H, W]`` uint8 -> ``sr_data.degradation.degrade`` seeded by ``seed``, at ``H x W``, 8-bit.

    ``config`` is a ``sr_data.degradation.DegradationConfig`` (None: its defaults, the GDPO set).
    """
    height, width = hr.shape[1:]
    x = torch.from_numpy(hr).unsqueeze(0).float().div_(255.0)
    generator = torch.Generator().manual_seed(seed)
    lr = degrade(x, generator, config if config is not None else DegradationConfig())
    if tuple(lr.shape[-2:]) != (height, width):  # a degrade that stops at the LR size
        lr = F.interpolate(lr.float(), size=(height, width), mode="bicubic", align_corners=False)
    return _quantise(lr)[0].numpy()


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8, clamped and rounded."""
    return x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)

"""SD 2.1-base's UNet architecture (about 865M parameters) with random weights, for benchmarks.

The values are those of ``stabilityai/stable-diffusion-2-1-base``'s
``unet/config.json``; no download is needed to build it.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD21_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
SD21_TEXT_DIM = 1024


def sd21_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD21_UNET_CONFIG)

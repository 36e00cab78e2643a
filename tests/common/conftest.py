from __future__ import annotations

import pytest
import torch

from common.naosd import NAOSD, ModelConfig, lora_parameters
from common.weights import build_naosd


def randomise_lora(model: NAOSD, seed: int = 0, std: float = 0.05) -> None:
    """Give the (zero-initialised) LoRA B matrices values, so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model.unet).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def tiny_model() -> NAOSD:
    return build_naosd(ModelConfig())


@pytest.fixture
def lr_image() -> torch.Tensor:
    """A [1, 3, 32, 32] LR image in [-1, 1] from a real photo."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()[100:164:2, 180:244:2].copy()).permute(2, 0, 1).float()
    return (photo / 127.5 - 1).unsqueeze(0)

"""Random section-5 loss inputs shared by the loss tests (``test_gdpo_loss.py``, ``test_objectives.py``)."""

from __future__ import annotations

import torch
from torch import Tensor

TEXT_DIM = 32  # the tiny text encoder's width


def loss_inputs(b: int, g: int, seed: int = 0) -> dict[str, Tensor]:
    """``latents`` and ``noise`` ``[B, G, 4, 4, 4]``, ``text_emb`` ``[B, 77, 32]``, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, g, 4, 4, 4, generator=gen)
    return {
        "latents": latents,
        "noise": torch.randn(latents.shape, generator=gen),
        "text_emb": torch.randn(b, 77, TEXT_DIM, generator=gen),
    }

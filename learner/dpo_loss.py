"""Diffusion-DPO, the paper's main baseline (SPEC section 10), as GDPO on each group's best and worst sample.

From each group the highest-reward sample is the winner and the lowest the
loser; the loss is SPEC section 5's with G = 2 and A = (+1, -1), so
``beta = omega``.  With ``loss.noise: per_group`` winner and loser share the
winner's loss noise, as Diffusion-DPO's own training code does; the default
gives each its own (SPEC section 5).  A group whose G rewards are all equal
picks the same sample twice: its logit is exactly 0 and it adds ``log 2`` and
no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.gdpo_loss import GDPOLossConfig, GDPOLossOutput, gdpo_loss


def winner_loser(rewards: Tensor) -> Tensor:
    """``[B, G]`` rewards -> ``[B, 2]`` indices (highest, lowest); ties go to the first such sample."""
    return torch.stack([rewards.argmax(dim=1), rewards.argmin(dim=1)], dim=1)


def dpo_loss(
    unet: torch.nn.Module,
    *,
    latents: Tensor,
    noise: Tensor,
    text_emb: Tensor,
    rewards: Tensor,
    alphas_cumprod: Tensor,
    config: GDPOLossConfig,
) -> GDPOLossOutput:
    """Diffusion-DPO on ``B`` groups (shapes as :func:`learner.gdpo_loss.gdpo_loss`, ``rewards [B, G]``).

    The output's ``policy_mse``/``reference_mse`` are ``[B, 2]``: winner, loser.
    """
    pairs = winner_loser(rewards)  # [B, 2]
    rows = torch.arange(rewards.shape[0], device=rewards.device)[:, None]
    advantages = torch.tensor([1.0, -1.0], device=rewards.device).expand(rewards.shape[0], 2)
    return gdpo_loss(
        unet,
        latents=latents[rows, pairs],
        noise=noise[rows, pairs],
        text_emb=text_emb,
        advantages=advantages,
        alphas_cumprod=alphas_cumprod,
        config=config,
    )

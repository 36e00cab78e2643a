"""OARS's negative-aware policy loss (SPEC section 10), DiffusionNFT-style, for the eps-prediction one-step model.

With the re-noised ``x_i`` of SPEC section 5 (``z0_i`` re-noised with a fresh
``e_i`` at ``t_noise``, both predictions at ``t_model``), the reference's
prediction ``e_old`` (adapter off, no grad) and the policy's ``e_theta``:

    e_pos = (1 - beta) e_old + beta e_theta       (implicit positive policy)
    e_neg = (1 + beta) e_old - beta e_theta       (implicit negative policy)
    r_i   = 0.5 + 0.5 * clip(A_i / A_max, -1, 1)  (optimality probability)
    loss  = mean_i [ r_i ||e_pos - e_i||^2 + (1 - r_i) ||e_neg - e_i||^2 ]

``||.||^2`` is the mean over (C, h, w), as ``L_pol`` in GDPO, and ``mean_i``
runs over every sample of every group.  A sample with ``r = 1`` pulls the
policy's noise estimate toward ``e_i``; one with ``r = 0`` pulls the mirrored
estimate ``e_neg`` toward it, which pushes ``e_theta`` away; ``r = 0.5``
(advantage 0) pulls both and the two halves cancel to first order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from common.naosd import adapter_disabled
from learner.gdpo_loss import check_timesteps, per_sample_mse, predict_noise, renoised


@dataclass(frozen=True, kw_only=True)
class NFTLossConfig:
    beta: float = 1.0  # mixing weight of the policy in the implicit positive/negative policies
    adv_max: float = 2.0  # A_max: about the largest |A| that Eq. 8 gives for G = 6
    t_noise: int = 250  # timestep at which z0 is re-noised (as GDPO)
    t_model: int = 100  # timestep the UNet is asked at (as GDPO)

    def __post_init__(self) -> None:
        if not self.beta > 0 or not self.adv_max > 0:
            raise ValueError(f"beta and adv_max must be positive, got {self.beta}, {self.adv_max}")
        check_timesteps(self.t_noise, self.t_model)


@dataclass(frozen=True)
class NFTLossOutput:
    loss: Tensor  # [] the mean over samples
    optimality: Tensor  # [B, G] r_i, detached
    policy_mse: Tensor  # [B, G] ||e_theta - e||^2, detached
    reference_mse: Tensor  # [B, G] ||e_old - e||^2


def optimality(advantages: Tensor, adv_max: float) -> Tensor:
    """``r = 0.5 + 0.5 * clip(A / A_max, -1, 1)``, elementwise."""
    return 0.5 + 0.5 * (advantages / adv_max).clamp(-1.0, 1.0)


def nft_loss(
    unet: torch.nn.Module,
    *,
    latents: Tensor,
    noise: Tensor,
    text_emb: Tensor,
    advantages: Tensor,
    alphas_cumprod: Tensor,
    config: NFTLossConfig,
) -> NFTLossOutput:
    """The negative-aware loss for ``B`` groups of ``G`` (shapes as :func:`learner.gdpo_loss.gdpo_loss`)."""
    b, g = advantages.shape
    assert latents.shape[:2] == (b, g), (latents.shape, advantages.shape)
    x, target, cond = renoised(latents, noise, text_emb, alphas_cumprod[config.t_noise])
    e_theta = predict_noise(unet, x, cond, config.t_model)
    with torch.no_grad(), adapter_disabled(unet):
        e_old = predict_noise(unet, x, cond, config.t_model)
    e_pos = (1 - config.beta) * e_old + config.beta * e_theta
    e_neg = (1 + config.beta) * e_old - config.beta * e_theta
    r = optimality(advantages, config.adv_max).flatten()  # [B*G]
    per_sample = r * per_sample_mse(e_pos, target) + (1 - r) * per_sample_mse(e_neg, target)
    return NFTLossOutput(
        loss=per_sample.mean(),
        optimality=r.unflatten(0, (b, g)).detach(),
        policy_mse=per_sample_mse(e_theta, target).unflatten(0, (b, g)).detach(),
        reference_mse=per_sample_mse(e_old, target).unflatten(0, (b, g)),
    )

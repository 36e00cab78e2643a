"""The GDPO loss of SPEC section 5 (paper Eq. 9), a pure function of tensors and the UNet.

For every group member i the learner re-noises the rollout's re-encoded SR
latent ``z0_i`` with a fresh ``e_i`` at ``t_noise`` (250), asks the policy and
the reference (the same UNet, adapter off) for the noise at ``t_model`` (100),
and weighs the per-sample improvement over the reference by the group-relative
advantage:

    inside = -0.5 * omega * sum_i A_i * (L_pol(i) - L_ref(i))
    loss   = mean over images of -logsigmoid(inside)

With G = 2 and A = (+1, -1) this is the Diffusion-DPO loss with beta = omega.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from common.naosd import adapter_disabled, q_sample


@dataclass(frozen=True, kw_only=True)
class GDPOLossConfig:
    omega: float = 5000.0
    t_noise: int = 250  # timestep at which z0 is re-noised
    t_model: int = 100  # timestep the UNets are asked at

    def __post_init__(self) -> None:
        if self.omega <= 0:
            raise ValueError(f"omega must be positive, got {self.omega}")
        for name in ("t_noise", "t_model"):
            if not 0 <= getattr(self, name) < 1000:
                raise ValueError(f"{name} must lie in [0, 1000), got {getattr(self, name)}")


@dataclass(frozen=True)
class GDPOLossOutput:
    loss: Tensor  # [] mean over images of -logsigmoid(inside)
    inside: Tensor  # [B] the logit, detached
    policy_mse: Tensor  # [B, G] L_pol, detached
    reference_mse: Tensor  # [B, G] L_ref


def gdpo_loss(
    unet: torch.nn.Module,
    *,
    latents: Tensor,
    noise: Tensor,
    text_emb: Tensor,
    advantages: Tensor,
    alphas_cumprod: Tensor,
    config: GDPOLossConfig,
) -> GDPOLossOutput:
    """GDPO loss for ``B`` images with ``G`` samples each.

    Args:
        unet: the policy UNet carrying the LoRA adapter; with the adapter
            disabled it is the reference.
        latents: ``[B, G, C, h, w]`` re-encoded SR latents ``z0`` (scaled).
        noise: ``[B, G, C, h, w]`` the fresh ``e_i``.
        text_emb: ``[B, L, D]`` one text embedding per image, shared by its group.
        advantages: ``[B, G]`` group-relative advantages (Eq. 8).
        alphas_cumprod: ``[T]`` the DDPM schedule's ``abar``.
    """
    b, g = advantages.shape
    assert latents.shape[:2] == (b, g) and noise.shape == latents.shape, (latents.shape, noise.shape)
    x = q_sample(latents, noise, alphas_cumprod[config.t_noise]).flatten(0, 1)  # [B*G, C, h, w]
    target = noise.flatten(0, 1)
    cond = text_emb.repeat_interleave(g, dim=0)  # [B*G, L, D]
    policy_mse = _per_sample_mse(unet, x, target, cond, config.t_model).unflatten(0, (b, g))
    with torch.no_grad(), adapter_disabled(unet):
        reference_mse = _per_sample_mse(unet, x, target, cond, config.t_model).unflatten(0, (b, g))
    inside = -0.5 * config.omega * (advantages * (policy_mse - reference_mse)).sum(dim=1)  # [B]
    loss = -F.logsigmoid(inside).mean()
    return GDPOLossOutput(
        loss=loss, inside=inside.detach(), policy_mse=policy_mse.detach(), reference_mse=reference_mse
    )


def _per_sample_mse(unet: torch.nn.Module, x: Tensor, target: Tensor, cond: Tensor, t: int) -> Tensor:
    """``mean over (C, h, w) of (unet(x, t, cond) - target)^2`` in float32, ``[N]``."""
    dtype = next(unet.parameters()).dtype
    pred = unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

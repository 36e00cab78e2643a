"""The GDPO loss of SPEC section 5 (paper Eq. 9), a pure function of tensors and the UNet.

For every group member i the learner re-noises the rollout's re-encoded SR
latent ``z0_i`` with a fresh ``e_i`` at ``t_noise`` (250), asks the policy and
the reference (the same UNet, adapter off) for the noise at ``t_model`` (100),
and weighs the per-sample improvement over the reference by the group-relative
advantage:

    inside = -0.5 * omega * sum_i A_i * (L_pol(i) - L_ref(i))
    loss   = mean over images of -logsigmoid(inside)

With G = 2 and A = (+1, -1) this is the Diffusion-DPO loss with beta = omega.

A step lowers the preferred members' errors; whether the *one-step* sampler then moves toward them depends
on the model: along directions NAOSD returns exactly (it amplifies a ``t_add``-noised input while asked at
``t_model < t_add``) the noise prediction falls as ``z0`` rises, and the sampler moves away
(``tests/learner/test_gdpo_sampler_direction.py``; measured in the README, "Does GDPO improve it?").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common.naosd import adapter_disabled, q_sample


@dataclass(frozen=True, kw_only=True)
class GDPOLossConfig:
    omega: float = 5000.0
    t_noise: int = 250  # timestep at which z0 is re-noised
    t_model: int = 100  # timestep the UNets are asked at
    # per_sample: SPEC 5's reference, a fresh e_i for every member.  per_group: one e for the whole group
    # (member 0's), as Diffusion-DPO's own code shares it between winner and loser.  Same expected logit,
    # far less gradient noise: the members' errors then differ only through their latents.
    noise: Literal["per_sample", "per_group"] = "per_sample"

    def __post_init__(self) -> None:
        if self.omega <= 0:
            raise ValueError(f"omega must be positive, got {self.omega}")
        if self.noise not in ("per_sample", "per_group"):
            raise ValueError(f"noise must be per_sample or per_group, got {self.noise!r}")
        check_timesteps(self.t_noise, self.t_model)


def check_timesteps(t_noise: int, t_model: int) -> None:
    """The re-noising and model timesteps of a section-5 loss must be DDPM steps."""
    for name, t in (("t_noise", t_noise), ("t_model", t_model)):
        if not 0 <= t < 1000:
            raise ValueError(f"{name} must lie in [0, 1000), got {t}")


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
        noise: ``[B, G, C, h, w]`` the fresh ``e_i`` (with ``config.noise == "per_group"`` only member 0's is used).
        text_emb: ``[B, L, D]`` one text embedding per image, shared by its group.
        advantages: ``[B, G]`` group-relative advantages (Eq. 8).
        alphas_cumprod: ``[T]`` the DDPM schedule's ``abar``.
    """
    b, g = advantages.shape
    assert latents.shape[:2] == (b, g), (latents.shape, advantages.shape)
    if config.noise == "per_group":
        noise = noise[:, :1].expand_as(noise)
    x, target, cond = renoised(latents, noise, text_emb, alphas_cumprod[config.t_noise])
    policy_mse = per_sample_mse(predict_noise(unet, x, cond, config.t_model), target).unflatten(0, (b, g))
    with torch.no_grad(), adapter_disabled(unet):
        reference_mse = per_sample_mse(predict_noise(unet, x, cond, config.t_model), target).unflatten(0, (b, g))
    inside = -0.5 * config.omega * (advantages * (policy_mse - reference_mse)).sum(dim=1)  # [B]
    loss = -F.logsigmoid(inside).mean()
    return GDPOLossOutput(
        loss=loss, inside=inside.detach(), policy_mse=policy_mse.detach(), reference_mse=reference_mse
    )


def renoised(latents: Tensor, noise: Tensor, text_emb: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Section 5's inputs, flattened over the group: ``x_i`` ``[B*G, C, h, w]``, the target ``e_i`` (float32)
    and the text embedding repeated per member ``[B*G, L, D]``, from ``[B, G, ...]`` latents and noise."""
    assert noise.shape == latents.shape, (latents.shape, noise.shape)
    g = latents.shape[1]
    x = q_sample(latents, noise, abar_t).flatten(0, 1)
    return x, noise.flatten(0, 1).float(), text_emb.repeat_interleave(g, dim=0)


def predict_noise(unet: torch.nn.Module, x: Tensor, cond: Tensor, t: int) -> Tensor:
    """``unet(x, t, cond)`` in the UNet's dtype, returned in float32."""
    dtype = next(unet.parameters()).dtype
    return unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over (C, h, w): ``[N]``."""
    return (pred - target).pow(2).mean(dim=(1, 2, 3))

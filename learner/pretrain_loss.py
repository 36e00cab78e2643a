"""The NAOSD pre-training loss of SPEC section 9 (paper Eq. 5), pure functions of tensors and callables.

Generator loss per batch (everything NAOSD's one-step forward produced):

    lambda_l2    * mse(sr, hr)                    (in [-1, 1]; ``pixel_loss='l1'`` is the paper's wording)
    lambda_lpips * LPIPS_vgg(sr, hr)              (``lpips`` is any callable ``(sr, hr) -> [B]`` in [-1, 1])
    lambda_vsd   * VSD(z_sr)                      (variational score distillation in latent space)
    lambda_recon * mse(decode(encode(hr)), hr)    (from-scratch models only: SD's VAE comes pretrained)
    lambda_kl    * KL(encoder posterior || N(0, I))   (from-scratch models only)

VSD, for each sample with its own ``t ~ U[t_min, t_max)`` and noise ``n``:
``z_t = q_sample(z_sr, n, t)``; under no grad the fake score network and the
real one (classifier-free guidance, the negative prompt as the unconditional
branch) each predict eps, turned into x0 estimates; with
``w = mean |z_sr - x0_real|`` and ``grad = (x0_fake - x0_real) / w`` the loss is
``mse(z_sr, stopgrad(z_sr - grad))``, whose gradient w.r.t. ``z_sr`` is
``2 grad / numel``.

The fake network learns, in the same iteration and with its own optimiser
group, the plain diffusion loss on the detached ``z_sr``
(:func:`fake_score_loss`).  Score networks enter as ``EpsFn`` callables
``(z_t, t, text_emb) -> eps``, so these functions never need to know that the
real and the fake network are one UNet with different adapters switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from common.naosd import q_sample

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z_t [B,C,h,w], t [B] long, text_emb [B,L,D]) -> eps
ImageLoss = Callable[[Tensor, Tensor], Tensor]  # (sr, hr) in [-1, 1], [B, 3, H, W] -> [B]


@dataclass(frozen=True, kw_only=True)
class PretrainLossConfig:
    """Weights and constants of the pre-training loss (defaults: the reference script)."""

    lambda_l2: float = 1.0
    pixel_loss: Literal["mse", "l1"] = "mse"  # the reference computes MSE; the paper writes L1
    lambda_lpips: float = 2.0
    lambda_vsd: float = 1.0
    cfg_scale: float = 7.5  # classifier-free guidance of the real score
    vsd_t_min: int = 20
    vsd_t_max: int = 980  # exclusive
    lambda_recon: float = 0.0  # VAE autoencoding of the HR: only for a model trained from scratch
    lambda_kl: float = 0.0  # encoder posterior KL: only for a model trained from scratch

    def __post_init__(self) -> None:
        for name in ("lambda_l2", "lambda_lpips", "lambda_vsd", "cfg_scale", "lambda_recon", "lambda_kl"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.pixel_loss not in ("mse", "l1"):
            raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {self.pixel_loss!r}")
        if not 0 <= self.vsd_t_min < self.vsd_t_max <= 1000:
            raise ValueError(f"need 0 <= vsd_t_min < vsd_t_max <= 1000, got {self.vsd_t_min}, {self.vsd_t_max}")


@dataclass(frozen=True)
class GeneratorLoss:
    total: Tensor  # [] the weighted sum, differentiable
    terms: dict[str, float]  # unweighted value of every active term, for logs and metrics


def pixel_loss(sr: Tensor, hr: Tensor, kind: Literal["mse", "l1"]) -> Tensor:
    """Mean over every element; ``sr``/``hr`` in [-1, 1]."""
    return F.mse_loss(sr.float(), hr.float()) if kind == "mse" else F.l1_loss(sr.float(), hr.float())


def x0_from_eps(z_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """DDPM's clean-sample estimate ``(z_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
    return (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def vsd_loss(
    z_sr: Tensor,
    *,
    noise: Tensor,
    timesteps: Tensor,
    text_emb: Tensor,
    negative_emb: Tensor,
    real: EpsFn,
    fake: EpsFn,
    alphas_cumprod: Tensor,
    cfg_scale: float,
) -> Tensor:
    """VSD of SPEC section 9 for ``z_sr [B, C, h, w]``; ``timesteps [B]``, ``noise`` like ``z_sr``."""
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
    with torch.no_grad():
        z_t = q_sample(z_sr.detach().float(), noise, abar)
        x0_fake = x0_from_eps(z_t, fake(z_t, timesteps, text_emb).float(), abar)
        eps_uncond, eps_text = real(
            torch.cat([z_t, z_t]), torch.cat([timesteps, timesteps]), torch.cat([negative_emb, text_emb])
        ).float().chunk(2)
        x0_real = x0_from_eps(z_t, eps_uncond + cfg_scale * (eps_text - eps_uncond), abar)
        weight = (z_sr.detach().float() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = (x0_fake - x0_real) / weight
    return F.mse_loss(z_sr.float(), (z_sr.float() - grad).detach())


def fake_score_loss(
    z_sr: Tensor, *, noise: Tensor, timesteps: Tensor, text_emb: Tensor, fake: EpsFn, alphas_cumprod: Tensor
) -> Tensor:
    """The fake score network's diffusion loss on the detached ``z_sr``: ``mse(fake(z_t', t'), n')``."""
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
    z_t = q_sample(z_sr.detach().float(), noise, abar)
    return F.mse_loss(fake(z_t, timesteps, text_emb.detach()).float(), noise.float())


def generator_loss(
    config: PretrainLossConfig,
    *,
    sr: Tensor,
    hr: Tensor,
    lpips: ImageLoss | None = None,
    vsd: Callable[[], Tensor] | None = None,
    reconstruction: Tensor | None = None,
    kl: Tensor | None = None,
) -> GeneratorLoss:
    """Weighted sum of the active terms; a term with a positive lambda must be given (never dropped)."""
    terms: dict[str, Tensor] = {"pixel": pixel_loss(sr, hr, config.pixel_loss)}
    weights = {"pixel": config.lambda_l2}
    optional = {
        "lpips": (config.lambda_lpips, None if lpips is None else (lambda: lpips(sr.float(), hr.float()).mean())),
        "vsd": (config.lambda_vsd, vsd),
        "recon": (config.lambda_recon, None if reconstruction is None else (lambda: reconstruction)),
        "kl": (config.lambda_kl, None if kl is None else (lambda: kl)),
    }
    for name, (weight, compute) in optional.items():
        if weight == 0:
            continue
        if compute is None:
            raise ValueError(f"lambda_{name if name != 'pixel' else 'l2'}={weight} but no {name} term was given")
        terms[name], weights[name] = compute(), weight
    total = sum(weights[name] * value for name, value in terms.items())
    return GeneratorLoss(total=total, terms={name: float(value.detach()) for name, value in terms.items()})

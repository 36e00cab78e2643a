"""What the reward-feedback objective needs beyond the UNet: the VAE, a differentiable NR metric, Gram features.

:func:`build_reward_feedback` builds them once per learner rank;
:func:`reward_feedback_objective` runs NAOSD's one-step forward (SPEC section 2)
with gradients through the UNet LoRA and the frozen VAE decoder, for the policy
and (no grad, adapter off) for the reference, and hands both SR images to
:func:`learner.reward_feedback.reward_feedback_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kornia
import torch
from torch import Tensor, nn

from common.naosd import ModelConfig, adapter_disabled, q_sample
from common.weights import build_vae
from learner.reward_feedback import RewardFeedbackConfig, RewardFeedbackOutput, reward_feedback_loss

SOBEL_SHARPNESS = "sobel_sharpness"  # the tiny config's stand-in metric (not pyiqa)
VGG16_TAPS = (3, 8, 15)  # relu1_2, relu2_2, relu3_3 of torchvision's vgg16().features
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RewardFeedbackModules:
    vae: nn.Module  # frozen; gradients flow through its decoder
    reward: Callable[[Tensor], Tensor]  # [B, 3, H, W] in [0, 1] -> [B] in about [0, 1], differentiable
    features: Callable[[Tensor], list[Tensor]]  # [B, 3, H, W] in [0, 1] -> feature maps
    t_add: int
    t_diff: int


def build_reward_feedback(
    model: ModelConfig, config: RewardFeedbackConfig, device: torch.device
) -> RewardFeedbackModules:
    """The VAE of ``model``, the metric and the feature network, frozen, on ``device``."""
    return RewardFeedbackModules(
        vae=build_vae(model).to(device, torch.float32),
        reward=build_reward_metric(config, device),
        features=build_features(config).to(device),
        t_add=model.t_add,
        t_diff=model.t_diff,
    )


def sobel_sharpness(images: Tensor) -> Tensor:
    """Mean magnitude of kornia's normalised Sobel gradient of the gray image, ``[B]`` (0 = flat)."""
    return kornia.filters.sobel(kornia.color.rgb_to_grayscale(images)).mean(dim=(1, 2, 3))


def build_reward_metric(config: RewardFeedbackConfig, device: torch.device) -> Callable[[Tensor], Tensor]:
    """``config.metric`` as a differentiable ``[B]`` reward, 1 = the best of its pyiqa score range."""
    if config.metric == SOBEL_SHARPNESS:
        return sobel_sharpness
    from reward_service.config import RewardConfig
    from reward_service.metrics_iqa import build_pyiqa_metric

    # The reward service's offline loader (local weights only); its inference-mode wrapper is bypassed by
    # calling the pyiqa architecture itself, which is what pyiqa's as_loss mode calls too.
    reward_config = RewardConfig(
        fr_metrics=(), nr_metrics=(config.metric,), weighting="nr_only", weights_dir=config.weights_dir,
        device=str(device),
    )  # fmt: skip
    metric = build_pyiqa_metric(config.metric, reward_config)
    if metric.full_reference:
        raise ValueError(f"learner.reward_feedback.metric {config.metric!r} is full-reference; name a no-reference one")
    lo, hi = metric.score_range
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"metric {config.metric!r} has no finite score range to map onto [0, 1]")
    net = metric.model.net.requires_grad_(False).eval()
    flip = metric.lower_better

    def reward(images: Tensor) -> Tensor:
        unit = (net(images.float()).reshape(-1) - lo) / (hi - lo)
        return 1.0 - unit if flip else unit

    return reward


class TinyConvFeatures(nn.Module):
    """Three fixed random conv layers (ReLU after each): texture statistics without any weights file.

    Gram matrices of random conv features are a known texture descriptor (Ustyuzhaninov et al.,
    ICLR 2017); this is the tiny config's stand-in for VGG, not what the paper uses.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
        ])  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.layers:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
                conv.bias.zero_()
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> list[Tensor]:
        out, x = [], images
        for conv in self.layers:
            x = torch.relu(conv(x))
            out.append(x)
        return out


class VGG16Features(nn.Module):
    """torchvision's VGG16 up to relu3_3, ImageNet-normalised input; taps relu1_2, relu2_2, relu3_3."""

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        import torchvision

        path = Path(weights_path)
        if not weights_path or not path.is_file():
            raise ValueError(
                f"learner.reward_feedback.features=vgg16 needs torchvision's VGG16 ImageNet weights "
                f"(vgg16-397923af.pth) at learner.reward_feedback.vgg_weights_path; {weights_path or 'not set'} "
                "is not a file (never downloaded)"
            )
        self.body = torchvision.models.vgg16(weights=None).features[: VGG16_TAPS[-1] + 1]
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Only the layers up to relu3_3 are used; strict over those, so a wrong file is an error.
        used = {k.removeprefix("features."): v for k, v in state.items()
                if k.startswith("features.") and int(k.split(".")[1]) <= VGG16_TAPS[-1]}  # fmt: skip
        self.body.load_state_dict(used, strict=True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> list[Tensor]:
        out, x = [], (images - self.mean) / self.std
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out


def build_features(config: RewardFeedbackConfig) -> nn.Module:
    if config.features == "tiny_conv":
        return TinyConvFeatures(config.features_seed)
    return VGG16Features(config.vgg_weights_path)


def one_step_sr(
    unet: nn.Module, vae: nn.Module, *, lr: Tensor, text_emb: Tensor, noise_posterior: Tensor, noise_add: Tensor,
    alphas_cumprod: Tensor, t_add: int, t_diff: int,
) -> Tensor:  # fmt: skip
    """SPEC section 2 with gradients to the UNet: LR ``[B, 3, H, W]`` in [-1, 1] -> SR in [-1, 1] (clamped).

    The same steps as :meth:`common.naosd.NAOSD.one_step`, with the posterior and the injected noise
    given (``[B, 4, h, w]`` each) instead of drawn, and the encoder outside the graph (frozen, and the
    LR does not depend on the policy).
    """
    scale = float(vae.config.scaling_factor)
    with torch.no_grad():
        posterior = vae.encode(lr.float()).latent_dist
        z_lr = (posterior.mean + posterior.std * noise_posterior) * scale
    z_noisy = q_sample(z_lr, noise_add, alphas_cumprod[t_add])
    dtype = next(unet.parameters()).dtype
    eps_hat = unet(z_noisy.to(dtype), t_diff, encoder_hidden_states=text_emb.to(dtype)).sample.float()
    abar = alphas_cumprod[t_diff]
    z_sr = (z_noisy - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    return vae.decode(z_sr / scale).sample.clamp(-1, 1)


def reward_feedback_objective(
    unet: nn.Module,
    modules: RewardFeedbackModules,
    *,
    lr: Tensor,
    hr: Tensor,
    text_emb: Tensor,
    noise: Tensor,
    alphas_cumprod: Tensor,
    config: RewardFeedbackConfig,
) -> RewardFeedbackOutput:
    """The RFSR loss on ``B`` LR/HR pairs (uint8 ``[B, 3, H, W]``); ``noise [B, G>=2, 4, h, w]``.

    The loss noise of the record's group gives the two draws one-step sampling needs: ``noise[:, 0]``
    for the VAE posterior sample, ``noise[:, 1]`` for the noise injected at ``t_add``.
    """
    assert noise.shape[1] >= 2, noise.shape
    kwargs = {
        "lr": lr.float() / 127.5 - 1, "text_emb": text_emb, "noise_posterior": noise[:, 0], "noise_add": noise[:, 1],
        "alphas_cumprod": alphas_cumprod, "t_add": modules.t_add, "t_diff": modules.t_diff,
    }  # fmt: skip
    sr = one_step_sr(unet, modules.vae, **kwargs)
    with torch.no_grad(), adapter_disabled(unet):
        sr_ref = one_step_sr(unet, modules.vae, **kwargs)
    unit = {"reward": modules.reward, "features": modules.features, "config": config}
    return reward_feedback_loss((sr + 1) / 2, (sr_ref + 1) / 2, hr.float() / 255, **unit)

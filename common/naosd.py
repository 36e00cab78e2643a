"""NAOSD, the noise-aware one-step SR model (SPEC sections 1-2), with its GDPO LoRA.

Policy and reference are one UNet: the reference is the same module with the
``gdpo`` adapter disabled (SPEC section 5), so the learner holds one copy of
the 865M-parameter SD UNet, not two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

ADAPTER_NAME = "gdpo"

# SPEC section 2: every UNet weight whose name contains one of these (not bias, not norm).
UNET_LORA_PATTERNS = (
    "to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which weights to load and how NAOSD samples (SPEC section 2)."""

    # tiny: the trained tiny default (common/tiny_model); tiny_random: same architecture, random weights;
    # pretrained: SD 2.1-base from sd_path, NAOSD weights from naosd_path.
    source: Literal["tiny", "tiny_random", "pretrained"] = "tiny"
    sd_path: str = ""  # local SD 2.1-base diffusers folder (source=pretrained)
    # merged NAOSD/GDPO-SR folder (unet/, vae/) or a NAOSD training checkpoint file; with source=tiny a
    # folder of the tiny architecture (what `learner.pretrain --config tiny_pretrain` writes) replacing
    # the committed weights
    naosd_path: str = ""
    tiny_seed: int = 0
    t_add: int = 250  # noise-injection timestep (150 faithful .. 350 generative)
    t_diff: int = 100  # the UNet's timestep for the one-step denoise
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = UNET_LORA_PATTERNS
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        for name in ("t_add", "t_diff"):
            if not 0 <= getattr(self, name) < 1000:
                raise ValueError(f"{name} must lie in [0, 1000), got {getattr(self, name)}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.source == "pretrained" and not self.sd_path:
            raise ValueError("sd_path (a local SD 2.1-base diffusers folder) is required for source=pretrained")
        if self.source != "pretrained" and self.sd_path:
            raise ValueError(f"sd_path is only read with source=pretrained, not source={self.source}")
        if self.source == "tiny_random" and self.naosd_path:
            raise ValueError("naosd_path is not read with source=tiny_random (random weights); use source=tiny")


def lora_target_modules(unet: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names whose weight matches SPEC section 2's rule (name contains a pattern; no bias/norm)."""
    names = []
    for name, _ in unet.named_parameters():
        if not name.endswith(".weight") or "bias" in name or "norm" in name:
            continue
        if any(p in name for p in patterns):
            names.append(name.removesuffix(".weight"))
    return sorted(set(names))


def add_gdpo_adapter(unet: UNet2DConditionModel, *, rank: int, alpha: float, patterns: Sequence[str]) -> None:
    """Freeze the UNet and attach the trainable ``gdpo`` LoRA adapter (peft, gaussian init)."""
    targets = lora_target_modules(unet, patterns)
    if not targets:
        raise ValueError(f"no UNet module matches the LoRA patterns {list(patterns)}")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=targets
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, param in unet.named_parameters():
        param.requires_grad_(f".{ADAPTER_NAME}." in name)


def lora_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters, by name."""
    return {n: p for n, p in unet.named_parameters() if f".{ADAPTER_NAME}." in n}


@contextmanager
def adapter_disabled(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """Run the UNet as the frozen reference: the same weights with the LoRA path switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def q_sample(z: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """DDPM forward noising ``sqrt(abar) z + sqrt(1 - abar) eps``."""
    return abar_t.sqrt() * z + (1 - abar_t).sqrt() * eps


@dataclass(frozen=True)
class OneStepOutput:
    sr: Tensor  # [B, 3, H, W] in [-1, 1], clamped
    z_sr: Tensor  # [B, 4, h, w] the one-step latent estimate (scaled), float32
    posterior: DiagonalGaussianDistribution  # the VAE encoder's posterior of the LR


class NAOSD(nn.Module):
    """The one-step SR model of SPEC section 2; ``unet`` carries the GDPO adapter."""

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
        t_add: int,
        t_diff: int,
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.t_add, self.t_diff = t_add, t_diff
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone(), persistent=False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def abar(self, t: int) -> Tensor:
        return self.alphas_cumprod[t]

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """CLIP text embeddings ``[B, 77, D]`` (padding to max length)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.alphas_cumprod.device))[0]

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, 4, H/8, W/8]``: a posterior sample."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1], clamped."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.clamp(-1, 1)

    def predict_noise(self, z_t: Tensor, t: int, text_emb: Tensor) -> Tensor:
        return self.unet(z_t.to(self.unet.dtype), t, encoder_hidden_states=text_emb.to(self.unet.dtype)).sample

    def denoise(self, z_noisy: Tensor, text_emb: Tensor) -> Tensor:
        """One-step estimate ``z_sr = (z~ - sqrt(1 - abar) eps_hat) / sqrt(abar)`` at ``t_diff``."""
        abar = self.abar(self.t_diff)
        eps_hat = self.predict_noise(z_noisy, self.t_diff, text_emb)
        return (z_noisy - (1 - abar).sqrt() * eps_hat) / abar.sqrt()

    def noise(self, shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
        return randn_tensor(tuple(shape), generator=generator, device=self.alphas_cumprod.device)

    def one_step(self, lr: Tensor, text_emb: Tensor, generator: torch.Generator | None = None) -> OneStepOutput:
        """The differentiable forward of pre-training: one sample per image, with its latents and posterior."""
        posterior = self.vae.encode(lr.to(self.vae.dtype)).latent_dist
        z_lr = (posterior.sample(generator=generator) * self.scaling_factor).float()
        sr, z_sr = self._from_lr_latents(z_lr, text_emb, generator)
        return OneStepOutput(sr=sr, z_sr=z_sr, posterior=posterior)

    def forward(self, lr: Tensor, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One SR sample per image: LR ``[B, 3, H, W]`` (already upscaled) -> SR ``[B, 3, H, W]``."""
        return self.sample_group(lr, text_emb, group_size=1, generator=generator).squeeze(1)

    def sample_group(
        self, lr: Tensor, text_emb: Tensor, *, group_size: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """G samples per image ``[B, G, 3, H, W]``; ``z_lr`` is sampled once per image (SPEC section 3)."""
        b = lr.shape[0]
        z_lr = self.encode(lr, generator).float().repeat_interleave(group_size, dim=0)  # [B*G, 4, h, w]
        sr, _ = self._from_lr_latents(z_lr, text_emb.repeat_interleave(group_size, dim=0), generator)
        return sr.unflatten(0, (b, group_size))

    def _from_lr_latents(
        self, z_lr: Tensor, text_emb: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Steps 2-5 of SPEC section 2 for float32 ``z_lr [N, 4, h, w]``: SR ``[N, 3, H, W]`` and ``z_sr``."""
        eps = self.noise(z_lr.shape, generator)  # one fresh noise per sample
        z_noisy = q_sample(z_lr, eps, self.abar(self.t_add))
        z_sr = self.denoise(z_noisy, text_emb).float()
        return self.decode(z_sr).float(), z_sr

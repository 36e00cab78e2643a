"""The model NAOSD pre-training optimises (SPEC section 9): what trains, and three score networks in one UNet.

Two modes:

- **LoRA** (a pretrained SD 2.1-base): the ``naosd`` LoRA on the UNet
  (``unet_lora_rank``; the paper says 4, the reference script 8) and on the VAE
  encoder (``vae_lora_rank``) train; the VAE decoder and the text encoder stay
  frozen.  VSD's *real* score is the same UNet with every adapter off, its
  *fake* score the same UNet with the ``fake`` LoRA (rank 8) on: one UNet in
  memory, as in SPEC section 5.
- **From scratch** (``train_base``, the tiny model only): every UNet and VAE
  weight trains.  With no pretrained diffusion prior there is no real score,
  so VSD is refused; a VAE reconstruction and a KL term take the place of the
  pretrained autoencoder.

peft's ``set_adapter``/``disable_adapters`` flip ``requires_grad`` of the
adapter weights as a side effect; every switch here restores it, so the
parameters that train are always exactly :meth:`PretrainNAOSD.trainable_groups`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from torch import Tensor, nn

from common.adapter_folder import write_adapter_folder
from common.adapter_sync import digest
from common.naosd import NAOSD, UNET_LORA_PATTERNS, ModelConfig, lora_target_modules
from common.weights import build_base
from learner.pretrain_loss import (
    GeneratorLoss,
    ImageLoss,
    PretrainLossConfig,
    fake_score_loss,
    generator_loss,
    vsd_loss,
)

NAOSD_ADAPTER = "naosd"  # the NAOSD LoRA (UNet and VAE encoder)
FAKE_ADAPTER = "fake"  # the fake score network's LoRA on the UNet (VSD)
# The reference's VAE-encoder LoRA targets (its encoder has no attention projections but the mid block's).
VAE_LORA_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v",
                     "to_out.0")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PretrainModelConfig:
    train_base: bool = False  # from scratch: every UNet and VAE weight trains (no pretrained base)
    unet_lora_rank: int = 4  # the paper's text; the reference script defaults to 8
    vae_lora_rank: int = 4
    fake_lora_rank: int = 8
    lora_alpha: float = 8.0  # peft's default, as the reference leaves it

    def __post_init__(self) -> None:
        for name in ("unet_lora_rank", "vae_lora_rank", "fake_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StepLosses:
    generator: GeneratorLoss
    fake: Tensor | None  # [] the fake score network's diffusion loss (VSD only)


class PretrainNAOSD(nn.Module):
    """NAOSD with its pre-training adapters; ``forward`` returns the step's losses."""

    def __init__(self, model_config: ModelConfig, config: PretrainModelConfig, loss: PretrainLossConfig) -> None:
        super().__init__()
        if config.train_base and loss.lambda_vsd:
            raise ValueError("lambda_vsd > 0 needs a pretrained base as the real score; train_base has none "
                             "(set pretrain.loss.lambda_vsd=0 for a model trained from scratch)")  # fmt: skip
        if not config.train_base and model_config.source != "pretrained":
            raise ValueError(f"LoRA pre-training needs model.source=pretrained (SD 2.1-base), got "
                             f"{model_config.source}; the tiny model trains from scratch (train_base)")  # fmt: skip
        self.config, self.loss_config = config, loss
        unet, vae, text_encoder, tokenizer, scheduler = build_base(model_config)
        text_encoder.requires_grad_(False).eval()
        self.vsd = loss.lambda_vsd > 0
        if config.train_base:
            unet.requires_grad_(True)
            vae.requires_grad_(True)
        else:
            unet.requires_grad_(False)
            vae.requires_grad_(False)
            unet_targets = lora_target_modules(unet, UNET_LORA_PATTERNS)  # before any adapter adds modules
            _add_lora(unet, NAOSD_ADAPTER, unet_targets, config.unet_lora_rank, config.lora_alpha)
            encoder = [f"encoder.{n}" for n in lora_target_modules(vae.encoder, VAE_LORA_PATTERNS)]
            _add_lora(vae, NAOSD_ADAPTER, encoder, config.vae_lora_rank, config.lora_alpha)
            if self.vsd:
                _add_lora(unet, FAKE_ADAPTER, unet_targets, config.fake_lora_rank, config.lora_alpha)
                unet.set_adapter(NAOSD_ADAPTER)
        self.naosd = NAOSD(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            t_add=model_config.t_add, t_diff=model_config.t_diff,
        )  # fmt: skip
        self._groups = self._find_groups()
        self._restore_requires_grad()

    # --- parameters ------------------------------------------------------------------------------

    def _find_groups(self) -> dict[str, list[nn.Parameter]]:
        if self.config.train_base:
            generator = [*self.naosd.unet.parameters(), *self.naosd.vae.parameters()]
            return {"generator": generator, "fake": []}
        named = [*self.naosd.unet.named_parameters(), *self.naosd.vae.named_parameters()]
        return {
            "generator": [p for n, p in named if f".{NAOSD_ADAPTER}." in n],
            "fake": [p for n, p in self.naosd.unet.named_parameters() if f".{FAKE_ADAPTER}." in n],
        }

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """``generator`` (NAOSD) and ``fake`` (the VSD fake score; empty without VSD) parameters."""
        return self._groups

    def _restore_requires_grad(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for group in self._groups.values():
            for p in group:
                p.requires_grad_(True)

    @contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        """The UNet with only adapter ``name`` on (None: every adapter off, the real score)."""
        unet = self.naosd.unet
        if name is None:
            unet.disable_adapters()
        else:
            unet.set_adapter(name)
        try:
            yield
        finally:
            if name is None:
                unet.enable_adapters()
            unet.set_adapter(NAOSD_ADAPTER)
            self._restore_requires_grad()

    def _eps(self, adapter: str | None):
        def predict(z_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
            with self._adapter(adapter):
                return self.naosd.predict_noise(z_t, t, text_emb)

        return predict

    # --- the step --------------------------------------------------------------------------------

    def forward(
        self, lr: Tensor, hr: Tensor, text_emb: Tensor, negative_emb: Tensor, *, generator: torch.Generator,
        lpips: ImageLoss | None,
    ) -> StepLosses:  # fmt: skip
        """Losses of one batch: LR/HR ``[B, 3, H, W]`` in [-1, 1], text ``[B, L, D]``; draws from ``generator``."""
        cfg, model = self.loss_config, self.naosd
        out = model.one_step(lr, text_emb, generator)
        b, device = lr.shape[0], lr.device
        vsd = fake = None
        if self.vsd:
            t = torch.randint(cfg.vsd_t_min, cfg.vsd_t_max, (b,), generator=generator, device=device)
            noise = model.noise(out.z_sr.shape, generator)

            def vsd() -> Tensor:
                return vsd_loss(
                    out.z_sr, noise=noise, timesteps=t, text_emb=text_emb, negative_emb=negative_emb,
                    real=self._eps(None), fake=self._eps(FAKE_ADAPTER), alphas_cumprod=model.alphas_cumprod,
                    cfg_scale=cfg.cfg_scale,
                )  # fmt: skip

        reconstruction = kl = None
        if cfg.lambda_recon:
            hr_latent = model.encode(hr, generator)
            decoded = model.vae.decode(hr_latent / model.scaling_factor).sample.float()
            reconstruction = torch.nn.functional.mse_loss(decoded, hr.float())
        if cfg.lambda_kl:
            kl = out.posterior.kl().mean() / out.z_sr[0].numel()  # per latent element
        losses = generator_loss(cfg, sr=out.sr, hr=hr, lpips=lpips, vsd=vsd, reconstruction=reconstruction, kl=kl)
        if self.vsd:
            t2 = torch.randint(0, 1000, (b,), generator=generator, device=device)
            fake = fake_score_loss(out.z_sr, noise=model.noise(out.z_sr.shape, generator), timesteps=t2,
                                   text_emb=text_emb, fake=self._eps(FAKE_ADAPTER),
                                   alphas_cumprod=model.alphas_cumprod)  # fmt: skip
        return StepLosses(generator=losses, fake=fake)

    # --- what GDPO loads -------------------------------------------------------------------------

    def export(self, directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``unet/`` and ``vae/`` (LoRA merged, weights in ``dtype``): a folder ``model.naosd_path`` loads.

        In LoRA mode the NAOSD adapters are also written as peft adapter folders
        (:mod:`common.adapter_folder`) in ``adapters/unet`` and ``adapters/vae_encoder``;
        the fake score network is not part of the model.
        """
        directory = Path(directory)
        unet, vae = copy.deepcopy(self.naosd.unet), copy.deepcopy(self.naosd.vae)
        if not self.config.train_base:
            adapters = directory / "adapters"
            adapters.mkdir(parents=True, exist_ok=True)
            for name, module in (("unet", unet), ("vae_encoder", vae)):
                state = {n: p.detach().float().cpu().contiguous() for n, p in module.named_parameters()
                         if f".{NAOSD_ADAPTER}." in n}  # fmt: skip
                write_adapter_folder(adapters / name, state, module.peft_config[NAOSD_ADAPTER], adapter=NAOSD_ADAPTER,
                                     base_model=None, metadata={"adapter_name": NAOSD_ADAPTER, "digest": digest(state)},
                                     diffusers_unet=name == "unet")  # fmt: skip
            if self.vsd:
                unet.delete_adapters(FAKE_ADAPTER)
            for module in (unet, vae):
                module.fuse_lora(adapter_names=[NAOSD_ADAPTER])
                module.unload_lora()
        for module in (unet, vae):
            module.requires_grad_(False)
            if dtype != torch.float32:  # a no-op cast still makes diffusers warn about casting with to()
                module.to(dtype)
        unet.save_pretrained(str(directory / "unet"), safe_serialization=True)
        vae.save_pretrained(str(directory / "vae"), safe_serialization=True)
        return directory


def _add_lora(module: nn.Module, name: str, targets: list[str], rank: int, alpha: float) -> None:
    if not targets:
        raise ValueError(f"no module of {type(module).__name__} matches the LoRA patterns")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights="gaussian",
                        target_modules=targets)  # fmt: skip
    module.add_adapter(config, adapter_name=name)

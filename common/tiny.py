"""The embedded default model: SD 2.1-base's architecture at toy width (SPEC sections 8 and 11).

Same block types as SD 2.1-base (cross-attention down/up blocks with linear
projections, a plain down/up block at the bottom, a cross-attention mid block;
a KL VAE with down/up encoder blocks and a mid-block attention), 4 latent
channels and the real CLIP tokenizer, but about a million parameters.  The VAE
downsamples **4x**, not SD's 8x: at 8x, four latent channels hold a third of
the numbers of the x4 LR image, and a VAE this small could not reconstruct the
LR, let alone beat bicubic (SPEC section 11 allows 4x).

Two sources share this architecture:

- ``source=tiny``: the *trained* default, ``common/tiny_model/`` (``unet/`` and
  ``vae/``, safetensors), written by ``python -m learner.pretrain --config
  tiny_pretrain`` (see the README); the text encoder is the seeded random tiny
  CLIP below (the prompt is empty, so its embedding is a constant);
- ``source=tiny_random``: the same architecture, randomly initialised, for tests
  that need no trained weights and for pre-training from scratch.

Neither is the paper's model: :func:`model_notice` says so wherever one runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from common.clip_vocab import MAX_LENGTH, VOCAB_SIZE

TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny_model"  # the committed trained weights
TINY_MODEL_COMMAND = "python -m learner.pretrain --config tiny_pretrain"

_NOTICES = {
    "tiny": (
        "NOTE: model.source=tiny is a ~1M-parameter SD-architecture NAOSD trained from scratch on CPU on a handful "
        "of photos shipped with scikit-image: real super-resolution at toy scale, NOT the paper's SD 2.1-based "
        "NAOSD/GDPO-SR, so its images and rewards are not the paper's."
    ),
    "tiny_random": (
        "NOTE: model.source=tiny_random is the tiny SD-architecture model with random weights: "
        "its SR images are noise and its rewards mean nothing."
    ),
}


def model_notice(source: str, naosd_path: str = "") -> str | None:
    """What to print when a model of ``source`` runs (None for user-supplied pretrained weights).  With
    ``source=tiny`` a ``naosd_path`` replaces the committed weights, so the notice names that folder instead."""
    if source == "tiny" and naosd_path:
        return (f"NOTE: model.source=tiny with model.naosd_path={naosd_path}: a tiny SD-architecture model loaded from "
                "that folder (not the committed default), NOT the paper's SD 2.1-based NAOSD/GDPO-SR, so its images "
                "and rewards are not the paper's.")  # fmt: skip
    return _NOTICES.get(source)


TINY_TEXT_DIM = 32

# SD 2.1-base scheduler (SPEC section 1).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def sd21_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SD21_SCHEDULER)


def tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=TINY_TEXT_DIM,
        use_linear_projection=True,
        norm_num_groups=16,
    )


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed + 1)
    kinds = 3  # three resolutions = two 2x downsamples = 4x (SD: four, 8x)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * kinds,
        up_block_types=("UpDecoderBlock2D",) * kinds,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed + 2)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextModel(config)

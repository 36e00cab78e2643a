"""The embedded default model: SD 2.1-base's architecture at toy width, random weights.

Same block types as SD 2.1-base (cross-attention down/up blocks with linear
projections, a plain down/up block at the bottom, a cross-attention mid block),
4 latent channels, an 8x VAE and the real CLIP tokenizer, but a few hundred
thousand parameters, so it builds offline in about a second.  Its images and
scores mean nothing: :data:`TINY_MODEL_NOTICE` says so wherever it runs.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from common.clip_vocab import MAX_LENGTH, VOCAB_SIZE

TINY_MODEL_NOTICE = (
    "NOTE: running the tiny randomly initialised model (model.source=tiny): "
    "its SR images and rewards are NOT those of pretrained SD 2.1 / NAOSD."
)

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
    kinds = 4  # four resolutions = three 2x downsamples = SD's 8x
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * kinds,
        up_block_types=("UpDecoderBlock2D",) * kinds,
        block_out_channels=(8, 16, 16, 16),
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

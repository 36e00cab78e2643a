"""GPU paths (opt in with --run-gpu on a CUDA machine): NAOSD in fp16 and the GDPO backward on CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.naosd import ModelConfig, lora_parameters
from common.weights import build_naosd
from learner.gdpo_loss import GDPOLossConfig, gdpo_loss

pytestmark = pytest.mark.gpu


def test_fp16_group_sampling_on_cuda_matches_fp32(lr_image):
    cpu = build_naosd(ModelConfig())
    gpu = build_naosd(dataclasses.replace(ModelConfig(), dtype="float16"), device="cuda")
    with torch.no_grad():
        want = cpu.sample_group(lr_image, cpu.encode_prompts([""]), group_size=2,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        got = gpu.sample_group(lr_image.cuda(), gpu.encode_prompts([""]), group_size=2,
                               generator=torch.Generator(device="cuda").manual_seed(0))  # fmt: skip
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert got.dtype == torch.float32  # sampling runs in fp16, the output is handed on in fp32


def test_gdpo_backward_on_cuda_reaches_only_lora():
    model = build_naosd(ModelConfig(), device="cuda")
    latents = torch.randn(2, 3, 4, 4, 4, device="cuda")
    out = gdpo_loss(
        model.unet,
        latents=latents,
        noise=torch.randn_like(latents),
        text_emb=torch.randn(2, 77, 32, device="cuda"),
        advantages=torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device="cuda"),
        alphas_cumprod=model.alphas_cumprod,
        config=GDPOLossConfig(),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in lora_parameters(model.unet).values())
    assert all(p.grad is None for n, p in model.unet.named_parameters() if n not in lora_parameters(model.unet))

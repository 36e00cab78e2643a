"""``benchmarks/train_tiny_denoiser.py``: a tiny diffusion prior on the committed VAE, from training photos only."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks import train_tiny_denoiser
from common.naosd import ModelConfig
from common.tiny import TINY_MODEL_DIR, tiny_unet
from common.weights import build_naosd
from sr_data.embedded_images import EMBEDDED_HELDOUT, EMBEDDED_IMAGES, load_embedded


def test_crops_come_from_the_training_photos_only(monkeypatch) -> None:
    read: list[str] = []

    def recording(image_id: str) -> np.ndarray:
        read.append(image_id)
        return load_embedded(image_id)

    monkeypatch.setattr(train_tiny_denoiser, "load_embedded", recording)
    crops = train_tiny_denoiser.training_crops(count=12, size=16, seed=0)
    assert sorted(read) == sorted(EMBEDDED_IMAGES) and not set(read) & set(EMBEDDED_HELDOUT)
    assert crops.shape == (12, 3, 16, 16)
    assert crops.min() >= -1 and crops.max() <= 1


def test_trains_the_seeded_unet_and_keeps_the_committed_vae(tmp_path) -> None:
    out = tmp_path / "denoiser"
    assert train_tiny_denoiser.main(["--out", str(out), "--steps", "2", "--batch", "2", "--crops", "4"]) == 0
    committed = load_file(TINY_MODEL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    written = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert committed.keys() == written.keys() and all(torch.equal(committed[k], written[k]) for k in committed)
    build_naosd(ModelConfig(naosd_path=str(out), t_add=250, t_diff=250))  # what the benches load
    trained = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    initial = tiny_unet(0).state_dict()  # the script's start (--seed 0)
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # two optimiser steps moved it


def test_writes_a_complete_sd_folder_that_stands_in_for_sd21(tmp_path) -> None:
    out = tmp_path / "denoiser"
    assert train_tiny_denoiser.main(["--out", str(out), "--steps", "1", "--batch", "2", "--crops", "4"]) == 0
    as_base = build_naosd(ModelConfig(source="pretrained", sd_path=str(out)))  # what LoRA pre-training loads
    as_tiny = build_naosd(ModelConfig(naosd_path=str(out)))
    with torch.no_grad():  # the same text encoder as model.source=tiny: one empty-prompt embedding
        assert torch.equal(as_base.encode_prompts([""]), as_tiny.encode_prompts([""]))
    assert torch.equal(as_base.alphas_cumprod, as_tiny.alphas_cumprod)  # SD 2.1's schedule
    # The same UNet weights; the fresh "gdpo" adapter's lora_A init draws from the global RNG, not from the folder.
    base_unet, tiny_unet_state = as_base.unet.state_dict(), as_tiny.unet.state_dict()
    assert all(torch.equal(base_unet[k], tiny_unet_state[k]) for k in tiny_unet_state if "lora_" not in k)

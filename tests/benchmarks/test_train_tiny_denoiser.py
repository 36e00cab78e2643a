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

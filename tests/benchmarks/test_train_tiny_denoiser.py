"""``benchmarks/train_tiny_denoiser.py``: a tiny diffusion prior on the committed VAE, from training photos only."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks import train_tiny_denoiser
from common.naosd import ModelConfig
from common.tiny import TINY_MODEL_DIR
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


def test_writes_a_tiny_model_folder_with_the_committed_vae(tmp_path) -> None:
    out = tmp_path / "denoiser"
    assert train_tiny_denoiser.main(["--out", str(out), "--steps", "2", "--batch", "2", "--crops", "4"]) == 0
    committed = load_file(TINY_MODEL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    written = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert committed.keys() == written.keys() and all(torch.equal(committed[k], written[k]) for k in committed)
    model = build_naosd(ModelConfig(naosd_path=str(out), t_add=250, t_diff=250))
    trained = build_naosd(ModelConfig())
    ours, committed_unet = model.unet.state_dict(), trained.unet.state_dict()
    assert ours.keys() == committed_unet.keys()
    assert any(not torch.equal(ours[k], committed_unet[k]) for k in ours)

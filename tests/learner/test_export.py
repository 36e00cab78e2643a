"""``python -m learner.export``: a merged diffusers folder from a GDPO checkpoint or a pre-training export.

The merged model, loaded back with our loader (``model.naosd_path``), must give
the SR output of base + adapter; the adapter's own effect is checked to be far
above the tolerance, so an export that dropped it would fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.naosd import NAOSD, ModelConfig
from common.weights import build_naosd, export_merged, save_adapter
from learner.export import main
from tests.common.conftest import randomise_lora

PIPELINE_PARTS = ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]


@pytest.fixture
def lr() -> torch.Tensor:
    """A [1, 3, 32, 32] LR crop of a real photo in [-1, 1] (tests/common's ``lr_image``)."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()[100:164:2, 180:244:2].copy()).permute(2, 0, 1).float()
    return (photo / 127.5 - 1).unsqueeze(0)


def _sample(model: NAOSD, lr: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(lr, model.encode_prompts(["a photo"]), generator=torch.Generator().manual_seed(3))


def _adapted(config: ModelConfig, lr: torch.Tensor) -> NAOSD:
    model = build_naosd(config)
    reference = _sample(model, lr)  # the fresh adapter has B = 0: the base model's output
    randomise_lora(model)
    assert float((_sample(model, lr) - reference).abs().max()) > 5e-3  # measured 0.019: 1,900x the tolerance below
    return model


def _checkpoint(model: NAOSD, config: ModelConfig, root: Path) -> Path:
    """A learner checkpoint as ``LearnerRank.save_checkpoint`` lays it out: ``<ckpt>/adapter``."""
    save_adapter(model.unet, root / "adapter", model=config, extra={"step": 7})
    return root


def test_help_answers_without_importing_torch():
    code = "import sys, learner.export; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    out = subprocess.run([sys.executable, "-m", "learner.export", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2], timeout=30)  # fmt: skip
    assert "--checkpoint" in out.stdout and "--out" in out.stdout


def test_gdpo_checkpoint_exports_the_merged_model(lr, tmp_path, capsys):
    model = _adapted(ModelConfig(), lr)
    ckpt = _checkpoint(model, ModelConfig(), tmp_path / "run" / "checkpoint")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    assert "model.naosd_path=" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == PIPELINE_PARTS
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = build_naosd(ModelConfig(naosd_path=str(tmp_path / "merged")))
    # merged weights vs the LoRA path: other kernels, float rounding only
    torch.testing.assert_close(_sample(loaded, lr), _sample(model, lr), atol=1e-5, rtol=0)


def test_pretrained_base_is_rebuilt_from_the_recorded_config_or_an_override(lr, tmp_path):
    sd = export_merged(build_naosd(ModelConfig()), tmp_path / "sd")  # SD 2.1-base's layout, tiny weights
    config = ModelConfig(source="pretrained", sd_path=str(sd))
    model = _adapted(config, lr)
    ckpt = _checkpoint(model, config, tmp_path / "ckpt")
    moved = tmp_path / "moved-sd"
    shutil.move(sd, moved)
    with pytest.raises(SystemExit, match="does not exist"):  # the recorded sd_path is gone
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")])
    main(["--checkpoint", str(ckpt / "adapter"), "--out", str(tmp_path / "merged"), f"model.sd_path={moved}"])
    for loaded_config in (
        ModelConfig(source="pretrained", sd_path=str(moved), naosd_path=str(tmp_path / "merged")),
        ModelConfig(source="pretrained", sd_path=str(tmp_path / "merged")),  # the export is a full SD folder
    ):
        loaded = build_naosd(loaded_config)
        torch.testing.assert_close(_sample(loaded, lr), _sample(model, lr), atol=1e-5, rtol=0)


def _check_pretraining_adapters_load_in_peft(pretrained, sd: Path, adapters: Path, lr: torch.Tensor) -> None:
    """peft reads the pre-training LoRA folders: its UNet and VAE encoder give the LoRA model's outputs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import PeftModel

    from learner.pretrain_model import NAOSD_ADAPTER

    naosd = pretrained.naosd
    naosd.unet.set_adapter(NAOSD_ADAPTER)
    z, emb = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 77, 32)
    unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(sd / "unet"), str(adapters / "unet"))
    vae = PeftModel.from_pretrained(AutoencoderKL.from_pretrained(sd / "vae"), str(adapters / "vae_encoder"))
    with torch.no_grad():
        torch.testing.assert_close(unet(z, 100, encoder_hidden_states=emb).sample,
                                   naosd.unet(z, 100, encoder_hidden_states=emb).sample, atol=1e-6, rtol=0)  # fmt: skip
        torch.testing.assert_close(vae.encode(lr).latent_dist.mean, naosd.vae.encode(lr).latent_dist.mean,
                                   atol=1e-6, rtol=0)  # fmt: skip
    assert not (adapters / "vae_encoder" / "pytorch_lora_weights.safetensors").exists()  # UNet/text LoRA only


@pytest.mark.parametrize("mode", ["lora", "from_scratch"])
def test_pretraining_export_becomes_a_pipeline_folder(lr, tmp_path, mode):
    from learner.pretrain_loss import PretrainLossConfig
    from learner.pretrain_model import PretrainModelConfig, PretrainNAOSD

    sd = export_merged(build_naosd(ModelConfig(source="tiny_random", tiny_seed=1)), tmp_path / "sd")
    if mode == "lora":  # SD 2.1-base + LoRA on the UNet and the VAE encoder, as the paper's pre-training
        base, overrides = ModelConfig(source="pretrained", sd_path=str(sd)), [f"model.sd_path={sd}"]
        pretrained = PretrainNAOSD(base, PretrainModelConfig(), PretrainLossConfig(lambda_lpips=0.0))
        randomise = pretrained.trainable_groups()["generator"]
    else:  # the tiny model's mode: every weight trains
        base, overrides = ModelConfig(source="tiny_random", tiny_seed=2), []
        pretrained = PretrainNAOSD(base, PretrainModelConfig(train_base=True),
                                   PretrainLossConfig(lambda_lpips=0.0, lambda_vsd=0.0))  # fmt: skip
        randomise = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in randomise:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    naosd = pretrained.export(tmp_path / "naosd")  # unet/ vae/ (adapters/): what learner.pretrain writes
    if mode == "lora":
        _check_pretraining_adapters_load_in_peft(pretrained, sd, naosd / "adapters", lr)
    main(["--checkpoint", str(naosd), "--out", str(tmp_path / "merged"), *overrides])
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == PIPELINE_PARTS
    as_config = {"source": base.source if mode == "lora" else "tiny", "sd_path": base.sd_path}
    want = build_naosd(ModelConfig(**as_config, naosd_path=str(naosd)))
    got = build_naosd(ModelConfig(**as_config, naosd_path=str(tmp_path / "merged")))
    torch.testing.assert_close(_sample(got, lr), _sample(want, lr), atol=1e-6, rtol=0)
    # not a silent fallback: the LoRA moved the SD base; the from-scratch weights are not the committed tiny model
    other = build_naosd(ModelConfig(source="pretrained", sd_path=str(sd)) if mode == "lora" else ModelConfig())
    assert float((_sample(want, lr) - _sample(other, lr)).abs().max()) > 1e-2


def test_bad_inputs_are_refused_with_a_message(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    for part in ("unet", "vae"):
        (tmp_path / "merged" / part).mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds no GDPO-SR adapter"):
        main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "new")])
    with pytest.raises(SystemExit, match="already exists"):
        main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"model\.KEY=VALUE"):
        main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "new"), "learner.lr=1"])
    with pytest.raises(SystemExit, match="unknown config key"):
        main(["--checkpoint", str(tmp_path / "merged"), "--out", str(tmp_path / "new"), "model.nope=1"])


def test_a_learner_checkpoint_exports_what_the_learner_trained(free_port, scored_batch, lr, tmp_path):
    from common.adapter_sync import apply_to
    from learner.config import LearnerConfig
    from learner.engine import LearnerRank

    rank = LearnerRank(ModelConfig(), LearnerConfig(lr=1e-2), 0, 1, "127.0.0.1", free_port)
    rank.train_step(scored_batch(seed=1))
    ckpt = rank.save_checkpoint(tmp_path / "ckpt", {})  # the layout is the engine's: the folder holding adapter/
    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")])
    trained = build_naosd(ModelConfig())
    untrained = _sample(trained, lr)
    apply_to(trained.unet, rank.adapter_weights())  # our own forward with the learner's adapter
    assert float((_sample(trained, lr) - untrained).abs().max()) > 1e-3  # one step at lr 1e-2 moved it
    merged = build_naosd(ModelConfig(naosd_path=str(tmp_path / "merged")))
    torch.testing.assert_close(_sample(merged, lr), _sample(trained, lr), atol=1e-5, rtol=0)

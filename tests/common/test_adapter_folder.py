"""The adapter folder is a real peft adapter and a real diffusers LoRA: both load it with the right alpha.

Every check compares against our own forward (common/naosd.py with our loader),
on the tiny model with a randomised adapter, and also checks that the adapter
moves the output, so a loader that dropped it (or halved its alpha) would fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.adapter_folder import (
    DIFFUSERS_WEIGHTS,
    OUR_METADATA,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    find_adapter_folder,
    from_peft_names,
    to_peft_names,
)
from common.naosd import ADAPTER_NAME, NAOSD, ModelConfig, lora_parameters
from common.weights import adapter_state_dict, build_naosd, export_merged, load_adapter, save_adapter
from tests.common.conftest import randomise_lora


def _sample(model: NAOSD, lr: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(lr, model.encode_prompts(["a photo"]), generator=torch.Generator().manual_seed(3))


def _plain_unet() -> UNet2DConditionModel:
    unet = build_naosd(ModelConfig()).unet
    unet.unload_lora()
    return unet


def _with_unet(model: NAOSD, unet: torch.nn.Module) -> NAOSD:
    return NAOSD(unet=unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                 scheduler=model.scheduler, t_add=model.t_add, t_diff=model.t_diff)  # fmt: skip


def _effect(model: NAOSD, lr: torch.Tensor) -> float:
    """How far the adapter moves the SR output (max abs): what a dropped or halved adapter would lose."""
    with_adapter = _sample(model, lr)
    model.unet.disable_adapters()
    try:
        return float((with_adapter - _sample(model, lr)).abs().max())
    finally:
        model.unet.enable_adapters()


@pytest.fixture
def adapted(tiny_model: NAOSD, lr_image: torch.Tensor, tmp_path: Path) -> tuple[NAOSD, Path]:
    """The tiny model with a random adapter, saved; the adapter's effect is far above the tolerances below."""
    randomise_lora(tiny_model)
    # measured 0.019 on the committed tiny model: 1,900x the 1e-5 tolerance, so a dropped adapter or a halved
    # alpha (about half of it off) fails
    assert _effect(tiny_model, lr_image) > 5e-3
    return tiny_model, save_adapter(tiny_model.unet, tmp_path / "adapter", model=ModelConfig(), extra={"step": 3})


def test_folder_holds_peft_diffusers_and_our_files(adapted):
    model, folder = adapted
    assert sorted(p.name for p in folder.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS,
                                                               OUR_METADATA])  # fmt: skip
    config = PeftConfig.from_pretrained(str(folder))  # failed with "missing required keys: {'peft_type'}"
    assert (config.peft_type, config.r, config.lora_alpha, config.init_lora_weights) == ("LORA", 4, 8.0, "gaussian")
    assert config.base_model_name_or_path.endswith("common/tiny_model")
    # peft's own naming: what get_peft_model_state_dict gives, under a PeftModel's prefix
    peft_names = get_peft_model_state_dict(model.unet, adapter_name=ADAPTER_NAME)
    assert set(load_file(folder / PEFT_WEIGHTS)) == {f"base_model.model.{k}" for k in peft_names}
    assert set(load_file(folder / DIFFUSERS_WEIGHTS)) == {f"unet.{k}" for k in peft_names}
    with safe_open(folder / DIFFUSERS_WEIGHTS, "pt") as f:  # the alpha travels in the file's header
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (header["unet.r"], header["unet.lora_alpha"]) == (4, 8.0)
    meta = json.loads((folder / OUR_METADATA).read_text())
    assert meta["step"] == 3 and meta["model"]["source"] == "tiny" and meta["format"] == "gdpo-sr-lora/2"


def test_names_round_trip():
    state = {"down.conv1.lora_A.gdpo.weight": torch.zeros(1), "down.conv1.lora_B.gdpo.weight": torch.ones(1)}
    plain = to_peft_names(state, "gdpo")
    assert sorted(plain) == ["down.conv1.lora_A.weight", "down.conv1.lora_B.weight"]
    assert from_peft_names({f"p.{k}": v for k, v in plain.items()}, "gdpo", prefix="p.") == state
    with pytest.raises(ValueError, match="not a LoRA weight"):
        from_peft_names({"down.conv1.weight": torch.zeros(1)}, "gdpo", prefix="")


def test_peft_model_from_pretrained_gives_our_output(adapted, lr_image):
    model, folder = adapted
    peft_unet = PeftModel.from_pretrained(_plain_unet(), str(folder)).eval()
    assert peft_unet.peft_config["default"].lora_alpha == 8.0
    torch.testing.assert_close(_sample(_with_unet(model, peft_unet), lr_image), _sample(model, lr_image),
                               atol=1e-6, rtol=0)  # fmt: skip


def test_diffusers_unet_load_lora_adapter_gives_our_output(adapted, lr_image):
    model, folder = adapted
    unet = _plain_unet()
    unet.load_lora_adapter(str(folder), weight_name=DIFFUSERS_WEIGHTS, prefix="unet", adapter_name="gdpo")
    assert unet.peft_config["gdpo"].lora_alpha == 8.0  # not r = 4: the header's alpha is read
    torch.testing.assert_close(_sample(_with_unet(model, unet), lr_image), _sample(model, lr_image),
                               atol=1e-6, rtol=0)  # fmt: skip
    # prefix=None keeps "unet." in the module names: diffusers refuses it rather than load the wrong alpha
    with pytest.raises((TypeError, ValueError)):
        _plain_unet().load_lora_adapter(str(folder), weight_name=DIFFUSERS_WEIGHTS, prefix=None)


def test_pipeline_load_lora_weights_gives_our_output(adapted, lr_image, tmp_path):
    model, folder = adapted
    base = build_naosd(ModelConfig())  # the same base, fresh (zero-effect) adapter: exported unmerged-equal
    export_merged(base, tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    pipe.load_lora_weights(str(folder))  # the documented pipeline call, default file and prefix
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8.0
    torch.testing.assert_close(_sample(_with_unet(model, pipe.unet), lr_image), _sample(model, lr_image),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_our_round_trip_is_exact_and_checks_the_digest(adapted, lr_image):
    model, folder = adapted
    fresh = build_naosd(ModelConfig())
    meta = load_adapter(fresh.unet, folder)
    assert meta["step"] == 3
    assert torch.equal(_sample(fresh, lr_image), _sample(model, lr_image))
    assert adapter_state_dict(fresh.unet).keys() == lora_parameters(model.unet).keys()


def _unet_state(model: NAOSD) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def _assert_unchanged(before: dict[str, torch.Tensor], model: NAOSD) -> None:
    after = model.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("change", ["rank", "targets", "alpha"])
def test_adapter_mismatch_is_refused_and_leaves_model_alone(tiny_model, tmp_path, change):
    other = {"rank": ModelConfig(lora_rank=8), "targets": ModelConfig(lora_targets=("to_q", "to_v")),
             "alpha": ModelConfig(lora_alpha=4.0)}[change]  # fmt: skip
    save_adapter(build_naosd(other).unet, tmp_path / "a")
    before = _unet_state(tiny_model)
    message = {"rank": "r is 8", "targets": "target_modules", "alpha": "lora_alpha is 4.0"}[change]
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_model.unet, tmp_path / "a")
    _assert_unchanged(before, tiny_model)


def test_tampered_adapters_are_refused(adapted):
    _, folder = adapted
    state = load_file(folder / PEFT_WEIGHTS)
    key = next(iter(state))
    state[key] = state[key] + 1e-3
    save_file(state, str(folder / PEFT_WEIGHTS))
    fresh = build_naosd(ModelConfig())
    before = _unet_state(fresh)
    with pytest.raises(ValueError, match="digest"):
        load_adapter(fresh.unet, folder)
    _assert_unchanged(before, fresh)
    (folder / PEFT_WEIGHTS).unlink()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is missing"):
        load_adapter(fresh.unet, folder)


def test_find_adapter_folder_accepts_the_folder_or_a_checkpoint_holding_it(adapted, tmp_path):
    _, folder = adapted
    assert find_adapter_folder(folder) == folder
    assert find_adapter_folder(tmp_path) == folder  # tmp_path/adapter: a learner checkpoint's layout
    shutil.copytree(folder, tmp_path / "run" / "checkpoint-4" / "adapter")
    with pytest.raises(ValueError, match="checkpoint-4/adapter"):  # a run folder: names what it holds
        find_adapter_folder(tmp_path / "run")

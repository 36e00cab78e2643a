"""Every loader round-trips on files written from the tiny model; bad inputs fail cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig

from common.naosd import NAOSD, UNET_LORA_PATTERNS, ModelConfig, lora_parameters
from common.naosd_checkpoint import GROUPS, apply_naosd_checkpoint, read_naosd_checkpoint
from common.weights import build_naosd, export_merged
from tests.common.conftest import randomise_lora


def _sample(model: NAOSD, lr: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(lr, model.encode_prompts(["a photo"]), generator=torch.Generator().manual_seed(3))


def _write_sd_folder(model: NAOSD, root: Path) -> Path:
    """SD 2.1-base's diffusers layout, written from the tiny model (adapter removed)."""
    unet = build_naosd(ModelConfig()).unet
    unet.unload_lora()
    unet.save_pretrained(root / "unet")
    model.vae.save_pretrained(root / "vae")
    model.text_encoder.save_pretrained(root / "text_encoder")
    model.tokenizer.save_pretrained(root / "tokenizer")
    model.scheduler.save_pretrained(root / "scheduler")
    return root


def test_sd_folder_round_trip(tiny_model, lr_image, tmp_path):
    sd = _write_sd_folder(tiny_model, tmp_path / "sd")
    loaded = build_naosd(ModelConfig(source="pretrained", sd_path=str(sd)))
    # Same weights bit for bit; tensors read back from safetensors take other CPU kernels: float rounding.
    torch.testing.assert_close(_sample(loaded, lr_image), _sample(tiny_model, lr_image), atol=1e-5, rtol=0)


def test_merged_folder_round_trip(tiny_model, lr_image, tmp_path):
    sd = _write_sd_folder(tiny_model, tmp_path / "sd")
    randomise_lora(tiny_model)
    export_merged(tiny_model, tmp_path / "gdpo")
    # diffusers' own loaders read the export back: the UNet alone, and the whole pipeline from model_index.json
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "gdpo", subfolder="unet")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "gdpo", local_files_only=True)
    assert {type(c).__name__ for c in pipe.components.values() if c is not None} == {
        "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer", "DDPMScheduler"}  # fmt: skip
    loaded = build_naosd(ModelConfig(source="pretrained", sd_path=str(sd), naosd_path=str(tmp_path / "gdpo")))
    torch.testing.assert_close(_sample(loaded, lr_image), _sample(tiny_model, lr_image), atol=1e-5, rtol=0)


def _reference_groups(module: torch.nn.Module, first: str, last: str, patterns) -> dict[str, list[str]]:
    """The reference trainer's split of LoRA targets into encoder/decoder/others."""
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for n, _ in module.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in patterns:
            if pattern in n and ("down_blocks" in n or first in n):
                groups["encoder"].append(n.replace(".weight", ""))
            elif pattern in n and ("up_blocks" in n or last in n):
                groups["decoder"].append(n.replace(".weight", ""))
            elif pattern in n:
                groups["others"].append(n.replace(".weight", ""))
    return groups


def _write_naosd_checkpoint(path: Path, seed: int = 0) -> NAOSD:
    """A checkpoint in the reference format, and the in-memory model it describes (adapters live)."""
    model = build_naosd(ModelConfig(tiny_seed=seed))
    model.unet.unload_lora()
    unet_groups = _reference_groups(model.unet, "conv_in", "conv_out", UNET_LORA_PATTERNS)
    vae_groups = {g: [] for g in GROUPS}
    vae_groups["encoder"] = _reference_groups(model.vae.encoder, "conv_in", "conv_out", ("conv1", "conv2"))["encoder"]
    vae_groups["encoder"] = [f"encoder.{n}" for n in vae_groups["encoder"]]
    gen = torch.Generator().manual_seed(11)
    for module, groups, rank, full in ((model.unet, unet_groups, 4, "conv_in"), (model.vae, vae_groups, 2, "skip")):
        names = []
        for g, targets in groups.items():
            if targets:
                module.add_adapter(
                    LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets), f"default_{g}"
                )
                names.append(f"default_{g}")
        module.set_adapter(names)
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_" in n or full in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pick = lambda module, key: {k: v.clone() for k, v in module.state_dict().items() if "lora" in k or key in k}  # noqa: E731
    ckpt = {f"unet_lora_{g}_modules": unet_groups[g] for g in GROUPS}
    ckpt |= {f"vae_lora_{g}_modules": vae_groups[g] for g in GROUPS}
    ckpt |= {"rank_unet": 4, "rank_vae": 2}
    ckpt |= {"state_dict_unet": pick(model.unet, "conv_in"), "state_dict_vae": pick(model.vae, "skip")}
    torch.save(ckpt, path)
    return model


def test_naosd_training_checkpoint_round_trip(tiny_model, lr_image, tmp_path):
    sd = _write_sd_folder(tiny_model, tmp_path / "sd")
    reference = _write_naosd_checkpoint(tmp_path / "naosd.pkl")
    loaded = build_naosd(ModelConfig(source="pretrained", sd_path=str(sd), naosd_path=str(tmp_path / "naosd.pkl")))
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        got = loaded.unet(z, 100, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
        want = reference.unet(z, 100, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.vae.encode(lr_image).latent_dist.mean,
                                   reference.vae.encode(lr_image).latent_dist.mean, atol=1e-5, rtol=0)  # fmt: skip
        changed = tiny_model.vae.encode(lr_image).latent_dist.mean
        assert (changed - reference.vae.encode(lr_image).latent_dist.mean).abs().max() > 1e-4
    assert set(lora_parameters(loaded.unet))  # the GDPO adapter sits on top of the merged NAOSD


def _unet_state(model: NAOSD) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def _assert_unchanged(before: dict[str, torch.Tensor], model: NAOSD) -> None:
    after = model.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_folder_without_unet_is_refused(tiny_model, tmp_path):
    sd = _write_sd_folder(tiny_model, tmp_path / "sd")
    (tmp_path / "merged" / "vae").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no unet/"):
        build_naosd(ModelConfig(source="pretrained", sd_path=str(sd), naosd_path=str(tmp_path / "merged")))
    with pytest.raises(ValueError, match="does not exist"):
        build_naosd(ModelConfig(source="pretrained", sd_path=str(tmp_path / "missing")))


class NotATensor:  # a pickled object that weights_only loading must refuse
    pass


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("rank_vae"), r"missing keys \['rank_vae'\]"),
        (lambda c: c.update(optimizer={}), r"unexpected \['optimizer'\]"),
        (lambda c: c.update(rank_unet=NotATensor()), "weights_only=True"),
        (
            lambda c: c["state_dict_unet"].update({"time_embedding.linear_1.weight": torch.zeros(1)}),
            "unexpected tensor",
        ),
        (lambda c: c["unet_lora_others_modules"].append("time_embedding.act"), "not a Linear/Conv2d"),
    ],
)
def test_bad_naosd_checkpoints_are_refused(tmp_path, edit, message):
    _write_naosd_checkpoint(tmp_path / "ok.pkl")
    ckpt = torch.load(tmp_path / "ok.pkl", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "bad.pkl")
    with pytest.raises(ValueError, match=message):
        ckpt = read_naosd_checkpoint(tmp_path / "bad.pkl")
        model = build_naosd(ModelConfig())
        model.unet.unload_lora()
        apply_naosd_checkpoint(
            model.unet, ckpt.unet_groups, ckpt.rank_unet, ckpt.state_dict_unet, full_weight_key="conv_in"
        )


def test_checkpoint_with_wrong_shapes_leaves_model_alone(tmp_path):
    _write_naosd_checkpoint(tmp_path / "ok.pkl")
    ckpt = read_naosd_checkpoint(tmp_path / "ok.pkl")
    key = next(k for k in ckpt.state_dict_unet if "lora_A" in k)
    ckpt.state_dict_unet[key] = torch.zeros(3, 3)
    model = build_naosd(ModelConfig())
    model.unet.unload_lora()
    before = _unet_state(model)
    with pytest.raises(ValueError, match="has shape"):
        apply_naosd_checkpoint(model.unet, ckpt.unet_groups, 4, ckpt.state_dict_unet, full_weight_key="conv_in")
    _assert_unchanged(before, model)

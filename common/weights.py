"""Building NAOSD from the weights a user brings, and our own adapter files.

Sources (SPEC section 2):
- the tiny embedded default (``source=tiny``: the committed trained weights in
  ``common/tiny_model``, or a tiny-architecture folder given as ``naosd_path``;
  ``source=tiny_random``: the same architecture, random);
- SD 2.1-base as a local diffusers folder (``sd_path``);
- on top of it, ``naosd_path``: a merged NAOSD/GDPO-SR diffusers folder
  (``unet/``, ``vae/``), or a NAOSD training checkpoint (see
  :mod:`common.naosd_checkpoint`).

Our adapters are peft + diffusers adapter folders (:mod:`common.adapter_folder`);
:func:`export_merged` writes a merged diffusers pipeline folder.  Every loader
validates before it builds or mutates, so a bad input raises ``ValueError``
and leaves no half-loaded model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from common import tiny
from common.adapter_folder import OUR_METADATA, read_adapter_folder, write_adapter_folder
from common.adapter_sync import digest
from common.clip_vocab import clip_tokenizer
from common.config import to_mapping
from common.naosd import (
    ADAPTER_NAME,
    DTYPES,
    NAOSD,
    ModelConfig,
    add_gdpo_adapter,
    lora_parameters,
    lora_target_modules,
)
from common.naosd_checkpoint import apply_naosd_checkpoint, read_naosd_checkpoint


def build_naosd(config: ModelConfig, device: str | torch.device = "cpu") -> NAOSD:
    """The full model: NAOSD base weights, a fresh ``gdpo`` adapter, frozen VAE and text encoder."""
    unet, vae = _base_unet(config), _base_vae(config)
    text_encoder, tokenizer, scheduler = _text_and_scheduler(config)
    add_gdpo_adapter(unet, rank=config.lora_rank, alpha=config.lora_alpha, patterns=config.lora_targets)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval()
    model = NAOSD(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        t_add=config.t_add,
        t_diff=config.t_diff,
    )
    return model.to(device=device, dtype=DTYPES[config.dtype]).eval()


def build_policy_unet(config: ModelConfig) -> tuple[UNet2DConditionModel, Tensor]:
    """What the learner needs and nothing more: the adapted UNet and the schedule's ``abar``."""
    unet = _base_unet(config)
    add_gdpo_adapter(unet, rank=config.lora_rank, alpha=config.lora_alpha, patterns=config.lora_targets)
    _, _, scheduler = _text_and_scheduler(config, text=False)
    return unet, scheduler.alphas_cumprod.clone()


def build_vae(config: ModelConfig) -> AutoencoderKL:
    """The NAOSD VAE alone, frozen (the reward-feedback learner decodes through it)."""
    return _base_vae(config).requires_grad_(False).eval()


def build_base(config: ModelConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
                                             DDPMScheduler]:
    """The NAOSD base weights without any adapter: what pre-training starts from."""
    text_encoder, tokenizer, scheduler = _text_and_scheduler(config)
    return _base_unet(config), _base_vae(config), text_encoder, tokenizer, scheduler


def _tiny_folder(config: ModelConfig) -> Path:
    folder = Path(config.naosd_path) if config.naosd_path else tiny.TINY_MODEL_DIR
    if not (folder / "unet").is_dir() and not config.naosd_path:
        raise ValueError(f"the trained tiny model is missing from {folder}; rebuild it with "
                         f"`{tiny.TINY_MODEL_COMMAND}` or use model.source=tiny_random")  # fmt: skip
    return folder


def _base_unet(config: ModelConfig) -> UNet2DConditionModel:
    if config.source == "tiny_random":
        return tiny.tiny_unet(config.tiny_seed)
    if config.source == "tiny":
        return _from_folder(UNet2DConditionModel, _tiny_folder(config), "unet")
    naosd = Path(config.naosd_path) if config.naosd_path else None
    if naosd is not None and naosd.is_dir():
        return _from_folder(UNet2DConditionModel, naosd, "unet")
    unet = _from_folder(UNet2DConditionModel, Path(config.sd_path), "unet")
    if naosd is not None:
        ckpt = read_naosd_checkpoint(naosd)
        apply_naosd_checkpoint(unet, ckpt.unet_groups, ckpt.rank_unet, ckpt.state_dict_unet, full_weight_key="conv_in")
    return unet


def _base_vae(config: ModelConfig) -> AutoencoderKL:
    if config.source == "tiny_random":
        return tiny.tiny_vae(config.tiny_seed)
    if config.source == "tiny":
        return _from_folder(AutoencoderKL, _tiny_folder(config), "vae")
    naosd = Path(config.naosd_path) if config.naosd_path else None
    if naosd is not None and naosd.is_dir():
        return _from_folder(AutoencoderKL, naosd, "vae")
    vae = _from_folder(AutoencoderKL, Path(config.sd_path), "vae")
    if naosd is not None:
        ckpt = read_naosd_checkpoint(naosd)
        apply_naosd_checkpoint(vae, ckpt.vae_groups, ckpt.rank_vae, ckpt.state_dict_vae, full_weight_key="skip")
    return vae


def _text_and_scheduler(
    config: ModelConfig, *, text: bool = True
) -> tuple[CLIPTextModel | None, CLIPTokenizer | None, DDPMScheduler]:
    if config.source in ("tiny", "tiny_random"):
        if not text:
            return None, None, tiny.sd21_scheduler()
        return tiny.tiny_text_encoder(config.tiny_seed), clip_tokenizer(), tiny.sd21_scheduler()
    sd = Path(config.sd_path)
    scheduler = _from_folder(DDPMScheduler, sd, "scheduler")
    _check_schedule(scheduler, sd)
    if not text:
        return None, None, scheduler
    return _from_folder(CLIPTextModel, sd, "text_encoder"), _from_folder(CLIPTokenizer, sd, "tokenizer"), scheduler


def _from_folder(cls: type, root: Path, subfolder: str):
    folder = root / subfolder
    if not root.is_dir():
        raise ValueError(f"model folder {root} does not exist")
    if not folder.is_dir():
        raise ValueError(f"model folder {root} has no {subfolder}/ (expected a diffusers layout)")
    return cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)


def _check_schedule(scheduler: DDPMScheduler, folder: Path) -> None:
    cfg = scheduler.config
    for key, want in tiny.SD21_SCHEDULER.items():
        if key in cfg and cfg[key] != want and key not in ("clip_sample", "prediction_type"):
            raise ValueError(f"{folder}/scheduler: {key}={cfg[key]!r}, SD 2.1-base has {want!r}")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{folder}/scheduler predicts {cfg['prediction_type']!r}; NAOSD needs epsilon")


# --- our adapter: a peft + diffusers folder ------------------------------------------------------


def adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, Tensor]:
    """A CPU float32 copy of the ``gdpo`` adapter tensors, by parameter name."""
    return {name: p.detach().to("cpu", torch.float32).contiguous().clone() for name, p in lora_parameters(unet).items()}


def load_adapter_state_dict(unet: UNet2DConditionModel, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors into the UNet in place, after checking names and shapes all match."""
    params = lora_parameters(unet)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != params[name].shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the UNet wants "
                             f"{tuple(params[name].shape)} (different LoRA rank?)")  # fmt: skip
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def base_model_path(config: ModelConfig) -> str | None:
    """The folder whose ``unet/`` the adapter sits on (peft's ``base_model_name_or_path``); None if random."""
    if config.source == "tiny_random":
        return None
    if config.source == "tiny":
        return str(_tiny_folder(config))
    return config.naosd_path if Path(config.naosd_path).is_dir() else config.sd_path


def save_adapter(
    unet: UNet2DConditionModel, directory: str | Path, *, model: ModelConfig | None = None, extra: dict | None = None
) -> Path:
    """Write the ``gdpo`` adapter as a peft + diffusers adapter folder (:mod:`common.adapter_folder`).

    Our metadata records the tensors' digest (checked on load), ``model`` (the config the
    UNet was built from, so ``learner.export`` can rebuild the base) and ``extra`` (e.g. the step).
    """
    state = adapter_state_dict(unet)
    meta = {"adapter_name": ADAPTER_NAME, "model": None if model is None else to_mapping(model),
            "digest": digest(state), **(extra or {})}  # fmt: skip
    return write_adapter_folder(directory, state, unet.peft_config[ADAPTER_NAME],
                                adapter=ADAPTER_NAME, base_model=model and base_model_path(model),
                                metadata=meta)  # fmt: skip


def load_adapter(unet: UNet2DConditionModel, directory: str | Path) -> dict:
    """Load a saved adapter into ``unet`` in place, after checking it fits; returns our metadata."""
    directory = Path(directory)
    state, saved, meta = read_adapter_folder(directory, ADAPTER_NAME)
    ours = unet.peft_config[ADAPTER_NAME]
    checks = {
        "r": (saved.get("r"), ours.r),
        "lora_alpha": (saved.get("lora_alpha"), ours.lora_alpha),
        "target_modules": (sorted(saved.get("target_modules") or []), sorted(ours.target_modules)),
    }
    for key, (got, want) in checks.items():
        if got != want:
            shown = (f"{len(got)} modules", f"{len(want)} modules") if key == "target_modules" else (got, want)
            raise ValueError(f"adapter {directory}: {key} is {shown[0]}, this model's adapter has {shown[1]}")
    if digest(state) != meta.get("digest"):
        raise ValueError(f"adapter {directory}: the tensors do not match the digest in {OUR_METADATA}")
    load_adapter_state_dict(unet, state)
    return meta


def export_merged(model: NAOSD, directory: str | Path) -> Path:
    """Write ``model`` as a diffusers pipeline folder with the ``gdpo`` adapter merged into the UNet.

    ``model_index.json`` (a ``StableDiffusionPipeline``, no safety checker), ``unet/`` (merged),
    ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``: ``model.naosd_path`` loads it
    (``unet/``, ``vae/``), ``DiffusionPipeline.from_pretrained`` loads every component.  NAOSD's
    one-step SR is :class:`common.naosd.NAOSD`, not the pipeline's text-to-image call.
    """
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    unet = copy.deepcopy(model.unet)
    if ADAPTER_NAME in getattr(unet, "peft_config", {}):
        unet.fuse_lora(adapter_names=[ADAPTER_NAME])
        unet.unload_lora()
    assert not lora_target_modules(unet, ["lora_"]), "LoRA layers survived the merge"
    # The pipeline rewrites (in place, with a warning) a steps_offset other than 1, which SD 2.1-base has;
    # it shifts multi-step sampling timesteps only, not NAOSD's schedule (alphas_cumprod).
    scheduler = DDPMScheduler.from_config(model.scheduler.config, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    return directory

"""The reference NAOSD training checkpoint (SPEC section 2), read safely and merged in.

The file is a ``torch.save``d dict with the LoRA module lists of three adapter
groups (``encoder``, ``decoder``, ``others``) for the UNet and the VAE, the two
ranks, and two state dicts holding the LoRA tensors under peft's names
(``<module>.lora_A.default_<group>.weight``) plus full weights (``conv_in`` for
the UNet, ``skip`` for the VAE).  We read it with ``weights_only=True``, check
every key and shape against the model, and only then merge the LoRA into the
base weights, so the reference NAOSD is a plain UNet/VAE again.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from torch import Tensor, nn

GROUPS = ("encoder", "decoder", "others")
REQUIRED_KEYS = frozenset(
    [f"{part}_lora_{g}_modules" for part in ("unet", "vae") for g in GROUPS]
    + ["rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"]
)
REFERENCE_LORA_ALPHA = 8.0  # the reference builds LoraConfig without lora_alpha: peft's default


@dataclass(frozen=True)
class NAOSDCheckpoint:
    unet_groups: dict[str, list[str]]
    vae_groups: dict[str, list[str]]
    rank_unet: int
    rank_vae: int
    state_dict_unet: dict[str, Tensor]
    state_dict_vae: dict[str, Tensor]


def read_naosd_checkpoint(path: str | Path) -> NAOSDCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"NAOSD checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a NAOSD checkpoint that loads with weights_only=True: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict, got {type(raw).__name__}")
    missing, unexpected = sorted(REQUIRED_KEYS - set(raw)), sorted(set(raw) - REQUIRED_KEYS)
    if missing or unexpected:
        raise ValueError(f"{path}: not the NAOSD checkpoint format: missing keys {missing}, unexpected {unexpected}")
    for part in ("unet", "vae"):
        rank = raw[f"rank_{part}"]
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{path}: rank_{part} must be a positive int, got {rank!r}")
        state = raw[f"state_dict_{part}"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path}: state_dict_{part} must map names to tensors")
        for g in GROUPS:
            names = raw[f"{part}_lora_{g}_modules"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: {part}_lora_{g}_modules must be a list of module names")
    return NAOSDCheckpoint(
        unet_groups={g: sorted(set(raw[f"unet_lora_{g}_modules"])) for g in GROUPS},
        vae_groups={g: sorted(set(raw[f"vae_lora_{g}_modules"])) for g in GROUPS},
        rank_unet=raw["rank_unet"],
        rank_vae=raw["rank_vae"],
        state_dict_unet=raw["state_dict_unet"],
        state_dict_vae=raw["state_dict_vae"],
    )


def apply_naosd_checkpoint(
    model: nn.Module, groups: dict[str, list[str]], rank: int, state: dict[str, Tensor], *, full_weight_key: str
) -> None:
    """Merge the checkpoint's LoRA groups and full weights into ``model`` (UNet or VAE) in place."""
    expected = _expected_shapes(model, groups, rank)
    base = dict(model.state_dict())
    for key in state:
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer", "")
        if full_weight_key not in key or plain not in base:
            raise ValueError(f"NAOSD checkpoint: unexpected tensor {key!r} for {type(model).__name__}")
        expected[key] = tuple(base[plain].shape)
    missing = sorted(k for k in expected if k not in state and ".lora_" in k)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"NAOSD checkpoint does not fit {type(model).__name__}: missing {missing[:3]} "
            f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"NAOSD checkpoint: {key} has shape {tuple(tensor.shape)}, expected {expected[key]}")
    _merge(model, groups, rank, state)


def _merge(model: nn.Module, groups: dict[str, list[str]], rank: int, state: dict[str, Tensor]) -> None:
    names = []
    for g, targets in groups.items():
        if targets:
            config = LoraConfig(r=rank, lora_alpha=REFERENCE_LORA_ALPHA, target_modules=targets)
            model.add_adapter(config, adapter_name=f"default_{g}")
            names.append(f"default_{g}")
    live = model.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            live[key].copy_(tensor)
    if names:
        model.set_adapter(names)
        model.fuse_lora(adapter_names=names)
        model.unload_lora()


def _expected_shapes(model: nn.Module, groups: dict[str, list[str]], rank: int) -> dict[str, tuple[int, ...]]:
    """peft's LoRA tensor names and shapes for every target, before anything is injected."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for g, targets in groups.items():
        for name in targets:
            module = modules.get(name)
            if isinstance(module, nn.Linear):
                a, b = (rank, module.in_features), (module.out_features, rank)
            elif isinstance(module, nn.Conv2d):
                a, b = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
            else:
                raise ValueError(f"NAOSD checkpoint targets {name!r}, which is not a Linear/Conv2d of this model")
            shapes[f"{name}.lora_A.default_{g}.weight"] = a
            shapes[f"{name}.lora_B.default_{g}.weight"] = b
    return shapes

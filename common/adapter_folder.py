"""The adapter folder: one LoRA, readable by peft, by diffusers and by us.

A folder written by :func:`write_adapter_folder` holds

- ``adapter_config.json`` and ``adapter_model.safetensors``: a genuine peft
  adapter (``peft_type``, ``r``, ``lora_alpha``, ``target_modules``,
  ``init_lora_weights``, ``base_model_name_or_path``; tensors under peft's
  names ``base_model.model.<module>.lora_A.weight``), so
  ``PeftModel.from_pretrained(unet, folder)`` loads it;
- ``pytorch_lora_weights.safetensors``: the same tensors in diffusers' pipeline
  LoRA format (``unet.<module>.lora_A.weight``, the LoRA config in the file's
  ``lora_adapter_metadata`` header, so the alpha travels with it), so
  ``pipe.load_lora_weights(folder)`` and
  ``unet.load_lora_adapter(folder, prefix="unet")`` load it.  diffusers' UNet
  default ``prefix="transformer"`` matches no key (it loads nothing, with only
  a logged warning), and ``prefix=None`` keeps the ``unet.`` in the module
  names; ``prefix="unet"`` is the call;
- ``gdpo_sr.json``: our own metadata (format, the learner step, the digest of
  the tensors, the model config the adapter was trained on).

Our names are the UNet's parameter names, ``<module>.lora_A.<adapter>.weight``;
the two files store the same tensors without the adapter name, as peft's
``get_peft_model_state_dict`` does.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import Tensor

PEFT_CONFIG = "adapter_config.json"  # peft's file names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
OUR_METADATA = "gdpo_sr.json"
ADAPTER_FORMAT = "gdpo-sr-lora/2"  # /1 kept our names in adapter_model.safetensors and no peft_type
PEFT_PREFIX = "base_model.model."  # what a PeftModel's state dict puts before the wrapped model's names
DIFFUSERS_PREFIX = "unet."  # StableDiffusionLoraLoaderMixin.unet_name

_OUR_NAME = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_[AB])\.(?P<adapter>[^.]+)\.weight$")


def to_peft_names(state: dict[str, Tensor], adapter: str) -> dict[str, Tensor]:
    """``<module>.lora_A.<adapter>.weight`` -> ``<module>.lora_A.weight`` (peft's saved names, no prefix)."""
    out = {}
    for name, tensor in state.items():
        match = _OUR_NAME.match(name)
        assert match and match["adapter"] == adapter, f"{name} is not a weight of LoRA adapter {adapter!r}"
        out[f"{match['module']}.{match['ab']}.weight"] = tensor
    return out


def from_peft_names(state: dict[str, Tensor], adapter: str, *, prefix: str) -> dict[str, Tensor]:
    """The inverse of :func:`to_peft_names` for keys stored under ``prefix``; ValueError on any other key."""
    out = {}
    for key, tensor in state.items():
        stem = key.removeprefix(prefix)
        if not key.startswith(prefix) or not re.fullmatch(r".+\.lora_[AB]\.weight", stem):
            raise ValueError(f"{key!r} is not a LoRA weight stored as {prefix}<module>.lora_A/B.weight")
        out[stem.removesuffix(".weight") + f".{adapter}.weight"] = tensor
    return out


def write_adapter_folder(
    directory: str | Path,
    state: dict[str, Tensor],
    config: LoraConfig,
    *,
    adapter: str,
    base_model: str | None,
    metadata: dict[str, Any],
    diffusers_unet: bool = True,
) -> Path:
    """Write ``state`` (our names, adapter ``adapter``, LoRA ``config``) as the folder above.

    ``diffusers_unet=False`` (an adapter of another module, e.g. the VAE encoder) leaves out
    diffusers' pipeline file, which holds UNet and text-encoder LoRAs only.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # diffusers' pipeline-format writer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(directory))  # peft's own writer: adapter_config.json with peft_type
    plain = to_peft_names(state, adapter)
    save_file({PEFT_PREFIX + k: v for k, v in plain.items()}, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
    if diffusers_unet:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(directory),
            unet_lora_layers=plain,
            unet_lora_adapter_metadata=lora_config_dict(config),
            weight_name=DIFFUSERS_WEIGHTS,
        )
    (directory / OUR_METADATA).write_text(json.dumps({"format": ADAPTER_FORMAT, **metadata}, indent=2))
    return directory


def lora_config_dict(config: LoraConfig) -> dict[str, Any]:
    """``config`` as JSON-ready values (sets become sorted lists, the peft type its string)."""
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def read_adapter_metadata(directory: str | Path) -> dict[str, Any]:
    """Our metadata (``gdpo_sr.json``) of an adapter folder; ValueError when it is not one of ours."""
    directory = Path(directory)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, OUR_METADATA):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not a GDPO-SR adapter folder: {name} is missing")
    meta = json.loads((directory / OUR_METADATA).read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{directory}: adapter format {meta.get('format')!r}, this version reads {ADAPTER_FORMAT!r}")
    return meta


def read_adapter_folder(directory: str | Path, adapter: str) -> tuple[dict[str, Tensor], dict[str, Any], dict]:
    """(tensors under our names for ``adapter``, peft's adapter_config.json, our metadata)."""
    directory = Path(directory)
    meta = read_adapter_metadata(directory)
    peft_config = json.loads((directory / PEFT_CONFIG).read_text())
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{directory}/{PEFT_CONFIG}: peft_type {peft_config.get('peft_type')!r}, expected 'LORA'")
    state = from_peft_names(load_file(str(directory / PEFT_WEIGHTS)), adapter, prefix=PEFT_PREFIX)
    return state, peft_config, meta


def find_adapter_folder(path: str | Path) -> Path:
    """The adapter folder at ``path`` or in ``path/adapter`` (a learner checkpoint holds it there)."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / OUR_METADATA).is_file():
            return candidate
    below = [*path.glob(f"*/{OUR_METADATA}"), *path.glob(f"*/*/{OUR_METADATA}")] if path.is_dir() else []
    found = sorted(p.parent for p in below)[:5]
    hint = f"; adapter folders below it: {', '.join(map(str, found))}" if found else ""
    raise ValueError(f"{path} holds no GDPO-SR adapter ({OUR_METADATA} in it or in {path / 'adapter'}){hint}")

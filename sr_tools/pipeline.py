"""The SR pipeline of NAOSD / GDPO-SR behind ``python -m sr_tools.infer`` (the command line is in infer.py).

The pipeline is SPEC section 2 with inference conveniences: the LR image is
bicubic-upscaled by ``--upscale``, padded to a multiple of 8 (replicated
borders) and cropped back; the UNet can run on overlapping latent tiles blended
with Gaussian weights (StableSR / OSEDiff's tiled forward) so large images fit
in memory; the output's colours can be pulled back to the LR's (AdaIN or
wavelet colour fix, as OSEDiff / StableSR).

Noise: every image gets its own CPU generator seeded from ``--seed`` and the
file's stem, so an image's output depends on neither the batch size nor the
other files, and two models run with the same seed see identical noise.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local weights only: never wait on the hub

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from common.naosd import NAOSD, ModelConfig, q_sample
from common.tiny import model_notice
from sr_data.images import ImageError, load_rgb, save_image

ColorFix = Literal["adain", "wavelet", "none"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which weights to run: the tiny default (trained, or random with ``tiny_random``), or SD 2.1-base +
    NAOSD/GDPO-SR weights + our adapter."""

    name: str = "model"
    sd_path: str = ""
    naosd_path: str = ""
    adapter: str = ""
    tiny_seed: int = 0
    tiny_random: bool = False  # the tiny architecture with random weights (seeded by tiny_seed)

    @property
    def is_tiny(self) -> bool:
        return not self.sd_path

    @property
    def source(self) -> str:
        if not self.is_tiny:
            return "pretrained"
        return "tiny_random" if self.tiny_random else "tiny"

    def __post_init__(self) -> None:
        if self.tiny_random and (self.naosd_path or self.sd_path):
            raise ValueError("tiny_random takes no weights (naosd_path/sd_path)")


def parse_model_spec(text: str, index: int) -> ModelSpec:
    """``tiny`` (trained), ``tiny_random[:SEED]``, or ``name=N,sd=PATH,naosd=PATH,adapter=PATH`` (all optional).

    Without ``sd``, ``naosd`` is a folder of the tiny architecture (e.g. a pre-training output).
    """
    if text == "tiny":
        return ModelSpec(name="tiny")
    if text == "tiny_random" or text.startswith("tiny_random:"):
        seed = int(text.partition(":")[2] or 0)
        return ModelSpec(name=f"tiny_random{seed}", tiny_seed=seed, tiny_random=True)
    keys = {"name": "name", "sd": "sd_path", "naosd": "naosd_path", "adapter": "adapter", "tiny_seed": "tiny_seed"}
    fields: dict[str, object] = {"name": f"model{index}"}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in keys:
            raise ValueError(f"model spec item {item!r}: expected key=value with key in {sorted(keys)}")
        fields[keys[key.strip()]] = int(value) if key.strip() == "tiny_seed" else value.strip()
    return ModelSpec(**fields)


@dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Sampling knobs; tile sizes are in latent pixels (1 latent pixel = 8 image pixels)."""

    upscale: int = 4
    t_add: int = 250
    seed: int = 42
    prompt: str = ""
    color_fix: ColorFix = "adain"
    tile_size: int = 96  # 0: never tile
    tile_overlap: int = 32
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"tile_overlap must lie in [0, tile_size={self.tile_size}), got {self.tile_overlap}")
        if self.tile_size < 0 or self.batch_size < 1:
            raise ValueError("tile_size must be >= 0 and batch_size >= 1")
        if self.color_fix not in ("adain", "wavelet", "none"):
            raise ValueError(f"color_fix must be adain, wavelet or none, got {self.color_fix!r}")


@dataclass
class InferReport:
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> reason


# --- model -------------------------------------------------------------------------------------


def load_model(spec: ModelSpec, *, t_add: int = 250, device: str = "cpu", dtype: str = "float32") -> NAOSD:
    """Build NAOSD from ``spec`` (printing the tiny-model notice when it is the tiny one)."""
    from common.weights import build_naosd, load_adapter

    notice = model_notice(spec.source, spec.naosd_path)
    if notice:
        print(notice, file=sys.stderr)
    config = ModelConfig(source=spec.source, sd_path=spec.sd_path, naosd_path=spec.naosd_path,
                         tiny_seed=spec.tiny_seed, t_add=t_add, dtype=dtype)  # fmt: skip
    model = build_naosd(config, device=device)
    if spec.adapter:
        load_adapter(model.unet, spec.adapter)
    return model.requires_grad_(False).eval()


# --- one batch ---------------------------------------------------------------------------------


def image_seed(seed: int, stem: str) -> int:
    """A per-image seed from the run seed and the file stem (stable across runs and batchings)."""
    return (seed * 1_000_003 + zlib.crc32(stem.encode())) % (2**63)


@torch.no_grad()
def super_resolve(
    model: NAOSD, lr: Tensor, text_emb: Tensor, generators: Sequence[torch.Generator], config: InferConfig
) -> Tensor:
    """LR ``[B, 3, h, w]`` in [0, 1] -> SR ``[B, 3, h*upscale, w*upscale]`` in [0, 1].

    ``text_emb`` is ``[1, 77, D]`` (shared) or ``[B, 77, D]``; one generator per image.
    """
    device = model.alphas_cumprod.device
    up = F.interpolate(lr.float(), scale_factor=config.upscale, mode="bicubic", align_corners=False).clamp(0, 1)
    h, w = up.shape[-2:]
    padded = F.pad(up, (0, -w % 8, 0, -h % 8), mode="replicate")  # SD's VAE downsamples by 8 (the tiny one by 4)
    z_lr = model.encode((padded * 2 - 1).to(device), list(generators)).float()
    eps = model.noise(z_lr.shape, list(generators))  # fresh noise per image (SPEC section 2)
    z_noisy = q_sample(z_lr, eps, model.abar(model.t_add))
    emb = text_emb.expand(lr.shape[0], -1, -1) if text_emb.shape[0] == 1 else text_emb
    z_sr = tiled_denoise(model, z_noisy, emb, config.tile_size, config.tile_overlap)
    sr = (model.decode(z_sr).float()[..., :h, :w] + 1) / 2
    return color_fix(sr, up.to(sr.device), config.color_fix).clamp(0, 1)


def tiled_denoise(model: NAOSD, z_noisy: Tensor, text_emb: Tensor, tile_size: int, overlap: int) -> Tensor:
    """One-step denoise of ``[B, 4, h, w]`` latents, the UNet run on Gaussian-blended tiles when large.

    Blending the noise estimate is the same as blending the denoised latents: the
    one-step formula is affine in ``eps_hat``.
    """
    h, w = z_noisy.shape[-2:]
    if tile_size <= 0 or (h <= tile_size and w <= tile_size):
        return model.denoise(z_noisy, text_emb).float()
    eps_hat = tiled_apply(
        lambda tile: model.predict_noise(tile, model.t_diff, text_emb).float(), z_noisy, tile_size, overlap
    )
    abar = model.abar(model.t_diff)
    return (z_noisy - (1 - abar).sqrt() * eps_hat) / abar.sqrt()


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile_size: int, overlap: int) -> Tensor:
    """``fn`` on overlapping ``tile_size`` tiles of ``x`` ``[B, C, h, w]``, stitched with Gaussian weights.

    ``fn`` maps ``[B, C, th, tw]`` to the same shape.  Weights peak at a tile's centre,
    so each output pixel leans on the tile that saw most context around it; seams fade.
    """
    h, w = x.shape[-2:]
    th, tw = min(tile_size, h), min(tile_size, w)
    weight = gaussian_tile_weights(th, tw).to(x)
    out = torch.zeros_like(x, dtype=torch.float32)
    total = torch.zeros((h, w), dtype=torch.float32, device=x.device)
    for top in tile_starts(h, th, overlap):
        for left in tile_starts(w, tw, overlap):
            window = (..., slice(top, top + th), slice(left, left + tw))
            out[window] += fn(x[window]).float() * weight
            total[top : top + th, left : left + tw] += weight
    return out / total


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` shared pixels."""
    if tile >= length:
        return [0]
    stride = max(tile - overlap, 1)
    return [*range(0, length - tile, stride), length - tile]


def gaussian_tile_weights(height: int, width: int, var: float = 0.01) -> Tensor:
    """``[height, width]`` separable Gaussian, sigma = sqrt(var) of the tile side (OSEDiff's weights).

    OSEDiff centres the vertical profile at ``height / 2``; we centre both at ``(n - 1) / 2``.
    """

    def profile(n: int) -> Tensor:
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * var))

    return torch.outer(profile(height), profile(width)).float()


# --- colour fix (OSEDiff / StableSR) -----------------------------------------------------------


def color_fix(target: Tensor, source: Tensor, method: ColorFix) -> Tensor:
    """Match the colours of ``target`` ``[B, 3, H, W]`` to ``source`` (same shape), both in [0, 1]."""
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    return target


def adain_color_fix(target: Tensor, source: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel mean/std of ``target`` replaced by ``source``'s (adaptive instance normalisation)."""
    t_mean, t_std = _mean_std(target, eps)
    s_mean, s_std = _mean_std(source, eps)
    return (target - t_mean) / t_std * s_std + s_mean


def _mean_std(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def wavelet_color_fix(target: Tensor, source: Tensor, levels: int = 5) -> Tensor:
    """``target``'s high frequencies + ``source``'s low frequencies (a 5-level a-trous decomposition)."""
    high, _ = wavelet_decompose(target, levels)
    _, low = wavelet_decompose(source, levels)
    return high + low


def wavelet_decompose(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """``(high, low)`` with ``high + low == x``: a-trous 3x3 binomial blurs at dilations 1, 2, 4, ..."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=x.device, dtype=x.dtype) / 16
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    high = torch.zeros_like(x)
    for level in range(levels):
        radius = 2**level
        # kornia's filter2d has no dilation; a dilated grouped conv is the a-trous step itself
        low = F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, groups=x.shape[1], dilation=radius)
        high = high + (x - low)
        x = low
    return high, x


# --- folders -----------------------------------------------------------------------------------


def run_inference(
    model: NAOSD, inputs: Sequence[Path], out_dir: str | Path, config: InferConfig, *, progress: bool = True
) -> InferReport:
    """Super-resolve ``inputs`` into ``out_dir/<stem>.png``; unreadable files are skipped and reported."""
    out_dir = Path(out_dir)
    report = InferReport()
    text_emb = model.encode_prompts([config.prompt])
    batches = list(_batches(inputs, config.batch_size, report))
    for batch in tqdm(batches, desc="super-resolving", unit="batch", disable=not progress):
        lr = torch.stack([image for _, image in batch])
        gens = [torch.Generator().manual_seed(image_seed(config.seed, path.stem)) for path, _ in batch]
        sr = super_resolve(model, lr, text_emb, gens, config)
        for (path, _), image in zip(batch, sr, strict=True):
            report.written.append(save_image(image, out_dir / f"{path.stem}.png"))
    return report


def _batches(inputs: Sequence[Path], batch_size: int, report: InferReport):
    """Batches of ``(path, [3, h, w])``, each batch one image size; unreadable files go to ``report``."""
    by_size: dict[tuple[int, ...], list[tuple[Path, Tensor]]] = {}
    for path in inputs:  # images are small LR inputs; holding one folder's worth in memory is fine
        try:
            image = load_rgb(path).tensor
        except ImageError as err:
            report.skipped[path.name] = str(err)
            print(f"skipped {path.name}: {err}", file=sys.stderr)
            continue
        by_size.setdefault(tuple(image.shape), []).append((path, image))
    for group in by_size.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]

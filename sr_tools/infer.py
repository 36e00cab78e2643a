"""Super-resolve images with NAOSD / GDPO-SR: ``python -m sr_tools.infer INPUT -o OUTPUT``.

The command line only: torch, diffusers and the model are imported after the arguments are parsed, so
``--help`` and usage errors answer at once.  The pipeline itself is :mod:`sr_tools.pipeline`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local weights only: never wait on the hub

if TYPE_CHECKING:
    from sr_tools.pipeline import InferConfig, ModelSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sr_tools.infer",
        description="One-step diffusion SR with NAOSD / GDPO-SR. The UNet runs on latent tiles for large "
        "images; the VAE encode/decode is NOT tiled yet, so very large outputs need the memory of a full-size "
        "VAE pass.",
    )
    parser.add_argument("input", help="an LR image file or a folder of them")
    parser.add_argument("-o", "--output", required=True, help="folder for the SR images (<stem>.png)")
    parser.add_argument("--sd-path", default="", help="local SD 2.1-base diffusers folder")
    parser.add_argument("--naosd-path", default="", help="merged NAOSD/GDPO-SR folder or NAOSD checkpoint file")
    parser.add_argument("--adapter", default="", help="a GDPO-SR adapter folder (safetensors + JSON)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny trained model (default without --sd-path; --naosd-path alone: a tiny folder)")
    parser.add_argument("--tiny-random", action="store_true", help="the tiny architecture with random weights")
    parser.add_argument("--tiny-seed", type=int, default=0, help="seed of --tiny-random")
    parser.add_argument("--t-add", type=int, default=250, help="noise timestep: 150 faithful .. 350 generative")
    parser.add_argument("--seed", type=int, default=42, help="same seed, same output")
    parser.add_argument("--upscale", type=int, default=4, help="output size = LR size x this (bicubic first)")
    parser.add_argument("--prompt", default="", help="text prompt for every image (default: empty)")
    parser.add_argument("--color-fix", choices=("adain", "wavelet", "none"), default="adain")
    parser.add_argument("--tile-size", type=int, default=96, help="UNet latent tile size (0: no tiling)")
    parser.add_argument("--tile-overlap", type=int, default=32, help="latent overlap between tiles")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward (same-size images only)")
    parser.add_argument("--device", default="", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    return parser


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    from sr_tools.pipeline import ModelSpec

    if (args.tiny or args.tiny_random) and args.sd_path:
        raise ValueError("--tiny/--tiny-random cannot be combined with --sd-path")
    return ModelSpec(sd_path=args.sd_path, naosd_path=args.naosd_path, adapter=args.adapter, tiny_seed=args.tiny_seed,
                     tiny_random=args.tiny_random)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> InferConfig:
    from sr_tools.pipeline import InferConfig

    return InferConfig(
        upscale=args.upscale,
        t_add=args.t_add,
        seed=args.seed,
        prompt=args.prompt,
        color_fix=args.color_fix,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        batch_size=args.batch_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors answer here, before torch is imported
    from sr_data.images import list_images
    from sr_tools.pipeline import load_model, run_inference

    try:
        config, spec = config_from_args(args), spec_from_args(args)
        inputs = list_images(args.input)
        model = load_model(spec, t_add=config.t_add, device=default_device(args.device), dtype=args.dtype)
    except ValueError as err:
        parser.error(str(err))
    if not inputs:
        parser.error(f"no images found in {args.input}")
    report = run_inference(model, inputs, args.output, config)
    print(f"wrote {len(report.written)} image(s) to {args.output}; skipped {len(report.skipped)}")
    return 1 if report.skipped and not report.written else 0


def default_device(device: str) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())

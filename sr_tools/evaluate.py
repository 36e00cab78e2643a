"""Evaluate SR against HR folders in the paper's table layout: ``python -m sr_tools.evaluate``.

Two modes:
- ``--sr DIR --hr DIR``: score existing SR images (pairs matched by file stem);
- ``--lr DIR --hr DIR --model SPEC ...`` (or ``--compare A B``): super-resolve
  the LR folder with each model, for ``--seeds N`` seeds, then score.

The command line only: torch and pyiqa are imported after the arguments are parsed, so ``--help`` and
usage errors (an unknown ``--metrics`` name, an empty folder) answer at once and exit with code 2.  What
is scored and written, and the choices that change numbers, are in :mod:`sr_tools.scoring`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING

from sr_tools.infer import default_device

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from sr_tools.pipeline import ModelSpec

PAPER_METRICS = ("psnr", "ssim", "lpips", "dists", "fid", "maniqa", "musiq", "clipiqa")  # the paper's table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr_tools.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hr", required=True, help="folder of HR (ground-truth) images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sr", help="folder of SR images to score (matched to HR by file stem)")
    source.add_argument("--lr", help="folder of LR images: super-resolve with --model/--compare, then score")
    parser.add_argument("--model", action="append", default=[], metavar="SPEC",
                        help="with --lr: 'tiny', 'tiny_random:SEED' or 'name=N,sd=D,naosd=D,adapter=D'")  # fmt: skip
    parser.add_argument("--compare", nargs=2, metavar="SPEC", help="two model specs, run with identical noise")
    parser.add_argument("--name", default="", help="row label for --sr (default: the SR folder name)")
    parser.add_argument("--metrics", default=",".join(PAPER_METRICS), help="comma-separated pyiqa metric names")
    parser.add_argument("--weights-dir", default="", help="local folder of metric weights (flat or torch cache)")
    parser.add_argument("--seed", type=int, default=42, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="average over this many seeds (seed, seed+1, ...)")
    parser.add_argument("-o", "--output", "--out", dest="output", default="eval_out",
                        help="folder for SR images and result files (--out: deprecated spelling)")
    parser.add_argument("--t-add", type=int, default=250)
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--color-fix", choices=("adain", "wavelet", "none"), default="adain")
    parser.add_argument("--tile-size", type=int, default=96)
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    return parser


def _model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    from sr_tools.pipeline import parse_model_spec

    texts = list(args.compare or []) + list(args.model)
    if args.lr is None:
        if texts or args.seeds != 1:
            raise ValueError("--model/--compare/--seeds need --lr (with --sr the images already exist)")
        return []
    specs = [parse_model_spec(t, i) for i, t in enumerate(texts or ["tiny"])]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ (they name output folders and rows): {names}")
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors answer here, before torch and pyiqa are imported
    from sr_data.images import list_images
    from sr_tools.iqa import DEFAULT_CONFIGS, create_metrics, local_weights_only
    from sr_tools.pipeline import InferConfig
    from sr_tools.scoring import ResultWriter, evaluate_models, evaluate_sr_folder

    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        specs = _model_specs(args)
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        if not names:
            raise ValueError("--metrics names no metric")
        if unknown := [n for n in names if n not in DEFAULT_CONFIGS]:
            hints = [f"{n} (did you mean {', '.join(close)}?)" if (close := get_close_matches(n, DEFAULT_CONFIGS))
                     else n for n in unknown]  # fmt: skip
            raise ValueError(f"unknown metric(s) in --metrics: {'; '.join(hints)}")
        config = InferConfig(upscale=args.upscale, t_add=args.t_add, prompt=args.prompt, color_fix=args.color_fix,
                             tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                             batch_size=args.batch_size)  # fmt: skip
        for flag, folder in (("--sr", args.sr), ("--lr", args.lr), ("--hr", args.hr)):
            if folder is None:
                continue
            if not Path(folder).is_dir():
                raise ValueError(f"{flag} {folder} is not a folder")
            if not list_images(folder):
                raise ValueError(f"{flag} {folder} holds no images")
    except ValueError as err:
        parser.error(str(err))
    device = default_device(args.device)
    metrics, skipped_metrics = create_metrics(names, weights_dir=args.weights_dir or None, device=device)
    writer = ResultWriter(args.output, names, skipped_metrics)
    # the download hooks stay replaced while scoring too: nothing a metric does lazily may reach the network
    with writer, local_weights_only(args.weights_dir or None):
        if args.sr:
            name = args.name or Path(args.sr).resolve().name
            evaluate_sr_folder(Path(args.sr), Path(args.hr), metrics, writer, name=name, device=device)
        else:
            seeds = [args.seed + k for k in range(args.seeds)]
            evaluate_models(Path(args.lr), Path(args.hr), specs, seeds, config, metrics=metrics, writer=writer,
                            device=device, dtype=args.dtype)  # fmt: skip
    print(writer.format_table())
    for name, reason in skipped_metrics.items():
        print(f"metric {name} skipped: {reason}")
    print(f"results: {writer.out_dir / 'results.json'}, {writer.out_dir / 'results.csv'}, per image: per_image.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

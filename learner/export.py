"""Export a trained model as a merged diffusers folder: ``python -m learner.export --checkpoint PATH --out DIR``.

``PATH`` is either

- a GDPO checkpoint: the folder holding the adapter (``adapter_config.json``,
  ``gdpo_sr.json``...), or a folder with it in ``adapter/`` (a learner
  checkpoint).  The base model is rebuilt from the model config stored in
  ``gdpo_sr.json`` (change a moved path with ``model.sd_path=...``), the adapter
  is loaded and merged into the UNet;
- a merged folder with ``unet/`` and ``vae/``: a NAOSD pre-training export
  (``<output_dir>/naosd``) or an earlier export.  It is read as the tiny
  architecture, or as SD 2.1-base-derived with ``model.sd_path=...`` (where the
  text encoder, tokenizer and scheduler come from).

``DIR`` becomes a diffusers pipeline folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
``model.naosd_path=DIR`` and ``DiffusionPipeline.from_pretrained(DIR)`` load.
Heavy imports wait until after argument parsing, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m learner.export",
        description="Write a merged diffusers model folder (model_index.json, unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/) from a GDPO checkpoint or a NAOSD pre-training export.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a GDPO adapter folder or learner checkpoint (holding adapter/), or a folder with "
                             "unet/ and vae/ (pre-training export)")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist)")
    parser.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE",
                        help="change the base model config, e.g. model.sd_path=/models/sd21-base")  # fmt: skip
    return parser.parse_args(argv)


def model_mapping(checkpoint: Path, overrides: Sequence[str]) -> tuple[dict[str, Any], Path | None]:
    """The ``model`` config mapping to build, and the adapter folder to load on it (None: already merged)."""
    import yaml

    from common.adapter_folder import find_adapter_folder, read_adapter_metadata
    from common.config import set_dotted

    given: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ValueError(f"override {item!r} is not of the form model.KEY=VALUE")
        set_dotted(given, key, yaml.safe_load(raw))
    given = given.get("model", {})
    if (checkpoint / "unet").is_dir() and (checkpoint / "vae").is_dir():
        source = "pretrained" if given.get("sd_path") else "tiny"
        return {"source": source, "naosd_path": str(checkpoint), **given}, None
    adapter = find_adapter_folder(checkpoint)
    stored = read_adapter_metadata(adapter).get("model")
    if stored is None:
        raise ValueError(f"{adapter} does not record the model it was trained on; it cannot be exported alone")
    return {**stored, **given}, adapter


def export(checkpoint: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Write the merged diffusers folder ``out`` from ``checkpoint`` (see the module docstring)."""
    from common.config import from_mapping
    from common.naosd import ModelConfig
    from common.weights import build_naosd, export_merged, load_adapter

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    if out.exists():
        raise ValueError(f"{out} already exists; give a new folder")
    mapping, adapter = model_mapping(checkpoint, overrides)
    model = build_naosd(from_mapping(ModelConfig, mapping, where="model"))
    if adapter is not None:
        load_adapter(model.unet, adapter)
    # else the UNet carries build_naosd's fresh adapter, whose zero B makes the merge exact
    return export_merged(model, out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths only
    try:
        out = export(args.checkpoint, args.out, args.overrides)
    except ValueError as err:
        raise SystemExit(f"export error: {err}") from None
    print(f"merged model written to {out} (load it with model.naosd_path={out})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

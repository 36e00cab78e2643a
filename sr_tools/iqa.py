"""pyiqa metrics for the evaluation CLI, built from local weights only (SPEC sections 7-8).

pyiqa, torchvision, CLIP and timm fetch pretrained weights from the internet on
first use.  :func:`local_weights_only` replaces each of their download entry
points, for the duration of a metric's construction, by a lookup in local
folders (``--weights-dir`` in its flat or torch-cache layout, then the default
torch / pyiqa / CLIP caches); a file found nowhere raises :class:`MissingWeights`
naming the file and the folders searched, and nothing is ever downloaded.
Hash checks of the download path are skipped for local files: the user chose them.

MANIQA builds a timm ViT with ``pretrained=True`` and then loads its own
checkpoint strictly over the whole network (ViT included), so we build that ViT
without pretrained weights: the result is identical and needs no hub cache.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyiqa
import torch
from pyiqa.default_model_configs import DEFAULT_CONFIGS
from torch import Tensor

FOLDER_METRICS = frozenset({"fid"})  # scored between two folders, not per image
Y_CHANNEL = {"test_y_channel": True, "color_space": "ycbcr"}  # SPEC sections 4 and 7
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"psnr": Y_CHANNEL, "ssim": Y_CHANNEL}
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "dists": "DISTS", "fid": "FID",
          "maniqa": "MANIQA", "musiq": "MUSIQ", "clipiqa": "CLIPIQA"}  # fmt: skip


class MissingWeights(RuntimeError):
    """A pretrained file a metric needs is in none of the local folders."""

    def __init__(self, filename: str, searched: Sequence[Path]) -> None:
        self.filename, self.searched = filename, list(searched)
        where = ", ".join(str(p) for p in self.searched)
        super().__init__(f"weights not found at {where} (file {filename})")


def lower_better(name: str) -> bool:
    """Whether a smaller score is better, from pyiqa's metric table."""
    return bool(DEFAULT_CONFIGS.get(name, {}).get("lower_better", False))


def label(name: str) -> str:
    """Column header with the paper's arrow, e.g. ``PSNR↑`` or ``LPIPS↓``."""
    return LABELS.get(name, name.upper()) + ("↓" if lower_better(name) else "↑")


def weight_search_dirs(weights_dir: str | Path | None) -> list[Path]:
    """Folders searched for a weight file, in order: the user's folder (flat or cache layout), then caches."""
    hub = Path(torch.hub.get_dir())
    dirs: list[Path] = []
    if weights_dir:
        root = Path(weights_dir)
        dirs += [root, root / "pyiqa", root / "checkpoints", root / "clip", root / "hub" / "pyiqa",
                 root / "hub" / "checkpoints", root / "hub" / "clip"]  # fmt: skip
    dirs += [hub / "pyiqa", hub / "checkpoints", hub / "clip", Path.home() / ".cache" / "clip"]
    return list(dict.fromkeys(dirs))


@contextmanager
def local_weights_only(weights_dir: str | Path | None) -> Iterator[list[Path]]:
    """Within the block, weight downloads become local look-ups that raise :class:`MissingWeights`."""
    searched = weight_search_dirs(weights_dir)

    def find(url_or_name: str) -> str:
        filename = os.path.basename(urlparse(url_or_name).path) or url_or_name
        for folder in searched:
            if (folder / filename).is_file():
                return str(folder / filename)
        raise MissingWeights(filename, searched)

    def load_file_from_url(url: str, model_dir: str | None = None, progress: bool = True, file_name=None) -> str:
        return find(file_name or url)

    def load_state_dict_from_url(url: str, model_dir: str | None = None, map_location: Any = None, *args: Any,
                                 **kwargs: Any) -> dict:  # fmt: skip
        # torch.hub's later parameters: progress, check_hash, file_name, weights_only.  Metric
        # checkpoints are plain state dicts: never unpickle objects, whatever the caller asks.
        file_name = kwargs.get("file_name", args[2] if len(args) > 2 else None)
        return torch.load(find(file_name or url), map_location=map_location, weights_only=True)

    def refuse_download(url: str, *args: Any, **kwargs: Any) -> None:
        raise MissingWeights(os.path.basename(urlparse(url).path), searched)

    replacements = {
        "load_file_from_url": load_file_from_url,
        "load_state_dict_from_url": load_state_dict_from_url,
        "download_url_to_file": refuse_download,
        "_download": lambda url, root: find(url),  # CLIP's downloader (pyiqa's copy and openai-clip's)
    }
    undo = _patch_modules(replacements)
    try:
        yield searched
    finally:
        for module, attr, original in reversed(undo):
            setattr(module, attr, original)


_PATCHED_PACKAGES = ("pyiqa", "torchvision", "torch.hub", "clip")


def _patch_modules(replacements: Mapping[str, Any]) -> list[tuple[types.ModuleType, str, Any]]:
    """Replace the named download functions in every loaded module of the packages that download weights."""
    undo = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(_PATCHED_PACKAGES):
            continue
        for attr, new in replacements.items():
            if attr == "_download" and "clip" not in name:  # only CLIP's downloader is called that
                continue
            original = module.__dict__.get(attr)
            if callable(original) and not isinstance(original, type):
                undo.append((module, attr, original))
                setattr(module, attr, new)
    maniqa = sys.modules.get("pyiqa.archs.maniqa_arch")
    if maniqa is not None and hasattr(maniqa, "timm"):
        undo.append((maniqa, "timm", maniqa.timm))
        maniqa.timm = types.SimpleNamespace(create_model=_timm_without_pretrained(maniqa.timm))
    return undo


def _timm_without_pretrained(timm: types.ModuleType):
    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)  # MANIQA's checkpoint overwrites it all

    return create_model


def _import_arch(name: str) -> None:
    """Import the metric's pyiqa arch module before patching, so its download functions get patched too."""
    arch_type = DEFAULT_CONFIGS[name]["metric_opts"]["type"]
    with suppress(Exception):  # a private pyiqa helper: if it moves, patching still covers loaded modules
        pyiqa.archs._lazy_import_arch(arch_type)
    if "clip" in name:
        with suppress(Exception):
            importlib.import_module("pyiqa.archs.clip_model")  # CLIPIQA's downloader lives here


@dataclass
class Metric:
    """One pyiqa metric; images are ``[B, 3, H, W]`` in [0, 1]."""

    name: str
    model: torch.nn.Module

    @property
    def lower_better(self) -> bool:
        return lower_better(self.name)

    @property
    def per_folder(self) -> bool:
        return self.name in FOLDER_METRICS

    @property
    def full_reference(self) -> bool:
        return DEFAULT_CONFIGS[self.name].get("metric_mode") == "FR"

    @torch.no_grad()
    def score(self, sr: Tensor, hr: Tensor) -> float:
        """Score of one SR image ``[1, 3, H, W]`` against its HR; PSNR of identical Y channels is ``inf``.

        pyiqa adds 1e-8 to the MSE, which caps PSNR at 80 dB; an exact match is
        reported as infinite instead, so it is never mistaken for a real score.
        """
        if self.name == "psnr" and identical_y(sr, hr):
            return math.inf
        out = self.model(sr, hr) if self.full_reference else self.model(sr)
        return float(torch.as_tensor(out).flatten()[0])

    @torch.no_grad()
    def score_folders(self, sr_dir: Path, hr_dir: Path, device: str = "cpu") -> float:
        """A set-level score between two folders (FID)."""
        return float(self.model(str(sr_dir), str(hr_dir), num_workers=0, verbose=False, device=torch.device(device)))


def identical_y(sr: Tensor, hr: Tensor) -> bool:
    """Whether the BT.601 Y channels (what PSNR-Y reads) of ``[B, 3, H, W]`` images are equal."""
    from pyiqa.utils.color_util import to_y_channel

    return sr.shape == hr.shape and torch.equal(to_y_channel(sr, 1.0, "ycbcr"), to_y_channel(hr, 1.0, "ycbcr"))


def create_metric(name: str, *, weights_dir: str | Path | None = None, device: str = "cpu", **options: Any) -> Metric:
    """Build pyiqa metric ``name`` from local weights; raises :class:`MissingWeights` or ``ValueError``."""
    if name not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown pyiqa metric {name!r}; see pyiqa.list_models()")
    _import_arch(name)
    with local_weights_only(weights_dir):
        model = pyiqa.create_metric(name, device=torch.device(device), **{**DEFAULT_OPTIONS.get(name, {}), **options})
    return Metric(name, model.eval())


def create_metrics(
    names: Sequence[str],
    *,
    weights_dir: str | Path | None = None,
    device: str = "cpu",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Metric], dict[str, str]]:
    """``(metrics, skipped)``: every metric that could be built, and ``{name: reason}`` for the rest.

    A metric that fails to build (missing weights, an offline hub error, an
    unknown name) is reported and skipped; the others still run.
    """
    metrics: dict[str, Metric] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            metrics[name] = create_metric(name, weights_dir=weights_dir, device=device, **(options or {}).get(name, {}))
        except MissingWeights as err:
            skipped[name] = str(err)
        except Exception as err:  # pyiqa raises many types (OSError from the hub, RuntimeError, KeyError)
            skipped[name] = f"could not build: {type(err).__name__}: {err}"
        if name in skipped:
            print(f"metric {name} skipped: {skipped[name]}", file=sys.stderr)
    return metrics, skipped

"""Image-quality metrics as plain callables: a Protocol, pyiqa wrappers, and strictly offline weights.

The one explicit name table is :data:`PYIQA_METRICS` (config name -> pyiqa metric and the files it
needs).  Weights are never downloaded: each file is looked up in ``weights_dir`` and in pyiqa's /
torch hub's caches, and a missing one raises ValueError naming the file and where to put it.  While a
metric is built, the download functions pyiqa and torchvision use are replaced by one that raises,
so an unexpected fetch fails loudly instead of reaching the network.
"""

from __future__ import annotations

import contextlib
import logging
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from reward_service.config import PAPER_FR_METRICS, PAPER_NR_METRICS, RewardConfig

log = logging.getLogger(__name__)


class Metric(Protocol):
    """A quality metric over a batch: ``metric(sr [B,3,H,W], hr [B,3,H,W]) -> raw scores [B]``.

    Images are float in [0, 1].  No-reference metrics ignore ``hr``.
    """

    name: str
    full_reference: bool
    lower_better: bool
    score_range: tuple[float, float]  # typical raw range, for range-normalised (absolute) rewards

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class MetricFn:
    """Any function as a :class:`Metric` (tests, custom rewards)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    full_reference: bool = False
    lower_better: bool = False
    score_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.fn(sr, hr)


@dataclass(frozen=True)
class PyiqaSpec:
    """How to build one pyiqa metric offline."""

    pyiqa_name: str
    options: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None  # the file pyiqa would download; loaded from a local path instead
    backbone: str | None = None  # a torchvision file the architecture fetches itself (torch hub layout)
    checkpoint_has_backbone: bool = False  # the checkpoint carries the backbone: skip its ImageNet init
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # same values as pyiqa's, computed cheaper


def pyiqa_entropy(x: torch.Tensor) -> torch.Tensor:
    """pyiqa's ``entropy`` metric, [B, 3, H, W] in [0, 1] -> [B], without its [B, H*W, 256] int64 one-hot.

    Same steps (Y of YIQ scaled to 0..255 and rounded, 256-bin histogram, ``log2(p + 1e-8)``), so the
    same numbers; pyiqa's version needs 2 KiB per pixel (0.5 GiB for one 512x512 image).
    """
    from pyiqa.utils.color_util import to_y_channel

    y = to_y_channel(x, 255.0, "yiq").long().flatten(1)  # [B, H*W] in 0..255
    ones = torch.ones(1, dtype=torch.int64, device=y.device).expand_as(y)
    hist = torch.zeros(y.shape[0], 256, dtype=torch.int64, device=y.device).scatter_add_(1, y, ones)
    p = hist / hist.sum(dim=1, keepdim=True)
    return -torch.sum(p * torch.log2(p + 1e-8), dim=1)


PYIQA_METRICS: dict[str, PyiqaSpec] = {
    # SPEC 4: Y of BT.601 YCbCr, data range 1, no border crop.
    "psnr_y": PyiqaSpec("psnr", (("test_y_channel", True), ("color_space", "ycbcr"))),
    "musiq": PyiqaSpec("musiq", checkpoint="musiq_koniq_ckpt-e95806b9.pth"),  # KonIQ
    "maniqa": PyiqaSpec("maniqa", checkpoint="ckpt_koniq10k.pt", checkpoint_has_backbone=True),  # KonIQ
    "lpips": PyiqaSpec("lpips", checkpoint="LPIPS_v0.1_alex-df73285e.pth", backbone="alexnet-owt-7be5be79.pth"),
    # OARS's fidelity (SPEC section 10): DISTS on torchvision's ImageNet VGG16.
    "dists": PyiqaSpec("dists", checkpoint="DISTS_weights-f5e65c96.pth", backbone="vgg16-397923af.pth"),
    # No weights at all: the offline stand-ins of the tiny config.
    "piqe": PyiqaSpec("piqe"),
    "entropy": PyiqaSpec("entropy", forward=pyiqa_entropy),
    "ssim": PyiqaSpec("ssim"),
}


class PyiqaMetric:
    """A built pyiqa ``InferenceModel`` called in batches of ``batch_size`` under inference mode."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        *,
        batch_size: int = 32,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.forward = forward  # replaces the NR model call when set (identical scores)
        self.batch_size = batch_size
        self.full_reference = model.metric_mode == "FR"
        self.lower_better = bool(model.lower_better)
        self.score_range = parse_score_range(model.score_range)

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """sr, hr [B, 3, H, W] float in [0, 1] -> [B] float64 raw scores (on the CPU)."""
        device = getattr(self.model, "device", "cpu")  # pyiqa's InferenceModel records where it lives
        out = []
        with torch.inference_mode():
            for i in range(0, sr.shape[0], self.batch_size):
                x = sr[i : i + self.batch_size].to(device, torch.float32)
                ref = hr[i : i + self.batch_size].to(device, torch.float32) if self.full_reference else None
                if self.full_reference:
                    score = self.model(x, ref)
                else:
                    score = self.forward(x) if self.forward is not None else self.model(x)
                out.append(score.reshape(-1).to("cpu", torch.float64))
        scores = torch.cat(out)
        if scores.shape[0] != sr.shape[0]:
            raise RuntimeError(f"metric {self.name}: {scores.shape[0]} scores for {sr.shape[0]} images")
        return scores


def build_metrics(config: RewardConfig) -> list[Metric]:
    """The metrics of ``config.metric_names`` (FR then NR), built offline; logs when they are not the paper's."""
    if not config.is_paper_setup:
        log.warning(
            "reward metrics FR=%s NR=%s are NOT the paper's (FR %s, NR %s): no-download stand-ins whose "
            "scores and rewards are not comparable with the paper",
            list(config.fr_metrics),
            list(config.nr_metrics),
            list(PAPER_FR_METRICS),
            list(PAPER_NR_METRICS),
        )
    metrics = [build_pyiqa_metric(name, config) for name in config.metric_names]
    for metric in metrics:
        expected = metric.name in config.fr_metrics
        if metric.full_reference != expected:
            kind = "full-reference" if metric.full_reference else "no-reference"
            raise ValueError(
                f"metric {metric.name!r} is {kind}; list it under {'fr' if metric.full_reference else 'nr'}_metrics"
            )
    return metrics


def build_pyiqa_metric(name: str, config: RewardConfig) -> PyiqaMetric:
    """One metric of :data:`PYIQA_METRICS`, weights from local files only."""
    spec = PYIQA_METRICS.get(name)
    if spec is None:
        raise ValueError(f"unknown reward metric {name!r}; known: {sorted(PYIQA_METRICS)}")
    import pyiqa  # heavy (torchvision, timm): imported only when a metric is built

    kwargs = dict(spec.options)
    checkpoint = _require(spec.checkpoint, name, config.weights_dir) if spec.checkpoint else None
    if checkpoint is not None and not spec.checkpoint_has_backbone:
        kwargs["pretrained_model_path"] = str(checkpoint)
    if spec.checkpoint_has_backbone:
        kwargs["pretrained"] = False  # pyiqa would fetch the checkpoint by URL; it is loaded below instead
    hub_dir = _backbone_hub_dir(spec.backbone, name, config.weights_dir) if spec.backbone else None
    with _no_downloads(name, config.weights_dir), _torch_hub_dir(hub_dir), _timm_without_pretrained(spec):
        model = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(config.device), **kwargs)
    if spec.checkpoint_has_backbone and checkpoint is not None:
        from pyiqa.archs.arch_util import load_pretrained_network

        load_pretrained_network(model.net, str(checkpoint), strict=True)  # the same call pyiqa makes after download
    model.eval()
    return PyiqaMetric(name, model, batch_size=config.metric_batch_size, forward=spec.forward)


def parse_score_range(text: object) -> tuple[float, float]:
    """pyiqa's ``score_range`` (e.g. ``'~0, ~100'``) -> (0.0, 100.0); (nan, nan) when open-ended or absent."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", str(text or ""))
    if len(nums) != 2:
        return (float("nan"), float("nan"))
    return (float(nums[0]), float(nums[1]))


def search_dirs(weights_dir: str) -> list[Path]:
    """Where weight files are looked up, in order: weights_dir, weights_dir/checkpoints, pyiqa's cache, torch hub."""
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    dirs = [Path(weights_dir), Path(weights_dir) / "checkpoints"] if weights_dir else []
    return [*dirs, Path(DEFAULT_CACHE_DIR), Path(torch.hub.get_dir()) / "checkpoints"]


def _require(filename: str, metric: str, weights_dir: str) -> Path:
    for folder in search_dirs(weights_dir):
        if (folder / filename).is_file():
            return folder / filename
    raise ValueError(_missing_message(filename, metric, weights_dir))


def _missing_message(filename: str, metric: str, weights_dir: str) -> str:
    from pyiqa.archs.arch_util import get_url_from_name

    places = ", ".join(str(d) for d in search_dirs(weights_dir))
    return (
        f"reward metric {metric!r} needs the weights file {filename!r}, which is never downloaded. "
        f"Copy it (published at {get_url_from_name(filename)}) into reward.weights_dir "
        f"({weights_dir or 'not set'}) or into one of: {places}"
    )


def _backbone_hub_dir(filename: str, metric: str, weights_dir: str) -> str | None:
    """The torch hub dir whose checkpoints/ holds ``filename`` (None: the default one already does)."""
    if (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file():
        return None
    if weights_dir and (Path(weights_dir) / "checkpoints" / filename).is_file():
        return weights_dir
    raise ValueError(
        f"reward metric {metric!r} needs the torchvision backbone file {filename!r}, which is never downloaded. "
        f"Put it in {Path(weights_dir or '<weights_dir>') / 'checkpoints'} "
        f"or {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )


@contextlib.contextmanager
def _no_downloads(metric: str, weights_dir: str) -> Iterator[None]:
    """Replace the download functions pyiqa and torchvision use by one raising ValueError."""
    import pyiqa.utils.download_util as pyiqa_download

    def refuse(url: str, dst: str, *args: object, **kwargs: object) -> None:
        name = Path(urlparse(url).path).name
        raise ValueError(
            f"reward metric {metric!r} tried to download {url}; downloads are disabled. "
            f"Place {name!r} at {dst} (or in reward.weights_dir={weights_dir or 'not set'})"
        )

    saved = (torch.hub.download_url_to_file, pyiqa_download.download_url_to_file)
    torch.hub.download_url_to_file = refuse
    pyiqa_download.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file, pyiqa_download.download_url_to_file = saved


@contextlib.contextmanager
def _torch_hub_dir(path: str | None) -> Iterator[None]:
    """torchvision finds backbone files under <hub dir>/checkpoints; point it at weights_dir for the build."""
    if path is None:
        yield
        return
    saved = torch.hub.get_dir()
    torch.hub.set_dir(path)
    try:
        yield
    finally:
        torch.hub.set_dir(saved)


@contextlib.contextmanager
def _timm_without_pretrained(spec: PyiqaSpec) -> Iterator[None]:
    """MANIQA asks timm for an ImageNet ViT (a hub download) that its own checkpoint overwrites: skip it."""
    if not spec.checkpoint_has_backbone:
        yield
        return
    from pyiqa.archs import maniqa_arch

    timm = maniqa_arch.timm

    def create_model(*args: object, **kwargs: object) -> torch.nn.Module:
        return timm.create_model(*args, **{**kwargs, "pretrained": False})

    maniqa_arch.timm = types.SimpleNamespace(create_model=create_model)  # only maniqa_arch's reference
    try:
        yield
    finally:
        maniqa_arch.timm = timm

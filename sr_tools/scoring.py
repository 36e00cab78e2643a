"""Scoring SR against HR folders in the paper's table layout, behind ``python -m sr_tools.evaluate``.

Two modes:
- ``--sr DIR --hr DIR``: score existing SR images (pairs matched by file stem);
- ``--lr DIR --hr DIR --model SPEC ...`` (or ``--compare A B``): super-resolve
  the LR folder with each model (``sr_tools.infer``, identical per-image noise for
  every model at a given seed), for ``--seeds N`` seeds, then score.

Outputs in ``--output``: ``per_image.csv`` (appended and flushed image by image, so
a crash keeps every score so far), ``results.json`` and ``results.csv``
(rewritten after each model/seed folder), and the table on stdout.

Choices, documented here because they change numbers:
- PSNR of an exact match is infinite.  It is reported as ``inf`` (JSON: the
  string ``"inf"``), left out of the PSNR mean, and counted in ``n_inf``; a mean
  over only infinite values is ``inf``.  (pyiqa would say 80 dB, an artefact of
  its 1e-8 epsilon.)
- A failed metric on one image is recorded as an error for that image and
  left out of that metric's mean (``n`` counts the images averaged).
- Skipped pairs, each with its reason: missing partner, size mismatch,
  undecodable file, transparency, unsupported mode.  Greyscale and opaque RGBA
  images are converted (see :mod:`sr_data.images`), not skipped.
- Seeds: each seed's folder mean first, then mean and std over seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from sr_data.images import ImageError, index_by_stem, list_images, load_rgb
from sr_tools.iqa import Metric, label
from sr_tools.pipeline import InferConfig, ModelSpec, load_model, run_inference

Pair = tuple[str, Path, Path]  # (stem, sr or lr path, hr path)


@dataclass
class FolderResult:
    """Scores of one SR folder: per metric the finite values, the count of infinities, the errors."""

    values: dict[str, list[float]] = field(default_factory=dict)
    n_inf: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # image stem -> reason
    folder_scores: dict[str, float] = field(default_factory=dict)
    complete: bool = False

    def add(self, name: str, value: float) -> None:
        if math.isinf(value):
            self.n_inf[name] = self.n_inf.get(name, 0) + 1
        else:
            self.values.setdefault(name, []).append(value)

    def summary(self, names: Sequence[str]) -> dict[str, dict]:
        """``{metric: {mean, n, n_inf, errors}}``; mean is over finite values (``inf`` if only infinities)."""
        out = {}
        for name in names:
            if name in self.folder_scores:
                out[name] = {"mean": self.folder_scores[name], "n": 1, "n_inf": 0, "errors": 0}
                continue
            vals, n_inf = self.values.get(name, []), self.n_inf.get(name, 0)
            mean = sum(vals) / len(vals) if vals else (math.inf if n_inf else math.nan)
            out[name] = {"mean": mean, "n": len(vals), "n_inf": n_inf, "errors": self.errors.get(name, 0)}
        return out


# --- pairing -----------------------------------------------------------------------------------


def match_pairs(inputs: Sequence[Path], hrs: Sequence[Path], kind: str = "SR") -> tuple[list[Pair], dict[str, str]]:
    """Pair ``inputs`` with ``hrs`` by file stem; unpaired stems come back as skips with a reason."""
    a, b = index_by_stem(inputs), index_by_stem(hrs)
    pairs = [(stem, a[stem], b[stem]) for stem in sorted(a.keys() & b.keys())]
    skipped = {stem: f"no HR partner for {a[stem].name}" for stem in a.keys() - b.keys()}
    skipped |= {stem: f"no {kind} partner for {b[stem].name}" for stem in b.keys() - a.keys()}
    return pairs, skipped


def load_pair(sr_path: Path, hr_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, 3, H, W]`` SR and HR tensors in [0, 1]; raises ``ImageError`` with the reason."""
    sr, hr = load_rgb(sr_path).tensor, load_rgb(hr_path).tensor
    if sr.shape != hr.shape:
        raise ImageError(f"size mismatch: SR {tuple(sr.shape[1:])} vs HR {tuple(hr.shape[1:])} (H, W)")
    return sr[None], hr[None]


# --- writing -----------------------------------------------------------------------------------


def jsonable(value: object) -> object:
    """Floats for strict JSON: ``inf`` -> ``"inf"`` / ``"-inf"``, NaN -> ``None``; containers recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class ResultWriter:
    """``per_image.csv`` (incremental), ``results.json`` and ``results.csv`` under ``out_dir``."""

    def __init__(self, out_dir: str | Path, metrics: Sequence[str], skipped_metrics: dict[str, str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics, self.skipped_metrics = list(metrics), skipped_metrics
        self.runs: dict[str, dict[str, dict]] = {}  # model -> seed -> folder summary
        self._per_image = (self.out_dir / "per_image.csv").open("w", newline="")
        self._csv = csv.writer(self._per_image)
        self._csv.writerow(["model", "seed", "image", "status", "reason", *self.metrics])

    def image_row(self, model: str, seed: int | None, stem: str, scores: dict[str, object], reason: str = "") -> None:
        status = "skipped" if reason and not scores else "ok"
        cells = [_cell(scores.get(m, "")) for m in self.metrics]
        self._csv.writerow([model, "" if seed is None else seed, stem, status, reason, *cells])
        self._per_image.flush()  # a crash later keeps this row

    def folder_done(self, model: str, seed: int | None, result: FolderResult) -> None:
        entry = {"metrics": result.summary(self.metrics), "skipped_images": result.skipped,
                 "complete": result.complete}  # fmt: skip
        self.runs.setdefault(model, {})["-" if seed is None else str(seed)] = entry  # "-": scored SR, no seed
        self.write_summary()

    def table(self) -> list[dict[str, object]]:
        """One row per model: each metric's mean over seeds (and ``<metric>_std`` over seeds)."""
        rows = []
        for model, seeds in self.runs.items():
            row: dict[str, object] = {"model": model, "seeds": len(seeds)}
            for m in self.metrics:
                means = [s["metrics"][m]["mean"] for s in seeds.values() if not math.isnan(s["metrics"][m]["mean"])]
                row[m] = sum(means) / len(means) if means else math.nan
                row[f"{m}_std"] = _std(means)
            rows.append(row)
        return rows

    def write_summary(self) -> None:
        data = {"metrics": self.metrics, "metrics_skipped": self.skipped_metrics, "table": self.table(),
                "runs": self.runs, "notes": NOTES}  # fmt: skip
        _atomic_write(self.out_dir / "results.json", json.dumps(jsonable(data), indent=2))
        header = ["model", *[label(m) for m in self.metrics]]
        lines = [header] + [[r["model"], *[_cell(r[m], m) for m in self.metrics]] for r in self.table()]
        with (self.out_dir / "results.csv").open("w", newline="") as f:
            csv.writer(f).writerows(lines)

    def format_table(self) -> str:
        """The paper's layout: rows = models, columns = metrics with their arrows; '-' = skipped."""
        header = ["Model", *[label(m) for m in self.metrics]]
        rows = [[str(r["model"]), *[_cell(r[m], m) or "-" for m in self.metrics]] for r in self.table()]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows])

    def close(self) -> None:
        self._per_image.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NOTES = {
    "psnr_inf": "PSNR of identical Y channels is inf: excluded from the mean, counted in n_inf; JSON writes 'inf'",
    "nan": "null = no value (metric skipped or failed on every image)",
}


def _cell(value: object, metric: str = "") -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf"
        return f"{value:.2f}" if metric in ("psnr", "fid", "musiq") else f"{value:.4f}"
    return str(value)


def _std(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # readers never see a half-written summary


# --- scoring -----------------------------------------------------------------------------------


def evaluate_pairs(
    pairs: Sequence[Pair],
    metrics: dict[str, Metric],
    writer: ResultWriter,
    *,
    model: str,
    seed: int | None = None,
    skipped: dict[str, str] | None = None,
    device: str = "cpu",
) -> FolderResult:
    """Score every (SR, HR) pair, row by row; bad pairs become skips.  Folder metrics (FID) run last."""
    result = FolderResult(skipped=dict(skipped or {}))
    for stem, reason in sorted(result.skipped.items()):
        writer.image_row(model, seed, stem, {}, reason)
    usable: list[Pair] = []
    try:
        for stem, sr_path, hr_path in pairs:
            try:
                sr, hr = load_pair(sr_path, hr_path)
            except ImageError as err:
                result.skipped[stem] = str(err)
                writer.image_row(model, seed, stem, {}, str(err))
                continue
            writer.image_row(model, seed, stem, _score_image(sr.to(device), hr.to(device), metrics, result))
            usable.append((stem, sr_path, hr_path))
        _score_folders(usable, metrics, result, device)
        result.complete = True
    finally:  # even on an interrupt, the summary of what was scored reaches the disk
        writer.folder_done(model, seed, result)
    return result


def _score_image(sr: torch.Tensor, hr: torch.Tensor, metrics: dict[str, Metric], result: FolderResult) -> dict:
    scores: dict[str, object] = {}
    for name, metric in metrics.items():
        if metric.per_folder:
            continue
        try:
            value = metric.score(sr, hr)
        except Exception as err:  # one metric failing on one image must not lose the folder
            result.errors[name] = result.errors.get(name, 0) + 1
            scores[name] = f"error: {type(err).__name__}"
            continue
        result.add(name, value)
        scores[name] = value
    return scores


def _score_folders(pairs: Sequence[Pair], metrics: dict[str, Metric], result: FolderResult, device: str) -> None:
    """Set-level metrics over the usable pairs only (linked into temporary folders)."""
    folder_metrics = [m for m in metrics.values() if m.per_folder]
    if not folder_metrics or not pairs:
        return
    with tempfile.TemporaryDirectory() as tmp:
        sr_dir, hr_dir = Path(tmp, "sr"), Path(tmp, "hr")
        sr_dir.mkdir(), hr_dir.mkdir()
        for _, sr_path, hr_path in pairs:
            (sr_dir / sr_path.name).symlink_to(sr_path.resolve())
            (hr_dir / hr_path.name).symlink_to(hr_path.resolve())
        for metric in folder_metrics:
            try:
                result.folder_scores[metric.name] = metric.score_folders(sr_dir, hr_dir, device)
            except Exception as err:
                result.errors[metric.name] = result.errors.get(metric.name, 0) + 1
                print(f"metric {metric.name} failed: {type(err).__name__}: {err}", file=sys.stderr)


# --- modes -------------------------------------------------------------------------------------


def evaluate_sr_folder(
    sr_dir: Path, hr_dir: Path, metrics: dict[str, Metric], writer: ResultWriter, *, name: str, device: str = "cpu"
) -> FolderResult:
    """Score an existing SR folder against the HR folder."""
    pairs, skipped = match_pairs(list_images(sr_dir), list_images(hr_dir), "SR")
    return evaluate_pairs(pairs, metrics, writer, model=name, skipped=skipped, device=device)


def evaluate_models(
    lr_dir: Path,
    hr_dir: Path,
    specs: Sequence[ModelSpec],
    seeds: Sequence[int],
    config: InferConfig,
    *,
    metrics: dict[str, Metric],
    writer: ResultWriter,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """LR -> SR with each model and seed (into ``out/sr/<model>/seed<k>``) -> scores against HR."""
    lr_pairs, skipped = match_pairs(list_images(lr_dir), list_images(hr_dir), "LR")
    for spec in specs:
        model = load_model(spec, t_add=config.t_add, device=device, dtype=dtype)
        for seed in seeds:
            sr_dir = writer.out_dir / "sr" / spec.name / f"seed{seed}"
            seed_config = dataclasses.replace(config, seed=seed)
            report = run_inference(model, [lr for _, lr, _ in lr_pairs], sr_dir, seed_config)
            failed = {Path(n).stem: reason for n, reason in report.skipped.items()}
            pairs = [(s, sr_dir / f"{s}.png", hr) for s, _, hr in lr_pairs if s not in failed]
            evaluate_pairs(pairs, metrics, writer, model=spec.name, seed=seed, skipped=skipped | failed, device=device)
        del model

"""Evaluation: known pairs, infinite PSNR, bad inputs as counted skips, incremental results, offline weights."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data

from sr_data.images import list_images
from sr_tools import iqa
from sr_tools.evaluate import main
from sr_tools.pipeline import parse_model_spec
from sr_tools.scoring import (
    FolderResult,
    ResultWriter,
    evaluate_pairs,
    jsonable,
    match_pairs,
)


@pytest.fixture(scope="module")
def y_metrics() -> dict[str, iqa.Metric]:
    metrics, skipped = iqa.create_metrics(["psnr", "ssim"])
    assert not skipped
    return metrics


def photo(size: int = 64, which: int = 0) -> np.ndarray:
    """``[size, size, 3]`` uint8 real photo."""
    image = (data.astronaut(), data.chelsea(), data.coffee())[which]
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def noised(array: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(array + rng.normal(0, sigma, array.shape), 0, 255).round().astype(np.uint8)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float()[None] / 255


def save(folder: Path, name: str, array: np.ndarray, mode: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(folder / name) if mode else Image.fromarray(array).save(folder / name)


def test_identical_images_give_ssim_1_and_handled_infinite_psnr(y_metrics) -> None:
    hr = to_tensor(photo())
    assert y_metrics["psnr"].score(hr, hr) == math.inf  # pyiqa alone would say 80 dB
    assert math.isclose(y_metrics["ssim"].score(hr, hr), 1.0, abs_tol=1e-6)
    result = FolderResult()
    for value in (math.inf, 30.0, 20.0):
        result.add("psnr", value)
    assert result.summary(["psnr"])["psnr"] == {"mean": 25.0, "n": 2, "n_inf": 1, "errors": 0}
    only_inf = FolderResult()
    only_inf.add("psnr", math.inf)
    assert only_inf.summary(["psnr"])["psnr"]["mean"] == math.inf
    assert jsonable({"a": math.inf, "b": math.nan, "c": [1.5, -math.inf]}) == {
        "a": "inf",
        "b": None,
        "c": [1.5, "-inf"],
    }


def test_shifted_or_noised_images_score_worse(y_metrics) -> None:
    hr = photo()
    slight, strong = to_tensor(noised(hr, 3)), to_tensor(noised(hr, 20))
    shifted = to_tensor(np.roll(hr, 2, axis=1))
    psnr, ssim = y_metrics["psnr"], y_metrics["ssim"]
    ref = to_tensor(hr)
    assert psnr.score(slight, ref) > psnr.score(strong, ref) and ssim.score(slight, ref) > ssim.score(strong, ref)
    assert 35 < psnr.score(slight, ref) < 50  # sigma 3 of 255: about 38.6 dB
    assert psnr.score(shifted, ref) < psnr.score(slight, ref) and ssim.score(shifted, ref) < 0.95


def test_bad_inputs_are_counted_skips_and_good_pairs_are_written(tmp_path: Path, capsys) -> None:
    hr_dir, sr_dir, out = tmp_path / "hr", tmp_path / "sr", tmp_path / "out"
    for i, name in enumerate(["same", "noisy", "missing", "small", "corrupt", "grey", "clear"]):
        save(hr_dir, f"{name}.png", photo(64, i % 3))
    save(sr_dir, "same.png", photo(64, 0))
    save(sr_dir, "noisy.png", noised(photo(64, 1), 10))
    save(sr_dir, "small.png", photo(32, 0))  # size mismatch
    (sr_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    grey = np.asarray(Image.fromarray(photo(64, 2)).convert("L"))
    save(sr_dir, "grey.png", grey, "L")  # converted, scored
    rgba = np.dstack([photo(64, 0), np.full((64, 64), 128, np.uint8)])
    save(sr_dir, "clear.png", rgba, "RGBA")  # transparent: skipped
    save(sr_dir, "extra.png", photo(64, 1))  # no HR partner
    code = main(["--sr", str(sr_dir), "--hr", str(hr_dir), "--metrics", "psnr,ssim,lpips", "-o", str(out),
                 "--weights-dir", str(tmp_path / "no_weights"), "--name", "mine"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "PSNR↑" in printed and "LPIPS↓" in printed and "metric lpips skipped: weights not found at" in printed
    results = json.loads((out / "results.json").read_text())
    run = results["runs"]["mine"]["-"]
    assert set(run["skipped_images"]) == {"missing", "small", "corrupt", "clear", "extra"}
    assert "size mismatch" in run["skipped_images"]["small"] and "transparent" in run["skipped_images"]["clear"]
    assert "no SR partner" in run["skipped_images"]["missing"] and "no HR partner" in run["skipped_images"]["extra"]
    assert run["metrics"]["psnr"]["n"] == 2 and run["metrics"]["psnr"]["n_inf"] == 1  # noisy + grey; same = inf
    assert run["metrics"]["ssim"]["n"] == 3 and run["complete"]
    assert (
        run["metrics"]["lpips"]["mean"] is None and str(tmp_path / "no_weights") in results["metrics_skipped"]["lpips"]
    )
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    status = {r["image"]: r["status"] for r in rows}
    assert status == {"same": "ok", "noisy": "ok", "grey": "ok", "missing": "skipped", "small": "skipped",
                      "corrupt": "skipped", "clear": "skipped", "extra": "skipped"}  # fmt: skip
    assert next(r for r in rows if r["image"] == "same")["psnr"] == "inf"
    table = list(csv.reader((out / "results.csv").open()))
    assert table[0] == ["model", "PSNR↑", "SSIM↑", "LPIPS↓"] and table[1][0] == "mine"


class _Flaky(iqa.Metric):
    """A metric that fails on one image, or interrupts the run there."""

    def __init__(self, fail_on: int, exc: BaseException) -> None:
        super().__init__("niqe", torch.nn.Identity())
        self.calls, self.fail_on, self.exc = 0, fail_on, exc

    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> float:
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.exc
        return float(sr.mean())


def _pairs(tmp_path: Path, n: int) -> list:
    for i in range(n):
        save(tmp_path / "sr", f"{i}.png", photo(32, i % 3))
        save(tmp_path / "hr", f"{i}.png", photo(32, i % 3))
    pairs, skipped = match_pairs(list_images(tmp_path / "sr"), list_images(tmp_path / "hr"))
    assert not skipped
    return pairs


def test_a_metric_error_on_one_image_keeps_the_rest(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path / "out", ["niqe"], {})
    result = evaluate_pairs(_pairs(tmp_path, 3), {"niqe": _Flaky(2, RuntimeError("boom"))}, writer, model="m")
    writer.close()
    assert result.complete and result.errors == {"niqe": 1} and len(result.values["niqe"]) == 2
    rows = list(csv.DictReader((tmp_path / "out" / "per_image.csv").open()))
    assert [r["niqe"].startswith("error") for r in rows] == [False, True, False]


def test_an_interrupt_mid_folder_keeps_results_so_far(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path / "out", ["niqe"], {})
    with pytest.raises(KeyboardInterrupt):
        evaluate_pairs(_pairs(tmp_path, 3), {"niqe": _Flaky(3, KeyboardInterrupt())}, writer, model="m")
    writer.close()
    assert len(list(csv.DictReader((tmp_path / "out" / "per_image.csv").open()))) == 2
    partial = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["m"]["-"]
    assert partial["complete"] is False and partial["metrics"]["niqe"]["n"] == 2


def test_lr_mode_compare_uses_identical_noise_and_averages_seeds(tmp_path: Path) -> None:
    for i in range(2):
        hr = photo(64, i)
        save(tmp_path / "hr", f"{i}.png", hr)
        save(tmp_path / "lr", f"{i}.png", np.asarray(Image.fromarray(hr).resize((16, 16), Image.BICUBIC)))
    out = tmp_path / "out"
    args = ["--lr", str(tmp_path / "lr"), "--hr", str(tmp_path / "hr"), "--metrics", "psnr,ssim", "-o", str(out)]
    assert main([*args, "--compare", "name=A", "name=B", "--seeds", "2"]) == 0
    for seed in (42, 43):  # the same model under two names: identical noise gives identical images
        a, b = (out / "sr" / name / f"seed{seed}" for name in "AB")
        assert all((a / p.name).read_bytes() == (b / p.name).read_bytes() for p in list_images(a))
    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == ["A", "B"] and results["table"][0]["seeds"] == 2
    assert results["table"][0]["psnr"] == results["table"][1]["psnr"]
    seeds = results["runs"]["A"]
    assert seeds["42"]["metrics"]["psnr"]["mean"] != seeds["43"]["metrics"]["psnr"]["mean"]


def test_model_specs_and_argument_errors(tmp_path: Path) -> None:
    assert parse_model_spec("tiny_random:3", 0).tiny_seed == 3 and parse_model_spec("tiny_random:3", 0).tiny_random
    assert parse_model_spec("tiny", 0).source == "tiny" and parse_model_spec("tiny_random", 0).source == "tiny_random"
    spec = parse_model_spec("name=G,sd=/sd,naosd=/n,adapter=/a", 1)
    assert (spec.name, spec.sd_path, spec.naosd_path, spec.adapter) == ("G", "/sd", "/n", "/a")
    with pytest.raises(ValueError, match="key=value"):
        parse_model_spec("colour=red", 0)
    with pytest.raises(SystemExit):
        main(["--sr", str(tmp_path), "--hr", str(tmp_path), "--seeds", "3"])  # seeds need --lr


# --- weights: never downloaded, real when present ------------------------------------------------


def _name(url: str) -> str:
    return os.path.basename(url)


def test_missing_weights_are_reported_and_download_hooks_restored(tmp_path: Path) -> None:
    original = torch.hub.load_state_dict_from_url
    metrics, skipped = iqa.create_metrics(["lpips", "psnr", "not_a_metric"], weights_dir=tmp_path)
    assert list(metrics) == ["psnr"]
    assert skipped["lpips"].startswith("weights not found at") and str(tmp_path) in skipped["lpips"]
    assert "unknown pyiqa metric" in skipped["not_a_metric"]
    assert torch.hub.load_state_dict_from_url is original


def test_weighted_metrics_run_from_local_files(tmp_path: Path) -> None:
    """pyiqa's own download path (CNNIQA) and torchvision's (the LPIPS squeeze trunk), from a weights dir."""
    from pyiqa.archs import cnniqa_arch, lpips_arch

    torch.save({"params": cnniqa_arch.CNNIQA(pretrained=None).state_dict()},
               tmp_path / _name(cnniqa_arch.default_model_urls["koniq10k"]))  # fmt: skip
    torch.save(torchvision.models.squeezenet1_1().state_dict(),
               tmp_path / _name(torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.url))  # fmt: skip
    lpips = lpips_arch.LPIPS(pretrained=False, net="squeeze", pnet_rand=True)
    torch.save({k: v for k, v in lpips.state_dict().items() if k.startswith("lin")},
               tmp_path / _name(lpips_arch.default_model_urls["0.1_squeeze"]))  # fmt: skip
    metrics, skipped = iqa.create_metrics(
        ["cnniqa", "lpips"], weights_dir=tmp_path, options={"lpips": {"net": "squeeze"}}
    )
    assert not skipped
    hr, sr = to_tensor(photo()), to_tensor(noised(photo(), 20))
    assert math.isfinite(metrics["cnniqa"].score(sr, hr))
    assert metrics["lpips"].score(hr, hr) == 0.0 and metrics["lpips"].score(sr, hr) > 0
    assert metrics["lpips"].lower_better and not metrics["cnniqa"].lower_better


def test_clip_downloader_is_redirected_to_local_files(tmp_path: Path) -> None:
    from pyiqa.archs import clip_model

    url = clip_model._MODELS["RN50"]
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / _name(url)).write_bytes(b"x")
    with iqa.local_weights_only(tmp_path):
        assert clip_model._download(url, "/nonexistent") == str(tmp_path / "clip" / _name(url))
    with iqa.local_weights_only(tmp_path / "empty"), pytest.raises(iqa.MissingWeights, match=r"RN50\.pt"):
        clip_model._download(url, "/nonexistent")

"""The fixed held-out set: crops fixed by the seed, a folder option, and the absolute reward by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reward_service.config import RewardConfig
from reward_service.metrics_iqa import MetricFn
from reward_service.worker import RewardWorker
from sr_tools.heldout import heldout_crops, image_metrics, reward_metrics, sharpness


def test_crops_are_fixed_by_the_seed():
    hr, lr = heldout_crops(4, 64, seed=7)
    again, _ = heldout_crops(4, 64, seed=7)
    other, _ = heldout_crops(4, 64, seed=8)
    assert hr.shape == (4, 3, 64, 64) and lr.shape == (4, 3, 64, 64) and hr.dtype == lr.dtype == torch.uint8
    assert torch.equal(hr, again) and not torch.equal(hr, other)


def test_a_folder_replaces_the_embedded_photos(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    hr, _ = heldout_crops(3, 64, folder=tmp_path)  # the 40x40 photo is too small for 64x64 crops: left out
    big = torch.from_numpy(np.array(Image.open(tmp_path / "big.png"))).permute(2, 0, 1)
    for crop in hr:  # every crop is a window of the big photo
        windows = big.unfold(1, 64, 1).unfold(2, 64, 1)  # [3, 17, 27, 64, 64]
        assert (windows == crop[:, None, None]).flatten(3).all(-1).all(0).any()
    with pytest.raises(ValueError, match=r"no held-out photo in .* has both sides > 96 px"):
        heldout_crops(1, 96, folder=tmp_path)
    with pytest.raises(ValueError, match="multiple of 4"):
        heldout_crops(1, 30)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        heldout_crops(1, 32, folder=tmp_path / "empty")


def test_image_metrics_identities():
    hr, lr = heldout_crops(2, 32)
    same = hr.float().div(255)[:, None]  # [N, 1, 3, H, W]: the HR itself
    metrics = image_metrics(same, hr)
    assert metrics["ssim_y"] == pytest.approx(1.0) and metrics["sharpness"] == pytest.approx(1.0)
    assert sharpness(lr.float().div(255), hr.float().div(255)) < 0.9  # bicubic x4 is blurrier than the HR


def test_absolute_reward_is_the_range_normalised_metric():
    # One no-reference metric, the mean pixel value on a [0, 1] range: images of 0.25 score 0.25 raw and 0.25
    # normalised, and with weighting nr_only (rho_d = 1) the absolute reward is that value.
    mean_value = MetricFn(name="mean_value", fn=lambda sr, hr: sr.mean((1, 2, 3)), score_range=(0.0, 1.0))
    worker = RewardWorker(RewardConfig(fr_metrics=(), nr_metrics=("mean_value",), weighting="nr_only"), [mean_value])
    images = torch.full((2, 3, 3, 16, 16), 0.25)
    out = reward_metrics(worker, images, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert out == pytest.approx({"reward": 0.25, "mean_value": 0.25})


def test_process_aware_reward_is_absolute_and_scores_the_lr():
    # OARS (SPEC section 10): F = 0.5 (FR on [0, 1]), Q = 1 + 4 * mean pixel (NR on [0, 1] onto 1..5):
    # SR of 0.75 -> Q_sr = 4, LR of 0.25 -> Q_lr = 2; R = F Q_lr + F^(Q_lr / 7) (Q_sr - Q_lr).
    fidelity = MetricFn(name="half", fn=lambda sr, hr: torch.full((sr.shape[0],), 0.5), score_range=(0.0, 1.0),
                        full_reference=True)  # fmt: skip
    quality = MetricFn(name="mean_value", fn=lambda sr, hr: sr.mean((1, 2, 3)), score_range=(0.0, 1.0))
    config = RewardConfig(kind="process_aware", fr_metrics=("half",), nr_metrics=("mean_value",))
    worker = RewardWorker(config, [fidelity, quality])
    images, hr = torch.full((2, 3, 3, 16, 16), 0.75), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    lr = torch.full((2, 3, 16, 16), 0.25)
    out = reward_metrics(worker, images, hr, lr)
    assert out["reward"] == pytest.approx(0.5 * 2 + 0.5 ** (2 / 7) * (4 - 2))
    assert out["half"] == pytest.approx(0.5) and out["mean_value"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="pass lr"):
        reward_metrics(worker, images, hr)

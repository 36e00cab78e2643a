"""pyiqa metrics built strictly offline, and the reward config's checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.config import from_mapping
from reward_service.config import RewardConfig, RewardPoolConfig
from reward_service.metrics_iqa import (
    PYIQA_METRICS,
    _no_downloads,
    _timm_without_pretrained,
    build_metrics,
    build_pyiqa_metric,
    parse_score_range,
    pyiqa_entropy,
)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point pyiqa's and torch hub's caches at empty folders, so pre-seeded weights cannot be found."""
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


@pytest.mark.parametrize(
    ("name", "filename"),
    [("musiq", "musiq_koniq_ckpt-e95806b9.pth"), ("maniqa", "ckpt_koniq10k.pt"), ("lpips", "LPIPS_v0.1_alex")],
)
def test_missing_weights_name_the_file(empty_caches: Path, name: str, filename: str) -> None:
    with pytest.raises(ValueError, match=filename) as err:
        build_pyiqa_metric(name, RewardConfig(weights_dir=str(empty_caches)))
    assert str(empty_caches) in str(err.value) and "never downloaded" in str(err.value)


def test_missing_backbone_is_named(empty_caches: Path) -> None:
    (empty_caches / PYIQA_METRICS["lpips"].checkpoint).write_bytes(b"")  # the LPIPS head is there, AlexNet is not
    with pytest.raises(ValueError, match=r"alexnet-owt-7be5be79\.pth"):
        build_pyiqa_metric("lpips", RewardConfig(weights_dir=str(empty_caches)))


def test_unknown_metric_and_wrong_kind() -> None:
    with pytest.raises(ValueError, match="unknown reward metric 'nope'"):
        build_pyiqa_metric("nope", RewardConfig())
    with pytest.raises(ValueError, match="no-reference; list it under nr_metrics"):
        build_metrics(RewardConfig(fr_metrics=("piqe",), nr_metrics=("psnr_y",)))


def test_download_attempts_fail_instead_of_reaching_the_network() -> None:
    import pyiqa

    with _no_downloads("niqe", ""), pytest.raises(ValueError, match=r"niqe_modelparameters\.mat"):
        pyiqa.create_metric("niqe", device="cpu")  # NIQE fetches a .mat file of parameters


def test_offline_metrics_directions_and_ranges() -> None:
    metrics = {m.name: m for m in build_metrics(RewardConfig.offline())}
    assert (metrics["psnr_y"].full_reference, metrics["psnr_y"].lower_better) == (True, False)
    assert (metrics["piqe"].full_reference, metrics["piqe"].lower_better) == (False, True)
    assert (metrics["entropy"].full_reference, metrics["entropy"].lower_better) == (False, False)
    assert metrics["piqe"].score_range == (0.0, 100.0)
    scores = metrics["piqe"](torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32))
    assert scores.shape == (5,) and scores.dtype == torch.float64


def test_entropy_shortcut_equals_pyiqa() -> None:
    import pyiqa

    reference = pyiqa.create_metric("entropy", device="cpu")
    x = torch.rand(4, 3, 37, 53)
    x[0] = 0.25  # a flat image: one bin holds everything
    torch.testing.assert_close(pyiqa_entropy(x), reference(x), rtol=0, atol=0)


def test_parse_score_range() -> None:
    assert parse_score_range("~0, ~100") == (0.0, 100.0)
    assert parse_score_range("1, 10") == (1.0, 10.0)
    assert all(math.isnan(x) for x in parse_score_range("0, ~"))


@pytest.mark.slow
def test_musiq_loads_a_local_checkpoint(tmp_path: Path) -> None:
    """The real loading path on a file the test writes (random weights with MUSIQ's architecture)."""
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.save(MUSIQ(pretrained=False).state_dict(), tmp_path / PYIQA_METRICS["musiq"].checkpoint)
    metric = build_pyiqa_metric("musiq", RewardConfig(weights_dir=str(tmp_path), metric_batch_size=2))
    scores = metric(torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32))
    assert scores.shape == (3,) and torch.isfinite(scores).all() and not metric.lower_better


@pytest.mark.slow
def test_maniqa_loads_a_local_checkpoint_without_timm_download(tmp_path: Path) -> None:
    """MANIQA's ViT comes from its own checkpoint; timm is never asked for ImageNet weights."""
    from pyiqa.archs.maniqa_arch import MANIQA

    spec = PYIQA_METRICS["maniqa"]
    with _timm_without_pretrained(spec):
        net = MANIQA(pretrained=False, train_dataset="koniq", scale=0.8)
    state = {k: v + 1.0 if k == "fc_score.0.bias" else v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / spec.checkpoint)
    metric = build_pyiqa_metric("maniqa", RewardConfig(weights_dir=str(tmp_path)))
    loaded = metric.model.net.state_dict()["fc_score.0.bias"]
    torch.testing.assert_close(loaded, state["fc_score.0.bias"])
    # (no forward pass: 20 ViT-B/8 crops per image take minutes on a CPU)


def test_config_from_mapping_and_checks() -> None:
    cfg = from_mapping(RewardConfig, {"fr_metrics": ["psnr_y"], "nr_metrics": ["piqe", "entropy"]}, where="reward")
    assert cfg.metric_names == ("psnr_y", "piqe", "entropy") and not cfg.is_paper_setup
    assert RewardConfig().is_paper_setup and RewardConfig().metric_names == ("psnr_y", "musiq", "maniqa")
    assert RewardConfig(weighting="fr_only").metric_names == ("psnr_y",)
    pool = from_mapping(RewardPoolConfig, {"num_workers": 1, "num_cpus": 1}, where="cluster.reward")
    assert pool.num_workers == 1 and pool.num_gpus == 0.0


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({"weighting": "nr_only", "nr_metrics": []}, "nr_only.*nr_metrics"),
        ({"weighting": "fr_only", "fr_metrics": []}, "fr_only.*fr_metrics"),
        ({"fr_metrics": ["psnr_y", "psnr_y"]}, "twice"),
        ({"fr_metrics": ["piqe"], "nr_metrics": ["piqe"]}, "overlap"),
        ({"fixed_rho_s": 1.5}, "fixed_rho_s"),
        ({"patch_size": 0}, "patch_size"),
        ({"filter_mean": 2.0}, "filter_mean"),
        ({"device": "tpu"}, "device"),
        ({"weighting": "magic"}, "magic"),
        ({"gray": "bgr"}, "bgr"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_bad_reward_config(mapping: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_mapping(RewardConfig, mapping, where="reward")


@pytest.mark.parametrize(
    ("mapping", "match"),
    [({"num_workers": 0}, "num_workers"), ({"timeout_s": 0}, "timeout_s"), ({"max_retries": -1}, "max_retries")],
)
def test_bad_pool_config(mapping: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_mapping(RewardPoolConfig, mapping, where="cluster.reward")

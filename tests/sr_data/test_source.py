"""Training-pair source: embedded set, determinism, degradation, damaged folders, config."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import from_mapping
from sr_data import lr_synthesis
from sr_data.embedded_images import EMBEDDED_HELDOUT, load_embedded, load_heldout
from sr_data.source import EMBEDDED_IMAGES, DataConfig, PairSource, TrainingPair, bicubic_degrade
from tests.sr_data.conftest import CROP
from tests.sr_data.conftest import photo as _photo
from tests.sr_data.conftest import save as _save


def _truncated_jpeg(path: Path) -> Path:
    _save(path, _photo(96, 96, seed=99))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:  # the header survives: only decoding finds the damage
        assert im.size == (96, 96)
    return path


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _hf_energy(x: np.ndarray) -> float:
    """Mean squared Laplacian response: high-frequency energy."""
    f = x.astype(np.float64)
    lap = 4 * f[:, 1:-1, 1:-1] - f[:, :-2, 1:-1] - f[:, 2:, 1:-1] - f[:, 1:-1, :-2] - f[:, 1:-1, 2:]
    return float(np.mean(lap**2))


# --- embedded default set ----------------------------------------------------------------------


def test_embedded_set_loads_offline(embedded: PairSource) -> None:
    assert len(embedded) == len(EMBEDDED_IMAGES) >= 6
    assert embedded.skipped == {}
    assert set(embedded.image_ids) == set(EMBEDDED_IMAGES)
    assert not set(embedded.image_ids) & set(EMBEDDED_HELDOUT)  # the held-out photos are never trained on
    assert embedded.upscaled == {}  # every embedded photo is larger than 64
    summary = embedded.summary()
    assert (summary.found, summary.usable, summary.skipped, summary.upscaled) == (10, 10, (), 0)
    assert str(summary).startswith("data: 10 image file(s) found in <embedded scikit-image photos>: 10 usable")


def test_grey_photos_become_three_equal_channels_and_held_out_ones_stay_out_of_training() -> None:
    grey = load_embedded("camera")
    assert grey.shape == (512, 512, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert load_heldout("coffee").shape == (400, 600, 3)
    with pytest.raises(KeyError, match="not a held-out image"):
        load_heldout("astronaut")


def test_embedded_small_photos_are_skipped_at_512_unless_upscaling_is_allowed() -> None:
    strict = PairSource(DataConfig())
    assert {k: v.reason for k, v in strict.skipped.items()} == {
        "skimage.data.chelsea()": "too_small",
        "skimage.data.rocket()": "too_small",
    }
    assert "451x300" in strict.skipped["skimage.data.chelsea()"].detail and strict.upscaled == {}
    source = PairSource(DataConfig(upscale_small=True))
    assert set(source.upscaled) == {"chelsea", "rocket"} and source.skipped == {}
    assert source.upscaled["chelsea"] == (300, 451)
    pair = source.sample(0)
    assert pair.hr.shape == pair.lr.shape == (3, 512, 512)


def test_embedded_photo_that_fails_to_load_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from sr_data import scan as data

    real = data.load_embedded

    def flaky(image_id: str) -> np.ndarray:
        if image_id == "retina":
            raise ModuleNotFoundError("pooch is needed to download retina")
        return real(image_id)

    monkeypatch.setattr(data, "load_embedded", flaky)
    source = PairSource(DataConfig(crop_size=CROP))
    assert len(source) == len(EMBEDDED_IMAGES) - 1 and "retina" not in source.image_ids
    assert "pooch" in source.skipped["skimage.data.retina()"].detail
    monkeypatch.setattr(data, "load_embedded", lambda image_id: flaky("retina"))
    with pytest.raises(ValueError, match="hr_dir"):
        PairSource(DataConfig(crop_size=CROP))


def test_shapes_dtypes_and_prompt(embedded: PairSource) -> None:
    pair = embedded.sample(3)
    assert isinstance(pair, TrainingPair)
    assert pair.hr.shape == pair.lr.shape == (3, CROP, CROP)
    assert pair.hr.dtype == pair.lr.dtype == np.uint8
    assert pair.hr.flags.c_contiguous and pair.lr.flags.c_contiguous
    assert pair.index == 3 and pair.prompt == "" and pair.image_id in EMBEDDED_IMAGES


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_and_index_same_pair_across_instances_and_pickle(embedded: PairSource) -> None:
    other = pickle.loads(pickle.dumps(PairSource(DataConfig(crop_size=CROP))))
    for index in (0, 5, 17, 1000):
        a, b = embedded.sample(index), other.sample(index)
        assert a.image_id == b.image_id
        np.testing.assert_array_equal(a.hr, b.hr)
        np.testing.assert_array_equal(a.lr, b.lr)
    # order of calls does not matter: the pair depends on the index alone
    np.testing.assert_array_equal(other.sample(17).hr, embedded.sample(17).hr)


def test_different_index_or_seed_differs(embedded: PairSource) -> None:
    n = len(embedded)
    first = embedded.sample(0).image_id
    same_image = [i for i in range(4 * n) if embedded.sample(i).image_id == first]
    assert len(same_image) == 4  # once per epoch
    crops = [embedded.sample(i).hr for i in same_image]
    assert all(not np.array_equal(crops[0], c) for c in crops[1:])  # a new random crop each epoch
    reseeded = PairSource(DataConfig(crop_size=CROP, seed=1))
    assert [reseeded.sample(i).image_id for i in range(n)] != [embedded.sample(i).image_id for i in range(n)]


def test_each_epoch_is_a_permutation(embedded: PairSource) -> None:
    n = len(embedded)
    epochs = [[embedded.sample(e * n + i).image_id for i in range(n)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(embedded.image_ids)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_batch_is_consecutive_samples(embedded: PairSource) -> None:
    pairs = embedded.batch(6, 3)
    assert [p.index for p in pairs] == [6, 7, 8]
    np.testing.assert_array_equal(pairs[2].lr, embedded.sample(8).lr)
    assert embedded.batch(4, 0) == []
    with pytest.raises(ValueError, match="count"):
        embedded.batch(0, -1)
    with pytest.raises(ValueError, match=">= 0"):
        embedded.sample(-1)


def test_flip_happens_for_some_indices(embedded: PairSource) -> None:
    plain = PairSource(DataConfig(crop_size=CROP, hflip=False))
    flipped = 0
    for index in range(24):
        a, b = embedded.sample(index), plain.sample(index)
        assert a.image_id == b.image_id
        if np.array_equal(a.hr, b.hr):
            continue
        np.testing.assert_array_equal(a.hr, b.hr[:, :, ::-1])  # same crop, mirrored
        flipped += 1
    assert 4 <= flipped <= 20


# --- degradation -------------------------------------------------------------------------------


def test_lr_is_a_blurred_hr(embedded: PairSource) -> None:
    for index in range(8):
        pair = embedded.sample(index)
        if pair.hr.std() < 10:  # e.g. a black patch of the Hubble deep field: nothing to blur
            continue
        assert 15.0 < _psnr(pair.lr, pair.hr) < 45.0
        assert _hf_energy(pair.lr) < 0.6 * _hf_energy(pair.hr)
        assert abs(float(pair.lr.mean()) - float(pair.hr.mean())) < 3.0  # colours are kept


def test_bicubic_degrade_matches_its_definition() -> None:
    hr = _photo(64, 64, seed=3).transpose(2, 0, 1).copy()
    lr = bicubic_degrade(hr, 4)
    x = torch.from_numpy(hr).float()[None] / 255
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
    small = (small.clamp(0, 1) * 255).round() / 255
    up = torch.nn.functional.interpolate(small, size=(64, 64), mode="bicubic")
    np.testing.assert_array_equal(lr, (up.clamp(0, 1) * 255).round().to(torch.uint8)[0].numpy())
    flat = np.full((3, 64, 64), 77, np.uint8)
    np.testing.assert_array_equal(bicubic_degrade(flat, 4), flat)


def test_realesrgan_branch_calls_degrade_with_a_seeded_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeConfig:
        def __init__(self, scale: int = 4) -> None:
            self.scale = scale

    def fake_degrade(hr: torch.Tensor, generator: torch.Generator, config: object) -> torch.Tensor:
        calls.append((hr.shape, hr.dtype, type(config)))
        noise = torch.rand(hr.shape[0], 3, hr.shape[2] // 4, hr.shape[3] // 4, generator=generator)
        return noise  # LR size: the source resizes it back

    monkeypatch.setattr(lr_synthesis, "degrade", fake_degrade)
    source = PairSource(DataConfig(crop_size=CROP, degradation="realesrgan"), degradation_config=FakeConfig())
    a, b, c = source.sample(2), source.sample(2), source.sample(3)
    assert a.lr.shape == (3, CROP, CROP) and a.lr.dtype == np.uint8
    np.testing.assert_array_equal(a.lr, b.lr)
    assert not np.array_equal(a.lr, c.lr)
    assert calls[0] == (torch.Size([1, 3, CROP, CROP]), torch.float32, FakeConfig)
    # the crop and flip do not depend on the degradation
    np.testing.assert_array_equal(a.hr, PairSource(DataConfig(crop_size=CROP)).sample(2).hr)
    with pytest.raises(ValueError, match="scale"):
        PairSource(DataConfig(crop_size=CROP, degradation="realesrgan"), degradation_config=FakeConfig(scale=2))
    with pytest.raises(ValueError, match="degradation='bicubic'"):
        PairSource(DataConfig(crop_size=CROP), degradation_config=FakeConfig())


def test_realesrgan_with_the_real_degradation() -> None:
    source = PairSource(DataConfig(crop_size=CROP, degradation="realesrgan"))
    a, b = source.sample(4), source.sample(4)
    assert a.lr.shape == a.hr.shape == (3, CROP, CROP) and a.lr.dtype == np.uint8
    np.testing.assert_array_equal(a.lr, b.lr)
    assert not np.array_equal(a.lr, a.hr)
    assert _psnr(a.lr, a.hr) < 45.0


# --- folders -----------------------------------------------------------------------------------


def _damaged_folder(root: Path) -> Path:
    _save(root / "a.png", _photo(96, 80, seed=1))
    _save(root / "sub" / "b.jpg", _photo(72, 100, seed=2))
    _save(root / "sub" / "deeper" / "c.webp", _photo(64, 64, seed=3))
    _truncated_jpeg(root / "broken.jpg")
    (root / "notes.png").write_text("this is not an image")
    (root / "readme.txt").write_text("ignored: not an image suffix")
    return root


def test_folder_skips_unreadable_files_and_counts_them(tmp_path: Path) -> None:
    root = _damaged_folder(tmp_path / "hr")
    source = PairSource(DataConfig(hr_dir=str(root), crop_size=CROP))
    # header check at indexing: the text file is out, the truncated JPEG is found when decoded
    assert set(source.skipped) == {"notes.png"} and source.skipped["notes.png"].reason == "unreadable"
    assert len(source) == 4
    ids = {source.sample(i).image_id for i in range(3 * len(source))}
    assert ids == {"a.png", "sub/b.jpg", "sub/deeper/c.webp"}
    assert set(source.skipped) == {"notes.png", "broken.jpg"}
    assert source.skipped["broken.jpg"].reason == "unreadable" and "truncated" in source.skipped["broken.jpg"].detail
    # the replacement draw is deterministic: a fresh source gives the same pairs
    fresh = PairSource(DataConfig(hr_dir=str(root), crop_size=CROP))
    for i in range(8):
        np.testing.assert_array_equal(fresh.sample(i).hr, source.sample(i).hr)


def test_folder_decode_check_finds_truncation_up_front(tmp_path: Path) -> None:
    root = _damaged_folder(tmp_path / "hr")
    source = PairSource(DataConfig(hr_dir=str(root), crop_size=CROP, index_check="decode"))
    assert len(source) == 3
    assert set(source.skipped) == {"notes.png", "broken.jpg"}
    assert source.image_ids == ("a.png", "sub/b.jpg", "sub/deeper/c.webp")


def test_folder_image_modes_become_rgb(tmp_path: Path) -> None:
    rgb = _photo(80, 80, seed=4)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    source = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP, hflip=False))
    for i in range(3):
        pair = source.sample(i)
        assert pair.hr.shape == (3, CROP, CROP) and pair.hr.dtype == np.uint8
        if pair.image_id != "alpha.png":
            np.testing.assert_array_equal(pair.hr[0], pair.hr[1])
    assert source.skipped == {}


@pytest.mark.parametrize("case", ["empty", "all_bad", "missing", "file"])
def test_unusable_folder_is_a_value_error_naming_it(tmp_path: Path, case: str) -> None:
    root = tmp_path / f"images_{case}"
    if case == "empty":
        root.mkdir()
        (root / "sub").mkdir()
    elif case == "all_bad":
        root.mkdir()
        (root / "x.png").write_text("nope")
    elif case == "file":
        root.write_text("a file")
    with pytest.raises(ValueError, match=f"images_{case}"):
        PairSource(DataConfig(hr_dir=str(root), crop_size=CROP))


def test_all_images_truncated_fails_clearly_at_read_time(tmp_path: Path) -> None:
    _truncated_jpeg(tmp_path / "only.jpg")
    source = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP))
    with pytest.raises(ValueError, match="no readable image"):
        source.sample(0)


def test_small_images_are_upscaled_or_skipped(tmp_path: Path) -> None:
    _save(tmp_path / "big.png", _photo(96, 96, seed=5))
    _save(tmp_path / "small.png", _photo(40, 50, seed=6))
    _save(tmp_path / "tiny.png", _photo(8, 8, seed=7))
    source = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP, min_side=16, upscale_small=True))
    assert source.upscaled == {"small.png": (40, 50)}
    assert list(source.skipped) == ["tiny.png"] and source.skipped["tiny.png"].reason == "too_small"
    assert "min_side=16" in source.skipped["tiny.png"].detail
    pairs = [source.sample(i) for i in range(2)]
    assert {p.image_id for p in pairs} == {"big.png", "small.png"}
    assert all(p.hr.shape == (3, CROP, CROP) for p in pairs)
    strict = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP, min_side=16))  # no upscaling
    assert strict.image_ids == ("big.png",) and strict.upscaled == {}
    assert {k: v.reason for k, v in strict.skipped.items()} == {"small.png": "too_small", "tiny.png": "too_small"}
    assert "crop_size=64" in strict.skipped["small.png"].detail


def test_extensions_are_configurable(tmp_path: Path) -> None:
    _save(tmp_path / "a.PNG", _photo(64, 64, seed=8))
    _save(tmp_path / "b.bmp", _photo(64, 64, seed=9))
    source = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP, extensions=(".png",)))
    assert source.image_ids == ("a.PNG",)


# --- config ------------------------------------------------------------------------------------


def test_config_from_mapping_and_validation() -> None:
    config = from_mapping(DataConfig, {"crop_size": 64, "extensions": [".png", ".jpg"], "degradation": "bicubic"})
    assert config.crop_size == 64 and config.extensions == (".png", ".jpg")
    bad = [
        ({"crop_size": 60}, "multiple of 8"),
        ({"crop_size": 72, "scale": 16}, "multiple of 8"),
        ({"scale": 1}, "scale"),
        ({"seed": -1}, "seed"),
        ({"min_side": -2}, "min_side"),
        ({"min_side": 0}, "min_side"),
        ({"extensions": ["png"]}, "dot"),
        ({"extensions": []}, "at least one"),
        ({"prompt": "captions"}, "captions_file"),
        ({"captions_file": "c.json"}, "prompt='captions'"),
        ({"degradation": "jpeg"}, "degradation"),
        ({"index_check": "full"}, "index_check"),
    ]
    for mapping, match in bad:
        with pytest.raises(ValueError, match=match):
            from_mapping(DataConfig, mapping, where="data")

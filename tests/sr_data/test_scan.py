"""Data hygiene: a hostile folder (non-UTF-8 name, truncated files, 1x1, transparency) is skipped with reasons."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sr_data.images import ImageError, has_transparent_pixels, load_rgb
from sr_data.scan import NoUsableImages, SkippedFile, UnusableImage, printable
from sr_data.source import DataConfig, PairSource
from tests.sr_data.conftest import CROP, photo, save

BAD_NAME = os.fsdecode(b"bad\xff.png")  # not valid UTF-8: os.fsdecode escapes the byte as a lone surrogate


def _truncated(path: Path, seed: int) -> None:
    save(path, photo(96, 96, seed=seed))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rgba(opaque: bool, seed: int) -> Image.Image:
    rgba = np.dstack([photo(80, 80, seed=seed), np.full((80, 80), 255, np.uint8)])
    if not opaque:
        rgba[10:20, 10:20, 3] = 0  # a transparent patch; the colour under it is whatever the tool left
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    save(tmp_path / "good.png", photo(96, 96, seed=1))
    save(tmp_path / BAD_NAME, photo(96, 96, seed=2))  # a good image under an undecodable name
    _truncated(tmp_path / "cut1.jpg", seed=3)
    _truncated(tmp_path / "sub" / "cut2.jpg", seed=4)
    save(tmp_path / "dot.png", photo(1, 1, seed=5))
    _rgba(opaque=False, seed=6).save(tmp_path / "holes.png")
    _rgba(opaque=True, seed=7).save(tmp_path / "opaque.png")  # alpha carries nothing: kept
    return tmp_path


def test_printable_ids_are_valid_utf8_and_leave_valid_names_alone() -> None:
    assert printable("sub/a é.png") == "sub/a é.png"
    assert printable(BAD_NAME) == "bad\\xff.png"
    assert printable("lone \ud800") == "lone \\ud800"  # a surrogate no byte escape explains
    for text in (BAD_NAME, "lone \ud800"):
        printable(text).encode("utf-8")  # strict: raises if anything invalid were left


def test_hostile_folder_is_skipped_with_counts_and_reasons(hostile: Path) -> None:
    source = PairSource(DataConfig(hr_dir=str(hostile), crop_size=CROP, hflip=False))
    # header check: only the 1x1 is known unusable up front
    assert {k: v.reason for k, v in source.skipped.items()} == {"dot.png": "too_small"}
    assert "1x1" in source.skipped["dot.png"].detail and "min_side=64" in source.skipped["dot.png"].detail
    pairs = [source.sample(i) for i in range(3 * len(source))]  # three epochs: every file is read
    assert {p.image_id for p in pairs} == {"good.png", "bad\\xff.png", "opaque.png"}
    assert {k: v.reason for k, v in source.skipped.items()} == {
        "dot.png": "too_small",
        "cut1.jpg": "unreadable",
        "sub/cut2.jpg": "unreadable",
        "holes.png": "transparent",
    }
    assert "truncated" in source.skipped["cut1.jpg"].detail
    summary = source.summary()
    assert (summary.found, summary.usable, summary.escaped_names) == (7, 3, 1)
    assert summary.by_reason() == {"too_small": 1, "unreadable": 2, "transparent": 1}
    line = str(summary)
    assert "7 image file(s) found" in line and "3 usable, 4 skipped (too_small 1, transparent 1, unreadable 2)" in line
    line.encode("utf-8")
    # the escaped id enters an Arrow string column (which must be valid UTF-8) and pickles
    assert pa.array([p.image_id for p in pairs], pa.string()).null_count == 0
    assert pickle.loads(pickle.dumps(source)).sample(1).image_id == source.sample(1).image_id


def test_decode_check_counts_everything_up_front(hostile: Path) -> None:
    source = PairSource(DataConfig(hr_dir=str(hostile), crop_size=CROP, index_check="decode"))
    assert source.image_ids == ("bad\\xff.png", "good.png", "opaque.png")
    assert source.summary().by_reason() == {"too_small": 1, "unreadable": 2, "transparent": 1}


def test_transparent_images_kept_when_switched_off(hostile: Path) -> None:
    source = PairSource(DataConfig(hr_dir=str(hostile), crop_size=CROP, skip_transparent=False, hflip=False))
    ids = {source.sample(i).image_id for i in range(3 * len(source))}
    assert "holes.png" in ids and "holes.png" not in source.skipped


def test_an_escape_spelled_out_by_a_valid_name_is_a_duplicate(tmp_path: Path) -> None:
    save(tmp_path / BAD_NAME, photo(80, 80, seed=1))
    save(tmp_path / "bad\\xff.png", photo(80, 80, seed=2))  # a valid name that reads like the escape
    source = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP))
    assert len(source) == 1
    assert [s.reason for s in source.skipped.values()] == ["duplicate_id"]


def test_only_truncated_images_fail_at_probe_with_the_files_named(tmp_path: Path) -> None:
    for i in range(3):
        _truncated(tmp_path / f"cut{i}.jpg", seed=i)
    source = PairSource(DataConfig(hr_dir=str(tmp_path), crop_size=CROP))
    named = r"(?s)no readable image left.*\n  cut0.jpg: unreadable \(OSError: image file is truncated"
    with pytest.raises(NoUsableImages, match=named):
        source.probe()


def test_skip_records_survive_pickling() -> None:
    skipped = SkippedFile("a.png", "transparent", "RGBA image with transparent pixels")
    assert pickle.loads(pickle.dumps(skipped)) == skipped
    err = pickle.loads(pickle.dumps(UnusableImage("too_small", "1x1")))
    assert (err.reason, err.detail, str(err)) == ("too_small", "1x1", "too_small: 1x1")


def test_transparency_check_shared_with_the_inference_loader(tmp_path: Path) -> None:
    assert has_transparent_pixels(_rgba(opaque=False, seed=1))
    assert not has_transparent_pixels(_rgba(opaque=True, seed=1))
    assert not has_transparent_pixels(Image.fromarray(photo(8, 8, seed=1)))
    palette = Image.fromarray(photo(8, 8, seed=1)).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # one palette entry is see-through
    assert has_transparent_pixels(palette)
    _rgba(opaque=False, seed=1).save(tmp_path / "holes.png")
    with pytest.raises(ImageError, match="transparent pixels"):
        load_rgb(tmp_path / "holes.png")

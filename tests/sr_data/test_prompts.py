"""Prompt sources: caption files (JSON, CSV, JSONL), missing entries, the Protocol."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sr_data.prompts import CaptionFile, EmptyPrompt, PromptSource, load_captions
from sr_data.source import DataConfig, PairSource
from tests.sr_data.conftest import CROP, photo, save

# --- prompts -----------------------------------------------------------------------------------


def test_captions_file_is_used_and_missing_entries_counted(tmp_path: Path) -> None:
    root = tmp_path / "hr"
    save(root / "a.png", photo(64, 64, seed=1))
    save(root / "sub" / "b.png", photo(64, 64, seed=2))
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"a.png": "a dog, grass, "}))
    config = DataConfig(hr_dir=str(root), crop_size=CROP, prompt="captions", captions_file=str(captions))
    source = PairSource(config)
    prompts = {p.image_id: p.prompt for p in source.batch(0, 2)}
    assert prompts == {"a.png": "a dog, grass, ", "sub/b.png": ""}
    assert source.prompt_source.missing == {"sub/b.png": 1}
    with pytest.raises(ValueError, match=r"1 of 2 images.*sub/b.png"):
        PairSource(dataclasses.replace(config, captions_strict=True))


def test_captions_csv_and_jsonl_layouts(tmp_path: Path) -> None:
    header = tmp_path / "meta.csv"
    header.write_text('file_name,text\nHR/a.png,"a cat, sofa, "\nb.jpg,a "quoted" word\n')
    assert load_captions(header) == {"HR/a.png": "a cat, sofa, ", "b.jpg": 'a "quoted" word'}
    plain = tmp_path / "plain.csv"
    plain.write_text("a.png,first\n./sub\\b.png,second\n")
    assert load_captions(plain) == {"a.png": "first", "sub/b.png": "second"}
    lines = tmp_path / "metadata.jsonl"
    lines.write_text('{"file_name": "a.png", "text": "x"}\n\n{"image": "b.png", "caption": "y"}\n')
    assert load_captions(lines) == {"a.png": "x", "b.png": "y"}
    source = CaptionFile(header)
    assert source("a.png", np.zeros((3, 8, 8), np.uint8)) == "a cat, sofa, "  # matched by file name
    assert source("sub/a", np.zeros((3, 8, 8), np.uint8)) == "a cat, sofa, "  # and by stem
    strict = CaptionFile(header, strict=True)
    with pytest.raises(ValueError, match=r"zzz\.png"):
        strict("zzz.png", np.zeros((3, 8, 8), np.uint8))


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("c.json", "[1, 2]", "item 0"),
        ("c.json", '{"a.png": 3}', "not a string"),
        ("c.json", "{}", "no captions"),
        ("c.json", "{nope", "not valid JSON"),
        ("c.csv", "a,b,c\n1,2,3\n", "header"),
        ("c.csv", "a.png,x\na.png,y\n", "two different captions"),
        ("c.txt", "a.png x", r"\.json, \.jsonl or \.csv"),
    ],
)
def test_bad_captions_files_are_value_errors(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_captions(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_captions(tmp_path / "absent.json")


def test_prompt_sources_follow_the_protocol(embedded: PairSource) -> None:
    assert isinstance(EmptyPrompt(), PromptSource)
    tagged = PairSource(DataConfig(crop_size=CROP), prompt_source=lambda image_id, hr: f"{image_id}, ")
    pair = tagged.sample(1)
    assert pair.prompt == f"{pair.image_id}, "
    np.testing.assert_array_equal(pair.hr, embedded.sample(1).hr)

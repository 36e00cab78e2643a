"""Shared helpers of the rollout tests: a tiny embedded training set and synthetic photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr_data.source import DataConfig, PairSource

CROP = 64


@pytest.fixture(scope="module")
def embedded() -> PairSource:
    return PairSource(DataConfig(crop_size=CROP))


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth-ish random RGB image with edges (so blur is measurable)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.NEAREST))
    return np.clip(big.astype(int) + rng.integers(-20, 21, size=big.shape), 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path

"""Reward-service test helpers: synthetic rollout record batches, and SPEC section 4 read naively."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pyarrow as pa
import pytest

from common.records import RolloutGroups, encode_rollout


def make_rollout_groups(
    n: int = 2, g: int = 3, size: int = 32, seed: int = 0, *, noise: float = 0.05, prefix: str = "grp"
) -> RolloutGroups:
    """``n`` groups of ``g`` SR samples (HR + Gaussian noise, clipped) at ``size`` x ``size``.

    The LR differs from the HR at every pixel (the top bit flipped), so scoring against the wrong one shows.
    """
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    sr = hr[:, None].astype(np.float32) / 255 + rng.normal(0, noise, (n, g, 3, size, size)).astype(np.float32)
    return RolloutGroups(
        group_id=tuple(f"{prefix}{seed}-{i:04d}" for i in range(n)),
        image_id=tuple(f"img{i}" for i in range(n)),
        data_index=np.arange(n, dtype=np.int64),
        seed=np.arange(n, dtype=np.int64),
        policy_version=np.full(n, -1, np.int64),
        prompt=("",) * n,
        lr=hr ^ np.uint8(0x80),
        hr=hr,
        sr=np.clip(sr, 0.0, 1.0),
        latents=np.zeros((n, g, 4, size // 8, size // 8), np.float32),
        text_emb=np.zeros((n, 2, 4), np.float32),
        generate_seconds=np.zeros(n),
    )


def make_rollout_batch(
    n: int = 2, g: int = 3, size: int = 32, seed: int = 0, *, noise: float = 0.05, prefix: str = "grp"
) -> pa.RecordBatch:
    """:func:`make_rollout_groups` as the Arrow record batch a rollout worker sends."""
    return encode_rollout(make_rollout_groups(n, g, size, seed, noise=noise, prefix=prefix))


def naive_complexity(rgb: np.ndarray, gray: str = "opencv_bgr", ps: int = 10, r: int = 64) -> np.ndarray:
    """SPEC 4 literally: one loop iteration per patch, cv2 + np.histogram.  rgb [H, W, 3] uint8."""
    code = cv2.COLOR_BGR2GRAY if gray == "opencv_bgr" else cv2.COLOR_RGB2GRAY
    g = cv2.cvtColor(rgb, code) / 255.0
    h, w = g.shape
    out = np.zeros((-(-h // ps), -(-w // ps)))
    for a, i in enumerate(range(0, h, ps)):
        for b, j in enumerate(range(0, w, ps)):
            patch = g[i : i + ps, j : j + ps]
            big = cv2.resize(patch, (r, r), interpolation=cv2.INTER_LINEAR)
            gx = cv2.Sobel(big, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
            gy = cv2.Sobel(big, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
            hist, _ = np.histogram(np.sqrt(gx**2 + gy**2), bins=512, range=(-5.5, 5.5))
            p = hist / (hist.sum() + 1e-5)
            out[a, b] = -np.sum(p * np.log2(p + 1e-10)) * patch.shape[0] * patch.shape[1]
    return out


def naive_rho_s(rgb: np.ndarray, comp: np.ndarray, ps: int = 10, threshold: float = 50.0) -> float:
    """Pixel fraction of the non-detailed patches, one patch at a time."""
    h, w = rgb.shape[:2]
    smooth = 0
    for a, i in enumerate(range(0, h, ps)):
        for b, j in enumerate(range(0, w, ps)):
            if comp[a, b] <= threshold:
                smooth += min(ps, h - i) * min(ps, w - j)
    return smooth / (h * w)


@pytest.fixture
def rollout_batch() -> Callable[..., pa.RecordBatch]:
    return make_rollout_batch

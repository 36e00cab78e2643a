"""Reward-service test helpers: synthetic rollout record batches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

from common.records import RolloutGroups, encode_rollout


def make_rollout_batch(
    n: int = 2, g: int = 3, size: int = 32, seed: int = 0, *, noise: float = 0.05, prefix: str = "grp"
) -> pa.RecordBatch:
    """``n`` groups of ``g`` SR samples (HR + Gaussian noise, clipped) at ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    sr = hr[:, None].astype(np.float32) / 255 + rng.normal(0, noise, (n, g, 3, size, size)).astype(np.float32)
    groups = RolloutGroups(
        group_id=tuple(f"{prefix}{seed}-{i:04d}" for i in range(n)),
        image_id=tuple(f"img{i}" for i in range(n)),
        data_index=np.arange(n, dtype=np.int64),
        seed=np.arange(n, dtype=np.int64),
        policy_version=np.full(n, -1, np.int64),
        prompt=("",) * n,
        lr=hr.copy(),
        hr=hr,
        sr=np.clip(sr, 0.0, 1.0),
        latents=np.zeros((n, g, 4, size // 8, size // 8), np.float32),
        text_emb=np.zeros((n, 2, 4), np.float32),
        generate_seconds=np.zeros(n),
    )
    return encode_rollout(groups)


@pytest.fixture
def rollout_batch() -> Callable[..., pa.RecordBatch]:
    return make_rollout_batch

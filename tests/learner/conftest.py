"""Learner test helpers: a tiny scored Arrow batch and a free loopback port."""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

from common.records import GroupRewards, RolloutGroups, append_rewards, encode_rollout

TEXT_DIM = 32  # the tiny model's cross-attention width (common.tiny.TINY_TEXT_DIM)


def make_scored_batch(n: int = 4, g: int = 3, seed: int = 0, latent_hw: int = 4) -> pa.RecordBatch:
    """``n`` scored groups of ``g``: latents ``[n, g, 4, hw, hw]``, text ``[n, 77, 32]``, normalised advantages."""
    rng = np.random.default_rng(seed)
    size = latent_hw * 8
    groups = RolloutGroups(
        group_id=tuple(f"test{seed}-{i:04d}" for i in range(n)),
        image_id=tuple(f"img{i}" for i in range(n)),
        data_index=np.arange(n, dtype=np.int64),
        seed=rng.integers(0, 2**62, n),
        policy_version=np.full(n, -1),
        prompt=("",) * n,
        lr=np.zeros((n, 3, size, size), np.uint8),
        hr=np.zeros((n, 3, size, size), np.uint8),
        sr=np.zeros((n, g, 3, size, size), np.float32),
        latents=rng.standard_normal((n, g, 4, latent_hw, latent_hw)).astype(np.float32),
        text_emb=rng.standard_normal((n, 77, TEXT_DIM)).astype(np.float32),
        generate_seconds=np.zeros(n),
    )
    reward = rng.standard_normal((n, g)).astype(np.float32)
    advantage = (reward - reward.mean(1, keepdims=True)) / (reward.std(1, ddof=1, keepdims=True) + 1e-8)
    rewards = GroupRewards(
        metric_names=("psnr_y",),
        metric_raw=reward[:, None],
        metric_norm=reward[:, None],
        rho_s=np.full(n, 0.5, np.float32),
        rho_d=np.full(n, 0.5, np.float32),
        reward=reward,
        advantage=advantage.astype(np.float32),
        zero_range=np.zeros(n, np.int32),
        reward_seconds=np.zeros(n),
    )
    return append_rewards(encode_rollout(groups), rewards)


@pytest.fixture
def scored_batch() -> Callable[..., pa.RecordBatch]:
    return make_scored_batch


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def policy():
    """The tiny UNet with its ``gdpo`` adapter (LoRA B = 0 at init) and the schedule's ``abar``."""
    import torch

    from common.naosd import ModelConfig
    from common.weights import build_policy_unet

    torch.manual_seed(0)
    return build_policy_unet(ModelConfig())

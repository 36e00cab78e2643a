"""``learner.objective`` through one DeepSpeed LearnerRank: the dispatch reaches each objective's function."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from common.naosd import ModelConfig, lora_parameters
from common.records import (
    GroupRewards,
    RolloutGroups,
    append_rewards,
    decode_rewards,
    decode_rollout,
    encode_rollout,
)
from common.weights import adapter_state_dict, build_naosd
from learner.config import LearnerConfig
from learner.dpo_loss import dpo_loss
from learner.engine import LearnerRank, loss_noise
from learner.gdpo_loss import gdpo_loss
from learner.reward_feedback import RewardFeedbackConfig
from learner.reward_feedback_model import build_reward_feedback, reward_feedback_objective

TINY_RF = RewardFeedbackConfig(metric="sobel_sharpness", features="tiny_conv")


def _batch(n: int = 2, g: int = 3, size: int = 16) -> pa.RecordBatch:
    """Shapes as the tiny model's rollout writes them: latents at size / 4 (the tiny VAE downsamples 4x)."""
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    groups = RolloutGroups(
        group_id=tuple(f"g{i}" for i in range(n)), image_id=("img",) * n, data_index=np.arange(n),
        seed=np.arange(n) + 7, policy_version=np.full(n, -1), prompt=("",) * n, lr=hr[..., ::-1].copy(), hr=hr,
        sr=np.zeros((n, g, 3, size, size), np.float32),
        latents=rng.standard_normal((n, g, 4, size // 4, size // 4)).astype(np.float32),
        text_emb=rng.standard_normal((n, 77, 32)).astype(np.float32), generate_seconds=np.zeros(n),
    )  # fmt: skip
    reward = rng.random((n, g)).astype(np.float32)
    advantage = (reward - reward.mean(1, keepdims=True)) / reward.std(1, ddof=1, keepdims=True)
    rewards = GroupRewards(
        metric_names=("m",), metric_raw=reward[:, None], metric_norm=reward[:, None], rho_s=np.zeros(n, np.float32),
        rho_d=np.zeros(n, np.float32), reward=reward, advantage=advantage.astype(np.float32),
        zero_range=np.zeros(n, np.int32), reward_seconds=np.zeros(n),
    )  # fmt: skip
    return append_rewards(encode_rollout(groups), rewards)


@pytest.mark.parametrize(
    ("objective", "keys"),
    [
        ("gdpo", {"inside_mean", "policy_mse", "reference_mse"}),
        ("dpo", {"inside_mean", "policy_mse", "reference_mse"}),
        ("nft", {"optimality_mean", "policy_mse", "reference_mse"}),
        ("reward_feedback", {"feedback_reward", "ll_l1", "gram_kl"}),
    ],
)
def test_each_objective_trains_the_adapter(free_port, objective, keys):
    config = LearnerConfig(lr=1e-2, objective=objective, reward_feedback=TINY_RF)
    rank = LearnerRank(ModelConfig(), config, 0, 1, "127.0.0.1", free_port)
    before = adapter_state_dict(rank.unet)
    stats = rank.train_step(_batch())
    after = adapter_state_dict(rank.unet)
    assert keys | {"loss", "grad_norm"} <= set(stats), stats
    assert stats["grad_norm"] > 0 and any(not torch.equal(before[k], after[k]) for k in before)


def test_reward_feedback_step_computes_the_pure_objective(free_port):
    """The rank's RFSR loss is :func:`reward_feedback_objective` on the record's LR/HR and the loss noise."""
    config = LearnerConfig(objective="reward_feedback", reward_feedback=TINY_RF, micro_batch_groups=1)
    rank = LearnerRank(ModelConfig(), config, 0, 1, "127.0.0.1", free_port)
    batch = _batch()
    groups = decode_rollout(batch)
    model = build_naosd(ModelConfig())
    model.unet.load_state_dict(rank.unet.state_dict())  # the rank's initial LoRA (B = 0: policy = reference)
    noise = loss_noise(config.seed, groups.seed, 0, tuple(groups.latents.shape[1:]))
    with torch.no_grad():
        out = reward_feedback_objective(
            model.unet, build_reward_feedback(ModelConfig(), TINY_RF, torch.device("cpu")),
            lr=torch.tensor(groups.lr), hr=torch.tensor(groups.hr), text_emb=torch.tensor(groups.text_emb),
            noise=noise, alphas_cumprod=model.alphas_cumprod, config=TINY_RF,
        )  # fmt: skip
    stats = rank.train_step(batch)
    assert stats["loss"] == pytest.approx(float(out.loss), rel=1e-5)
    assert stats["feedback_reward"] == pytest.approx(float(out.reward.mean()), rel=1e-5)
    assert stats["ll_l1"] == pytest.approx(float(out.ll_l1.mean()), rel=1e-5)


def test_dpo_step_computes_dpo_loss(free_port):
    """The rank's DPO loss is :func:`dpo_loss` on the record's latents and rewards and the loss noise, not GDPO's."""
    config = LearnerConfig(objective="dpo", micro_batch_groups=1)
    rank = LearnerRank(ModelConfig(), config, 0, 1, "127.0.0.1", free_port)
    with torch.no_grad():  # a policy that differs from the reference: at B = 0 every preference loss is log 2
        for name, p in lora_parameters(rank.unet).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    batch = _batch()
    groups, rewards = decode_rollout(batch), decode_rewards(batch)
    model = build_naosd(ModelConfig())
    model.unet.load_state_dict(rank.unet.state_dict())
    shared = {"latents": torch.tensor(groups.latents), "text_emb": torch.tensor(groups.text_emb),
              "noise": loss_noise(config.seed, groups.seed, 0, tuple(groups.latents.shape[1:])),
              "alphas_cumprod": model.alphas_cumprod, "config": config.loss}  # fmt: skip
    with torch.no_grad():
        dpo = dpo_loss(model.unet, **shared, rewards=torch.tensor(rewards.reward))
        gdpo = gdpo_loss(model.unet, **shared, advantages=torch.tensor(rewards.advantage))
    assert float(gdpo.loss) != pytest.approx(float(dpo.loss), rel=1e-3), "the batch must tell DPO from GDPO"
    stats = rank.train_step(batch)
    assert stats["loss"] == pytest.approx(float(dpo.loss), rel=1e-5)
    assert stats["inside_mean"] == pytest.approx(float(dpo.inside.mean()), rel=1e-5)

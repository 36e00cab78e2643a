"""The learner's one dispatch over ``learner.objective``: inputs of a micro-batch in, loss and stats out.

Each objective is a pure function in its own module (:mod:`learner.gdpo_loss`,
:mod:`learner.dpo_loss`, :mod:`learner.nft_loss`,
:mod:`learner.reward_feedback_model`); this module only picks one and turns its
output into per-group stat sums for :class:`learner.engine.LearnerRank`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from learner.config import LearnerConfig
from learner.dpo_loss import dpo_loss
from learner.gdpo_loss import GDPOLossOutput, gdpo_loss
from learner.nft_loss import nft_loss
from learner.reward_feedback_model import RewardFeedbackModules, reward_feedback_objective


@dataclass(frozen=True)
class ObjectiveInputs:
    """``n`` scored groups of ``G`` as tensors (what the record carries that any objective reads)."""

    latents: Tensor  # [n, G, 4, h, w] re-encoded SR latents z0
    noise: Tensor  # [n, G, 4, h, w] the loss noise e_i
    text_emb: Tensor  # [n, L, D]
    advantages: Tensor  # [n, G] Eq. 8
    rewards: Tensor  # [n, G] Eq. 7 (or the process-aware reward)
    lr: Tensor  # [n, 3, H, W] uint8, LR resized to the output size
    hr: Tensor  # [n, 3, H, W] uint8

    @property
    def num_groups(self) -> int:
        return self.advantages.shape[0]

    def part(self, rows: slice) -> ObjectiveInputs:
        return ObjectiveInputs(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device: torch.device) -> ObjectiveInputs:
        return ObjectiveInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class ObjectiveResult:
    loss: Tensor  # [] mean over the micro-batch's groups, with grad
    stats: dict[str, float]  # sums over the micro-batch's groups (the engine divides by the shard size)


def objective_loss(
    unet: torch.nn.Module,
    inputs: ObjectiveInputs,
    *,
    alphas_cumprod: Tensor,
    config: LearnerConfig,
    feedback: RewardFeedbackModules | None = None,
) -> ObjectiveResult:
    """``config.objective`` on one micro-batch; ``feedback`` is required for ``reward_feedback``."""
    k = inputs.num_groups
    shared = {"latents": inputs.latents, "noise": inputs.noise, "text_emb": inputs.text_emb,
              "alphas_cumprod": alphas_cumprod}  # fmt: skip
    if config.objective == "gdpo":
        return _preference(gdpo_loss(unet, **shared, advantages=inputs.advantages, config=config.loss), k)
    if config.objective == "dpo":
        return _preference(dpo_loss(unet, **shared, rewards=inputs.rewards, config=config.loss), k)
    if config.objective == "nft":
        out = nft_loss(unet, **shared, advantages=inputs.advantages, config=config.nft)
        return ObjectiveResult(out.loss, {
            "loss": float(out.loss.detach()) * k,
            "optimality_mean": float(out.optimality.mean(dim=1).sum()),
            "policy_mse": float(out.policy_mse.mean(dim=1).sum()),
            "reference_mse": float(out.reference_mse.mean(dim=1).sum()),
        })  # fmt: skip
    assert config.objective == "reward_feedback" and feedback is not None, config.objective
    out = reward_feedback_objective(
        unet, feedback, lr=inputs.lr, hr=inputs.hr, text_emb=inputs.text_emb, noise=inputs.noise,
        alphas_cumprod=alphas_cumprod, config=config.reward_feedback,
    )  # fmt: skip
    return ObjectiveResult(out.loss, {
        "loss": float(out.loss.detach()) * k,
        "feedback_reward": float(out.reward.sum()),
        "ll_l1": float(out.ll_l1.sum()),
        "gram_kl": float(out.gram_kl.sum()),
    })  # fmt: skip


def _preference(out: GDPOLossOutput, k: int) -> ObjectiveResult:
    return ObjectiveResult(out.loss, {
        "loss": float(out.loss.detach()) * k,
        "inside_mean": float(out.inside.sum()),
        "policy_mse": float(out.policy_mse.mean(dim=1).sum()),
        "reference_mse": float(out.reference_mse.mean(dim=1).sum()),
    })  # fmt: skip

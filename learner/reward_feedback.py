"""RFSR's reward-feedback objective (SPEC section 10), the pure part: three terms on SR images.

    loss = mean over images of [ -lambda_reward * R(sr)
                                 + lambda_ll * |DWT_LL(sr) - DWT_LL(hr)|_1
                                 + lambda_gram * GramKL(sr, sr_ref) ]

- ``R`` is a differentiable no-reference metric mapped onto [0, 1] (1 = best)
  by its fixed score range, so the lambdas weigh terms of comparable size.
- ``DWT_LL`` is the low-low band of the one-level orthonormal 2-D Haar
  transform, ``(a + b + c + d) / 2`` over each 2x2 block, i.e. exactly
  ``2 * avg_pool2d(x, 2)``; ``|.|_1`` is the mean absolute difference.
- ``GramKL``: for each feature layer, the Gram matrix ``F F^T / (h w)`` of the
  ``[C, h*w]`` features, softmax over its ``C*C`` entries, then
  ``KL(P_ref || P_pol)`` (the frozen reference's SR is the target
  distribution); averaged over layers.  It holds the policy's texture
  statistics near the reference's, against reward hacking.

All images are float in [0, 1], ``[B, 3, H, W]``.  Building the metric, the
feature network and the differentiable one-step forward is in
:mod:`learner.reward_feedback_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Features = Literal["vgg16", "tiny_conv"]


@dataclass(frozen=True, kw_only=True)
class RewardFeedbackConfig:
    # A pyiqa no-reference metric name (built with as_loss, weights from weights_dir, never downloaded), or
    # "sobel_sharpness": a kornia stand-in for the tiny config (no offline pyiqa NR metric has a gradient).
    metric: str = "musiq"
    weights_dir: str = ""  # pyiqa checkpoints for `metric`
    lambda_reward: float = 1.0
    lambda_ll: float = 1.0
    lambda_gram: float = 1.0
    features: Features = "vgg16"  # Gram features: torchvision VGG16 (weights from a file) or a fixed tiny conv net
    vgg_weights_path: str = ""  # torchvision's vgg16 ImageNet state dict (vgg16-397923af.pth); never downloaded
    features_seed: int = 0  # the tiny_conv network's fixed random weights

    def __post_init__(self) -> None:
        for name in ("lambda_reward", "lambda_ll", "lambda_gram"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.metric:
            raise ValueError("metric must name a no-reference metric")


@dataclass(frozen=True)
class RewardFeedbackOutput:
    loss: Tensor  # [] mean over images
    reward: Tensor  # [B] R(sr) in [0, 1], detached
    ll_l1: Tensor  # [B] |DWT_LL(sr) - DWT_LL(hr)|_1, detached
    gram_kl: Tensor  # [B] GramKL(sr, sr_ref), detached


def haar_ll(images: Tensor) -> Tensor:
    """The orthonormal Haar low-low band: ``[B, C, H, W]`` -> ``[B, C, H/2, W/2]`` (H, W even)."""
    assert images.shape[-2] % 2 == 0 and images.shape[-1] % 2 == 0, images.shape
    return 2.0 * F.avg_pool2d(images, 2)


def gram_matrix(features: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, C]``: ``F F^T / (h w)``."""
    flat = features.flatten(2).float()
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def gram_kl(policy: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """``KL(softmax(Gram_ref) || softmax(Gram_pol))`` per image, over flattened ``C*C``; mean over layers -> ``[B]``."""
    assert len(policy) == len(reference) > 0
    terms = []
    for pol, ref in zip(policy, reference, strict=True):
        # float64: near the reference (where training starts) the KL is ~1e-7, below float32's rounding of
        # log-probabilities ~ -log(C^2); in float32 it comes out negative.
        log_p = gram_matrix(pol).double().flatten(1).log_softmax(dim=1)
        log_q = gram_matrix(ref).double().flatten(1).log_softmax(dim=1)
        terms.append((log_q.exp() * (log_q - log_p)).sum(dim=1))
    return torch.stack(terms).mean(dim=0).float()


def reward_feedback_loss(
    sr: Tensor,
    sr_ref: Tensor,
    hr: Tensor,
    *,
    reward: Callable[[Tensor], Tensor],
    features: Callable[[Tensor], list[Tensor]],
    config: RewardFeedbackConfig,
) -> RewardFeedbackOutput:
    """The RFSR loss of ``B`` policy samples ``sr`` (with grad), the reference's ``sr_ref`` and the HR."""
    assert sr.shape == sr_ref.shape == hr.shape, (sr.shape, sr_ref.shape, hr.shape)
    r = reward(sr)  # [B]
    ll = (haar_ll(sr) - haar_ll(hr)).abs().mean(dim=(1, 2, 3))
    with torch.no_grad():
        target = features(sr_ref)
    kl = gram_kl(features(sr), target)
    per_image = -config.lambda_reward * r + config.lambda_ll * ll + config.lambda_gram * kl
    return RewardFeedbackOutput(loss=per_image.mean(), reward=r.detach(), ll_l1=ll.detach(), gram_kl=kl.detach())

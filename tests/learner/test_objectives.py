"""Diffusion-DPO and OARS's negative-aware loss (SPEC section 10): hand computations, identities, signs.

The toy UNet predicts ``scale * x + mean(text)`` with ``scale = base + lora`` when its adapter is on and
``base`` when off, so every number below can be worked out in float64 scalar loops.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from loss_inputs import loss_inputs  # tests/learner/loss_inputs.py
from torch import Tensor, nn

from common.naosd import lora_parameters
from learner.dpo_loss import dpo_loss, winner_loser
from learner.gdpo_loss import GDPOLossConfig, gdpo_loss
from learner.nft_loss import NFTLossConfig, nft_loss, optimality


class ToyUNet(nn.Module):
    def __init__(self, base: float, lora: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # only so next(parameters()) has a dtype
        self.base, self.lora, self.enabled = base, lora, True

    def disable_adapters(self) -> None:
        self.enabled = False

    def enable_adapters(self) -> None:
        self.enabled = True

    def forward(self, x: Tensor, t: int, encoder_hidden_states: Tensor) -> SimpleNamespace:
        scale = self.base + self.lora if self.enabled else self.base
        return SimpleNamespace(sample=scale * x + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def _x(data: dict, i: int, j: int, abar: float, noise_of: int | None = None) -> tuple[Tensor, Tensor, float]:
    """Sample ``j`` of image ``i`` re-noised with sample ``noise_of``'s noise (its own by default)."""
    z, e = data["latents"][i, j].double(), data["noise"][i, j if noise_of is None else noise_of].double()
    return math.sqrt(abar) * z + math.sqrt(1 - abar) * e, e, float(data["text_emb"][i].double().mean())


# --- Diffusion-DPO -------------------------------------------------------------------------------


def test_winner_and_loser_are_the_highest_and_lowest_reward():
    rewards = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.3, 0.7], [0.4, 0.4, 0.4]])
    assert winner_loser(rewards).tolist() == [[1, 2], [2, 1], [0, 0]]


@pytest.mark.parametrize("noise", ["per_sample", "per_group"])
def test_dpo_matches_a_hand_computation(policy, noise):
    """per_group: winner and loser share the winner's loss noise, as Diffusion-DPO's train.py does."""
    _, abar = policy
    toy, data = ToyUNet(base=0.3, lora=0.05), loss_inputs(2, 3, seed=4)
    rewards = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.3, 0.7]])  # winners at 1 and 2: not member 0
    config = GDPOLossConfig(omega=50.0, noise=noise)
    out = dpo_loss(toy, **data, rewards=rewards, alphas_cumprod=abar, config=config)

    a, losses = float(abar[250]), []
    for i, (winner, loser) in enumerate([(1, 2), (2, 1)]):  # Diffusion-DPO: (winner, loser) by reward
        diffs = []
        for j in (winner, loser):
            x, e, c = _x(data, i, j, a, noise_of=winner if noise == "per_group" else None)
            diffs.append(float((((0.35 * x + c) - e) ** 2).mean()) - float((((0.3 * x + c) - e) ** 2).mean()))
        inside = -0.5 * 50.0 * (diffs[0] - diffs[1])
        losses.append(math.log1p(math.exp(-inside)))
    assert out.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_dpo_is_gdpo_with_two_samples_and_plus_minus_one(policy):
    """SPEC section 5's identity, through the selection: DPO on G = 3 is GDPO on (best, worst) with A = (+1, -1)."""
    unet, abar = policy
    with torch.no_grad():
        for name, p in lora_parameters(unet).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.01)
    data, config = loss_inputs(2, 3, seed=1), GDPOLossConfig(omega=10.0)
    rewards = torch.tensor([[0.1, 0.8, 0.5], [0.9, 0.2, 0.4]])
    ours = dpo_loss(unet, **data, rewards=rewards, alphas_cumprod=abar, config=config)
    pick = torch.tensor([[1, 0], [0, 1]])
    rows = torch.arange(2)[:, None]
    pair = {k: (v[rows, pick] if k != "text_emb" else v) for k, v in data.items()}
    theirs = gdpo_loss(unet, **pair, advantages=torch.tensor([[1.0, -1.0]] * 2), alphas_cumprod=abar, config=config)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    with torch.no_grad():
        for name, p in lora_parameters(unet).items():
            if "lora_B" in name:
                p.zero_()


def test_dpo_on_a_tied_group_is_log_2_without_gradient(policy):
    unet, abar = policy

    def grad_norm(rewards: Tensor) -> tuple[float, float]:
        out = dpo_loss(unet, **loss_inputs(1, 3), rewards=rewards, alphas_cumprod=abar, config=GDPOLossConfig())
        out.loss.backward()
        norm = float(torch.cat([p.grad.flatten() for p in lora_parameters(unet).values()]).norm())
        unet.zero_grad()
        return out.loss.item(), norm

    tied_loss, tied = grad_norm(torch.full((1, 3), 0.5))
    _, untied = grad_norm(torch.tensor([[0.1, 0.5, 0.9]]))
    assert tied_loss == pytest.approx(math.log(2), abs=1e-7)
    # The winner's and loser's terms are two forwards of one sample: they cancel up to float32 rounding.
    assert tied < 1e-4 * untied, (tied, untied)


# --- OARS negative-aware loss ----------------------------------------------------------------------


def test_optimality_is_the_clipped_normalised_advantage():
    a = torch.tensor([-5.0, -2.0, -1.0, 0.0, 0.5, 2.0, 3.0])
    assert optimality(a, 2.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.625, 1.0, 1.0]


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_nft_matches_a_hand_computation(policy, beta):
    _, abar = policy
    toy, data = ToyUNet(base=0.3, lora=0.05), loss_inputs(2, 3, seed=5)
    advantages = torch.tensor([[1.5, -0.5, -1.0], [0.0, 3.0, -3.0]])
    config = NFTLossConfig(beta=beta, adv_max=2.0)
    out = nft_loss(toy, **data, advantages=advantages, alphas_cumprod=abar, config=config)

    a, total = float(abar[250]), 0.0
    for i in range(2):
        for j in range(3):
            x, e, c = _x(data, i, j, a)
            e_theta, e_old = 0.35 * x + c, 0.3 * x + c
            e_pos = (1 - beta) * e_old + beta * e_theta
            e_neg = (1 + beta) * e_old - beta * e_theta
            r = 0.5 + 0.5 * min(max(float(advantages[i, j]) / 2.0, -1.0), 1.0)
            total += r * float(((e_pos - e) ** 2).mean()) + (1 - r) * float(((e_neg - e) ** 2).mean())
    assert out.loss.item() == pytest.approx(total / 6, rel=1e-5)
    assert toy.enabled


def test_nft_at_init_is_the_reference_error(policy):
    """Policy = reference (LoRA B = 0): e_pos = e_neg = e_old, so the loss is the mean reference MSE."""
    unet, abar = policy
    out = nft_loss(unet, **loss_inputs(2, 3), advantages=torch.randn(2, 3), alphas_cumprod=abar, config=NFTLossConfig())
    torch.testing.assert_close(out.loss, out.reference_mse.mean())
    torch.testing.assert_close(out.policy_mse, out.reference_mse)


def _relative_error_change(unet: nn.Module, abar: Tensor, data: dict, advantages: Tensor) -> Tensor:
    """``L_pol - L_ref`` per sample after one gradient step on the NFT loss from policy = reference.

    The step has a fixed small length (1e-3 in parameter space), so its first-order effect dominates.
    """
    params = list(lora_parameters(unet).values())
    saved = [p.detach().clone() for p in params]
    loss = nft_loss(unet, **data, advantages=advantages, alphas_cumprod=abar, config=NFTLossConfig()).loss
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(1e-3 * g / norm)
        after = nft_loss(unet, **data, advantages=advantages, alphas_cumprod=abar, config=NFTLossConfig())
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return (after.policy_mse - after.reference_mse)[0]


def test_one_nft_step_favours_positive_samples_over_negative_ones(policy):
    """r = 1 pulls the policy's estimate toward e_i, r = 0 pushes it away: the ordering flips with the signs.

    As for GDPO (tests/learner/test_gdpo_sign.py), the first-order step guarantees the weighted sum
    ``sum_i A_i d_i < 0``, here ``d_0 < d_1``, not the sign of the move both samples share (on the
    committed model the errors move by -0.0067 and +0.0037; on an earlier tiny model both fell: -0.0053
    and -0.0008).
    """
    unet, abar = policy
    data = loss_inputs(1, 2, seed=3)
    forward = _relative_error_change(unet, abar, data, torch.tensor([[2.0, -2.0]]))
    flipped = _relative_error_change(unet, abar, data, torch.tensor([[-2.0, 2.0]]))
    assert forward[0] < forward[1], forward
    assert flipped[1] < flipped[0], flipped
    torch.testing.assert_close(flipped, -forward, rtol=0.05, atol=1e-6)  # first order: the step is negated

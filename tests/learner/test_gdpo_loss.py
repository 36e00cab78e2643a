"""The pure GDPO loss (SPEC section 5): identities, a hand computation, and where gradients go.

No Ray and no DeepSpeed here: the loss is a function of tensors and a UNet.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import loss_inputs  # tests/learner/loss_inputs.py
from torch import Tensor, nn

from common.naosd import lora_parameters
from learner.gdpo_loss import GDPOLossConfig, gdpo_loss


def _with_nonzero_lora(unet: nn.Module, scale: float) -> nn.Module:
    """Set every LoRA B to small random values so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora_parameters(unet).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return unet


def _diffusion_dpo(unet, *, x_w, x_l, e_w, e_l, cond, t: int, beta: float) -> Tensor:
    """Diffusion-DPO (Wallace et al. 2023), written from its paper: winner w, loser l, ``[B]`` inputs."""

    def mse(x: Tensor, e: Tensor) -> Tensor:
        return ((unet(x, t, encoder_hidden_states=cond).sample - e) ** 2).mean(dim=(1, 2, 3))

    model_w, model_l = mse(x_w, e_w), mse(x_l, e_l)
    unet.disable_adapters()
    with torch.no_grad():
        ref_w, ref_l = mse(x_w, e_w), mse(x_l, e_l)
    unet.enable_adapters()
    logits = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -F.logsigmoid(logits).mean()


# omega multiplies float32 rounding of the per-sample MSE (~1e-7) into the logit: at the paper's
# omega = 5000 two correct float32 implementations agree to ~1e-4 only, at omega = 10 to ~1e-6.
@pytest.mark.parametrize(("omega", "lora_scale", "rtol"), [(5000.0, 1e-4, 1e-3), (10.0, 0.1, 2e-6)])
def test_g2_with_plus_minus_one_is_diffusion_dpo(policy, omega, lora_scale, rtol):
    unet, abar = policy
    _with_nonzero_lora(unet, scale=lora_scale)  # keeps |inside| ~ 1, off the flat tails of logsigmoid
    config = GDPOLossConfig(omega=omega)
    data = loss_inputs(b=3, g=2)
    advantages = torch.tensor([[1.0, -1.0]] * 3)
    ours = gdpo_loss(unet, **data, advantages=advantages, alphas_cumprod=abar, config=config)

    a = abar[config.t_noise]
    x = a.sqrt() * data["latents"] + (1 - a).sqrt() * data["noise"]  # [B, 2, 4, 4, 4]
    noise = data["noise"]
    theirs = _diffusion_dpo(
        unet, x_w=x[:, 0], x_l=x[:, 1], e_w=noise[:, 0], e_l=noise[:, 1],
        cond=data["text_emb"], t=config.t_model, beta=config.omega,
    )  # fmt: skip
    assert 0.05 < ours.loss.item() < 5.0, "the test should sit where the loss is not saturated"
    torch.testing.assert_close(ours.loss, theirs, rtol=rtol, atol=0.0)
    _with_nonzero_lora(unet, scale=0.0)


def test_per_group_noise_is_diffusion_dpos_shared_pair_noise(policy):
    """``noise: per_group`` with G = 2 is Diffusion-DPO as its own code runs it: one noise for winner and loser."""
    unet, abar = policy
    _with_nonzero_lora(unet, scale=1e-4)
    data = loss_inputs(b=3, g=2)
    advantages = torch.tensor([[1.0, -1.0]] * 3)
    config = GDPOLossConfig(noise="per_group")
    ours = gdpo_loss(unet, **data, advantages=advantages, alphas_cumprod=abar, config=config)
    fresh = gdpo_loss(unet, **data, advantages=advantages, alphas_cumprod=abar, config=GDPOLossConfig())

    a = abar[config.t_noise]
    e = data["noise"][:, 0]  # the winner's draw, for both
    x = a.sqrt() * data["latents"] + (1 - a).sqrt() * e[:, None]  # [B, 2, 4, 4, 4]
    theirs = _diffusion_dpo(
        unet, x_w=x[:, 0], x_l=x[:, 1], e_w=e, e_l=e, cond=data["text_emb"], t=config.t_model, beta=config.omega
    )
    assert 0.05 < ours.loss.item() < 5.0, "the test should sit where the loss is not saturated"
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-3, atol=0.0)  # omega 5000: see the test above
    assert abs(ours.loss.item() - fresh.loss.item()) > 1e-2, "per_group must change the loss noise"
    _with_nonzero_lora(unet, scale=0.0)


def test_per_group_noise_gives_identical_samples_a_zero_logit(policy):
    """The point of sharing the noise: members differ only through their latents, so a group of identical
    samples carries no preference at all, whatever the policy.  With a fresh e_i each, the noise alone
    makes a large logit."""
    unet, abar = policy
    _with_nonzero_lora(unet, scale=1e-2)
    data = loss_inputs(b=2, g=3)
    data["latents"] = data["latents"][:, :1].expand_as(data["latents"]).clone()
    advantages = torch.tensor([[1.0, -0.5, -0.5], [-1.0, 0.0, 1.0]])
    kwargs = {**data, "advantages": advantages, "alphas_cumprod": abar}
    shared = gdpo_loss(unet, **kwargs, config=GDPOLossConfig(noise="per_group"))
    fresh = gdpo_loss(unet, **kwargs, config=GDPOLossConfig(noise="per_sample"))
    assert shared.inside.abs().max() < 1e-2, shared.inside  # omega x float32 rounding of equal MSEs
    assert fresh.inside.abs().min() > 1.0, fresh.inside
    _with_nonzero_lora(unet, scale=0.0)


def test_loss_config_rejects_unknown_noise():
    with pytest.raises(ValueError, match="per_sample or per_group"):
        GDPOLossConfig(noise="per_batch")


def test_zero_advantages_give_log_2(policy):
    unet, abar = policy
    _with_nonzero_lora(unet, scale=1e-2)  # policy != reference: the zero must come from the advantages
    out = gdpo_loss(
        unet, **loss_inputs(4, 3), advantages=torch.zeros(4, 3), alphas_cumprod=abar, config=GDPOLossConfig()
    )
    assert torch.equal(out.inside, torch.zeros(4))
    assert out.loss.item() == pytest.approx(math.log(2), rel=0, abs=1e-7)  # float32 rounding of log 2
    assert not torch.equal(out.policy_mse, out.reference_mse)
    _with_nonzero_lora(unet, scale=0.0)


def test_policy_equals_reference_at_init(policy):
    unet, abar = policy
    out = gdpo_loss(
        unet, **loss_inputs(2, 3), advantages=torch.randn(2, 3), alphas_cumprod=abar, config=GDPOLossConfig()
    )
    assert torch.equal(out.policy_mse, out.reference_mse)  # LoRA B = 0 adds exact zeros
    assert torch.equal(out.inside, torch.zeros(2))


def test_gradients_reach_only_the_lora_parameters(policy):
    unet, abar = policy
    unet.zero_grad(set_to_none=True)
    advantages = torch.tensor([[1.0, -0.5, -0.5], [-1.0, 0.0, 1.0]])
    out = gdpo_loss(unet, **loss_inputs(2, 3), advantages=advantages, alphas_cumprod=abar, config=GDPOLossConfig())
    out.loss.backward()
    lora = lora_parameters(unet)
    base_with_grad = [n for n, p in unet.named_parameters() if n not in lora and p.grad is not None]
    assert base_with_grad == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    unet.zero_grad(set_to_none=True)


class ToyUNet(nn.Module):
    """``eps_hat = (base + lora) * x + mean(c)``, with peft's adapter switch; records the timesteps asked."""

    def __init__(self, base: float, lora: float) -> None:
        super().__init__()
        self.base = nn.Parameter(torch.tensor(base), requires_grad=False)
        self.lora = nn.Parameter(torch.tensor(lora))
        self.enabled = True
        self.timesteps: set[int] = set()

    def disable_adapters(self) -> None:
        self.enabled = False

    def enable_adapters(self) -> None:
        self.enabled = True

    def forward(self, x: Tensor, t: int, encoder_hidden_states: Tensor) -> SimpleNamespace:
        self.timesteps.add(int(t))
        scale = self.base + self.lora if self.enabled else self.base
        return SimpleNamespace(sample=scale * x + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def test_matches_a_hand_computation_on_a_toy_unet(policy):
    _, abar = policy
    config = GDPOLossConfig(omega=50.0)
    toy = ToyUNet(base=0.3, lora=0.05)
    data = loss_inputs(2, 3, seed=4)
    advantages = torch.tensor([[1.2, -0.4, -0.8], [0.0, 1.0, -1.0]])
    out = gdpo_loss(toy, **data, advantages=advantages, alphas_cumprod=abar, config=config)

    # Scalar loops in float64, one formula at a time (SPEC section 5).
    a = float(abar[250])
    losses = []
    for i in range(2):
        c = float(data["text_emb"][i].double().mean())
        total = 0.0
        for j in range(3):
            z, e = data["latents"][i, j].double(), data["noise"][i, j].double()
            x = math.sqrt(a) * z + math.sqrt(1 - a) * e
            l_pol = float((((0.3 + 0.05) * x + c - e) ** 2).mean())
            l_ref = float(((0.3 * x + c - e) ** 2).mean())
            total += float(advantages[i, j]) * (l_pol - l_ref)
        inside = -0.5 * 50.0 * total
        losses.append(math.log1p(math.exp(-inside)))  # -log(sigmoid(inside))
    assert toy.timesteps == {100}
    assert out.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert toy.enabled, "the adapter must be switched back on after the reference pass"

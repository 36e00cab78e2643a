"""The NAOSD pre-training loss terms (SPEC section 9) against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.tiny import sd21_scheduler
from learner.pretrain_loss import (
    PretrainLossConfig,
    fake_score_loss,
    generator_loss,
    pixel_loss,
    vsd_loss,
    x0_from_eps,
)
from learner.pretrain_rank import lr_factor

ABAR = sd21_scheduler().alphas_cumprod  # [1000], SPEC section 1


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_pixel_loss_is_mse_by_default_and_l1_as_option():
    sr, hr = _rand(2, 3, 4, 4, seed=0).tanh(), _rand(2, 3, 4, 4, seed=1).tanh()
    assert pixel_loss(sr, hr, "mse") == pytest.approx(float(((sr - hr) ** 2).sum() / sr.numel()), rel=1e-6)
    assert pixel_loss(sr, hr, "l1") == pytest.approx(float((sr - hr).abs().sum() / sr.numel()), rel=1e-6)
    assert PretrainLossConfig().pixel_loss == "mse"


def test_default_weights_are_the_reference_values():
    c = PretrainLossConfig()
    assert (c.lambda_l2, c.lambda_lpips, c.lambda_vsd, c.cfg_scale) == (1.0, 2.0, 1.0, 7.5)
    assert (c.vsd_t_min, c.vsd_t_max, c.lambda_recon, c.lambda_kl) == (20, 980, 0.0, 0.0)


def test_generator_loss_is_the_weighted_sum_of_the_terms():
    sr, hr = _rand(2, 3, 4, 4, seed=0).tanh(), _rand(2, 3, 4, 4, seed=1).tanh()
    config = PretrainLossConfig(lambda_l2=1.5, lambda_lpips=2.0, lambda_vsd=0.25, lambda_recon=3.0, lambda_kl=1e-2)
    lpips = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3)) * 7  # noqa: E731 - a stand-in with a known value
    vsd, recon, kl = torch.tensor(0.8), torch.tensor(0.3), torch.tensor(4.0)
    out = generator_loss(config, sr=sr, hr=hr, lpips=lpips, vsd=lambda: vsd, reconstruction=recon, kl=kl)
    mse = float(((sr - hr) ** 2).mean())
    l1 = float((sr - hr).abs().mean() * 7)
    expected = 1.5 * mse + 2.0 * l1 + 0.25 * 0.8 + 3.0 * 0.3 + 1e-2 * 4.0
    assert float(out.total) == pytest.approx(expected, rel=1e-6)
    assert out.terms == pytest.approx({"pixel": mse, "lpips": l1, "vsd": 0.8, "recon": 0.3, "kl": 4.0}, rel=1e-6)


def test_a_weighted_term_is_never_silently_dropped():
    sr = hr = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="lambda_lpips"):
        generator_loss(PretrainLossConfig(), sr=sr, hr=hr, vsd=lambda: torch.tensor(0.0))
    with pytest.raises(ValueError, match="lambda_vsd"):
        generator_loss(PretrainLossConfig(lambda_lpips=0), sr=sr, hr=hr)
    # A zero weight skips the term, and its callable is never called.
    out = generator_loss(PretrainLossConfig(lambda_lpips=0, lambda_vsd=0), sr=sr, hr=hr, vsd=lambda: 1 / 0)
    assert set(out.terms) == {"pixel"}


@pytest.mark.parametrize("bad", [{"lambda_vsd": float("nan")}, {"lambda_l2": -1.0}, {"vsd_t_min": 980},
                                 {"pixel_loss": "l2"}, {"lambda_kl": float("inf")}])  # fmt: skip
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        PretrainLossConfig(**bad)


def _linear_scores():
    """Stand-in score networks with a known closed form: eps = a * z_t + b * mean(text) (+ t-dependence)."""

    def real(z, t, emb):
        return 0.3 * z + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-3 * t.view(-1, 1, 1, 1)

    def fake(z, t, emb):
        return -0.2 * z + 0.5 * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    return real, fake


def test_vsd_matches_a_hand_computation_and_its_gradient_is_two_grad_over_n():
    abar = ABAR
    z_sr = _rand(2, 4, 3, 3, seed=0).requires_grad_(True)
    noise, t = _rand(2, 4, 3, 3, seed=1), torch.tensor([20, 700])
    text, negative = _rand(2, 5, 8, seed=2), _rand(2, 5, 8, seed=3)
    real, fake = _linear_scores()
    loss = vsd_loss(z_sr, noise=noise, timesteps=t, text_emb=text, negative_emb=negative, real=real, fake=fake,
                    alphas_cumprod=abar, cfg_scale=7.5)  # fmt: skip
    # By hand, sample by sample.
    expected_grad = torch.empty_like(z_sr)
    for i in range(2):
        a = abar[t[i]]
        z_t = a.sqrt() * z_sr[i].detach() + (1 - a).sqrt() * noise[i]
        eps_fake = -0.2 * z_t + 0.5 * text[i].mean()
        eps_text = 0.3 * z_t + text[i].mean() + 1e-3 * t[i]
        eps_unc = 0.3 * z_t + negative[i].mean() + 1e-3 * t[i]
        eps_real = eps_unc + 7.5 * (eps_text - eps_unc)
        x0_fake = (z_t - (1 - a).sqrt() * eps_fake) / a.sqrt()
        x0_real = (z_t - (1 - a).sqrt() * eps_real) / a.sqrt()
        w = (z_sr[i].detach() - x0_real).abs().mean()
        expected_grad[i] = (x0_fake - x0_real) / w
    torch.testing.assert_close(loss, expected_grad.pow(2).mean(), rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(loss, z_sr)
    torch.testing.assert_close(grad, 2 * expected_grad / z_sr.numel(), rtol=1e-5, atol=1e-8)


def test_vsd_vanishes_when_the_fake_score_equals_the_guided_real_score():
    z_sr = _rand(1, 4, 3, 3, seed=0).requires_grad_(True)
    text = _rand(1, 5, 8, seed=2)
    real = lambda z, t, emb: 0.1 * z  # noqa: E731 - prompt-independent, so CFG leaves it unchanged
    loss = vsd_loss(z_sr, noise=_rand(1, 4, 3, 3, seed=1), timesteps=torch.tensor([500]), text_emb=text,
                    negative_emb=text * 0, real=real, fake=real, alphas_cumprod=ABAR, cfg_scale=7.5)  # fmt: skip
    assert float(loss) == 0.0


def test_fake_score_loss_is_the_diffusion_loss_on_the_detached_latent():
    z_sr = _rand(2, 4, 3, 3, seed=0).requires_grad_(True)
    noise, t, text = _rand(2, 4, 3, 3, seed=1), torch.tensor([0, 999]), _rand(2, 5, 8, seed=2)
    _, fake = _linear_scores()
    loss = fake_score_loss(z_sr, noise=noise, timesteps=t, text_emb=text, fake=fake, alphas_cumprod=ABAR)
    a = ABAR[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z_sr.detach() + (1 - a).sqrt() * noise
    torch.testing.assert_close(loss, F.mse_loss(fake(z_t, t, text), noise))
    assert not loss.requires_grad or torch.autograd.grad(loss, z_sr, allow_unused=True)[0] is None


def test_x0_from_eps_inverts_q_sample():
    z, eps, a = _rand(1, 4, 2, 2, seed=0), _rand(1, 4, 2, 2, seed=1), ABAR[250]
    torch.testing.assert_close(x0_from_eps(a.sqrt() * z + (1 - a).sqrt() * eps, eps, a), z)


def test_lr_schedule_is_constant_or_cosine_to_zero():
    assert [lr_factor(s, 0) for s in (0, 10, 10**6)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 100) == 1.0 and lr_factor(50, 100) == pytest.approx(0.5) and lr_factor(100, 100) == 0.0
    assert lr_factor(25, 100) == pytest.approx(0.5 * (1 + 2**-0.5)) and lr_factor(500, 100) == 0.0

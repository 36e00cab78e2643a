"""RFSR's reward feedback (SPEC section 10): each term by hand, the one-step forward against NAOSD, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.naosd import ModelConfig, lora_parameters, q_sample
from common.weights import build_naosd
from learner.config import LearnerConfig
from learner.reward_feedback import RewardFeedbackConfig, gram_kl, gram_matrix, haar_ll, reward_feedback_loss
from learner.reward_feedback_model import (
    VGG16Features,
    build_reward_feedback,
    build_reward_metric,
    one_step_sr,
    reward_feedback_objective,
    sobel_sharpness,
)

TINY = RewardFeedbackConfig(metric="sobel_sharpness", features="tiny_conv")


def test_haar_ll_is_the_orthonormal_low_low_band():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert haar_ll(x).item() == 5.0  # (1 + 2 + 3 + 4) / 2
    # Parseval: with the three detail bands of the same orthonormal transform, the energy is kept.
    y = torch.randn(1, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    a, b, c, d = y[..., ::2, ::2], y[..., ::2, 1::2], y[..., 1::2, ::2], y[..., 1::2, 1::2]
    details = [(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2]
    energy = haar_ll(y).pow(2).sum() + sum(band.pow(2).sum() for band in details)
    torch.testing.assert_close(energy, y.pow(2).sum())


def test_gram_matrix_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C = 2 channels, h*w = 2
    torch.testing.assert_close(gram_matrix(f), torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))


def test_gram_kl_by_hand():
    pol = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # Gram [[1, 0], [0, 0]] -> softmax (e, 1, 1, 1) / (e + 3)
    ref = torch.zeros(1, 2, 1, 1)  # Gram 0 -> uniform 1/4
    # KL(uniform || p) = 1/4 * sum(log(1/4) - log p_k) = log((e + 3) / 4) - 1/4
    assert gram_kl([pol], [ref]).item() == pytest.approx(math.log((math.e + 3) / 4) - 0.25, rel=1e-6)
    assert gram_kl([pol, pol], [pol, pol]).item() == pytest.approx(0.0, abs=1e-7)


def test_gram_kl_near_the_reference_is_positive():
    """Where training starts the policy's Gram barely differs from the reference's: a KL under float32's rounding."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 64, 8, 8, generator=gen)
    pol = ref + 1e-3 * torch.randn(ref.shape, generator=gen)
    ours = gram_kl([pol], [ref])
    grams = [f.double().flatten(2) @ f.double().flatten(2).transpose(1, 2) / 64 for f in (pol, ref)]  # h w = 64
    log_p, log_q = (g.flatten(1).log_softmax(dim=1) for g in grams)
    exact = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    assert (ours > 0).all(), ours
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)


def test_loss_by_hand():
    sr, hr = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), 0.25)
    sr_ref = torch.zeros(1, 3, 2, 2)
    sr_ref[0, 0, 0, 0] = 2.0  # Gram 2^2 / (h w) = 1 at (0, 0), 0 elsewhere; sr's Gram is 0.25 everywhere
    config = RewardFeedbackConfig(lambda_reward=1.0, lambda_ll=2.0, lambda_gram=3.0, features="tiny_conv")
    out = reward_feedback_loss(sr, sr_ref, hr, reward=lambda x: x.mean(dim=(1, 2, 3)),
                               features=lambda x: [x], config=config)  # fmt: skip
    # R = 0.5; |LL(sr) - LL(hr)| = 2 * 0.5 - 2 * 0.25 = 0.5;
    # KL(q || p), p = softmax(sr's Gram) = 1/9 each, q = softmax(sr_ref's Gram) = (e, 1, ..., 1) / (e + 8):
    # sum q log q + log 9 = e / (e + 8) - log(e + 8) + log 9 (~0.0789, > 0)
    kl = math.e / (math.e + 8) - math.log(math.e + 8) + math.log(9)
    assert (out.reward.item(), out.ll_l1.item(), out.gram_kl.item()) == pytest.approx((0.5, 0.5, kl), abs=1e-6)
    assert out.loss.item() == pytest.approx(-1.0 * 0.5 + 2.0 * 0.5 + 3.0 * kl, abs=1e-6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    naosd = build_naosd(ModelConfig())
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in lora_parameters(naosd.unet).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    return naosd


def _pair(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hr = torch.randint(0, 256, (2, 3, 16, 16), generator=gen, dtype=torch.uint8)
    return {"lr": hr.flip(-1), "hr": hr, "noise": torch.randn(2, 2, 4, 4, 4, generator=gen)}


def test_one_step_sr_is_naosd_with_given_noises(model):
    data = _pair()
    lr = data["lr"].float() / 127.5 - 1
    emb = model.encode_prompts(["", ""])
    kw = {"alphas_cumprod": model.alphas_cumprod, "t_add": model.t_add, "t_diff": model.t_diff}
    with torch.no_grad():
        ours = one_step_sr(model.unet, model.vae, lr=lr, text_emb=emb, noise_posterior=data["noise"][:, 0],
                           noise_add=data["noise"][:, 1], **kw)  # fmt: skip
        posterior = model.vae.encode(lr).latent_dist
        z_lr = (posterior.mean + posterior.std * data["noise"][:, 0]) * model.scaling_factor
        theirs = model.decode(model.denoise(q_sample(z_lr, data["noise"][:, 1], model.abar(model.t_add)), emb))
    torch.testing.assert_close(ours, theirs)


def test_gradients_reach_the_lora_through_the_vae_decoder(model):
    modules = build_reward_feedback(ModelConfig(), TINY, torch.device("cpu"))
    out = reward_feedback_objective(model.unet, modules, **_pair(), text_emb=model.encode_prompts(["", ""]),
                                    alphas_cumprod=model.alphas_cumprod, config=TINY)  # fmt: skip
    out.loss.backward()
    grads = [p.grad for p in lora_parameters(model.unet).values()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in modules.vae.parameters()), "the VAE is frozen"
    assert out.gram_kl.min() > 0, "policy and reference differ, so their Gram statistics do"
    model.unet.zero_grad()


def test_one_step_on_the_reward_alone_raises_it(model):
    """The sign of the chain: a gradient step on -R makes the policy's SR sharper on the same inputs."""
    config = RewardFeedbackConfig(metric="sobel_sharpness", features="tiny_conv", lambda_ll=0.0, lambda_gram=0.0)
    modules = build_reward_feedback(ModelConfig(), config, torch.device("cpu"))
    kw = {**_pair(1), "text_emb": model.encode_prompts(["", ""]), "alphas_cumprod": model.alphas_cumprod,
          "config": config}  # fmt: skip
    params = list(lora_parameters(model.unet).values())
    saved = [p.detach().clone() for p in params]
    before = reward_feedback_objective(model.unet, modules, **kw)
    before.loss.backward()
    torch.optim.SGD(params, lr=0.05).step()
    with torch.no_grad():
        after = reward_feedback_objective(model.unet, modules, **kw)
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    model.unet.zero_grad()
    assert float(after.reward.mean()) > float(before.reward.mean())


def test_sobel_sharpness_of_a_step_edge():
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1.0
    # kornia's normalised Sobel (kernel / 8) gives 0.5 on the two columns beside the edge; its magnitude is
    # sqrt(gx^2 + gy^2 + 1e-6), so the six flat columns give 1e-3 each
    assert sobel_sharpness(edge).item() == pytest.approx((2 * 0.5 + 6 * 1e-3) / 8, rel=1e-4)


def test_pyiqa_metric_is_the_reward_services_score_on_the_unit_scale():
    from reward_service.config import RewardConfig
    from reward_service.metrics_iqa import build_pyiqa_metric

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reward = build_reward_metric(RewardFeedbackConfig(metric="piqe"), torch.device("cpu"))
    piqe = build_pyiqa_metric("piqe", RewardConfig(fr_metrics=(), nr_metrics=("piqe",), weighting="nr_only"))
    np.testing.assert_allclose(reward(images).detach().numpy(), 1 - piqe(images, images).numpy() / 100, rtol=1e-5)


def test_missing_weights_are_errors_not_dropped_terms(tmp_path):
    with pytest.raises(ValueError, match="musiq_koniq"):
        build_reward_metric(RewardFeedbackConfig(metric="musiq", weights_dir=str(tmp_path)), torch.device("cpu"))
    with pytest.raises(ValueError, match="vgg_weights_path"):
        VGG16Features(str(tmp_path / "vgg16-397923af.pth"))
    with pytest.raises(ValueError, match="vgg_weights_path"):
        LearnerConfig(objective="reward_feedback")  # features default to vgg16, no path given


def test_vgg16_features_load_a_local_state_dict(tmp_path):
    import torchvision

    path = tmp_path / "vgg16.pth"  # the layers up to relu3_3 under torchvision's key names (7 MB, not 528)
    body = torchvision.models.vgg16(weights=None).features[:16]
    torch.save({f"features.{k}": v for k, v in body.state_dict().items()}, path)
    feats = VGG16Features(str(path))(torch.rand(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256]


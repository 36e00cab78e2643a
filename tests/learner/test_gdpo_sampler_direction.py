"""Which way Eq. 9 moves a *one-step* sampler: toward the preferred sample only if the model shrinks.

Eq. 9 lowers the policy's noise-prediction error on the preferred member's re-noised latent.  With one
loss noise ``e`` shared by the group and advantages summing to zero, its gradient on a bias ``b`` of the
noise prediction is proportional to ``sum_i A_i eps_hat(x_i)``; NAOSD's step 4 turns ``b`` into
``-sqrt(1 - abar[t_diff]) / sqrt(abar[t_diff]) * b`` on the sample.  So the step follows the preference
only where ``eps_hat`` rises with ``z0`` (a denoiser that shrinks toward its prior).  A one-step model that
returns a direction exactly from a ``t_add``-noised input (``z0_hat = x / sqrt(abar[t_add])``, asked at
``t_diff < t_add``) has ``eps_hat`` *falling* with ``z0``, and the step moves its samples away from the
preferred one.  The README ("Does GDPO improve it?") measures both on the committed tiny model.

These tests drive the real :func:`gdpo_loss` on the real schedule with a linear noise predictor
``eps_hat = k x + b`` whose bias ``b`` is the adapter, and apply step 4 by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from learner.gdpo_loss import GDPOLossConfig, gdpo_loss

T_ADD, T_DIFF = 250, 100  # SPEC section 2; the loss re-noises at 250 and asks at 100 (section 5)


@pytest.fixture(scope="module")
def abar(policy) -> torch.Tensor:
    return policy[1]


class LinearNoisePredictor(torch.nn.Module):
    """``eps_hat = k * x + b``; ``b`` (zero at start) is the adapter, off for the reference."""

    def __init__(self, k: float, channels: int) -> None:
        super().__init__()
        self.k = k
        self.bias = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.adapter_on = True

    def disable_adapters(self) -> None:
        self.adapter_on = False

    def enable_adapters(self) -> None:
        self.adapter_on = True

    def forward(self, x: torch.Tensor, t: int, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.k * x + (self.bias if self.adapter_on else 0.0))


def _k_for_gain(gain: float, abar: torch.Tensor) -> float:
    """The ``k`` whose one-step sample is ``gain * z0`` when fed ``sqrt(abar[t_add]) * z0`` (step 4 at ``t_diff``)."""
    a_add, a_diff = abar[T_ADD].sqrt(), abar[T_DIFF].sqrt()
    return float((1 - gain * a_diff / a_add) / (1 - abar[T_DIFF]).sqrt())


def _exact_k(abar: torch.Tensor) -> float:
    """The ``k`` for which step 4 at ``t_diff`` returns ``x / sqrt(abar[t_add])``: a model exact in every direction."""
    return _k_for_gain(1.0, abar)


def _sample_mean_change(k: float, abar: torch.Tensor) -> float:
    """One gradient step on Eq. 9 for a group of two whose preferred member is brighter (larger latent mean);
    returns how much the one-step sample's mean moves (step 4 on a fixed ``t_add``-noised input)."""
    torch.manual_seed(0)
    unet = LinearNoisePredictor(k, channels=4)
    shared = torch.randn(4, 8, 8)
    latents = torch.stack([shared + 0.5, shared - 0.5]).unsqueeze(0)  # [1, G=2, 4, 8, 8]: member 0 is brighter
    out = gdpo_loss(
        unet,
        latents=latents,
        noise=torch.randn(latents.shape),
        text_emb=torch.zeros(1, 1, 1),
        advantages=torch.tensor([[1.0, -1.0]]),  # member 0 preferred
        alphas_cumprod=abar,
        config=GDPOLossConfig(noise="per_group", omega=1.0),
    )
    (grad,) = torch.autograd.grad(out.loss, [unet.bias])
    step = -1e-2 * grad  # plain gradient descent
    a_diff, s_diff = abar[T_DIFF].sqrt(), (1 - abar[T_DIFF]).sqrt()
    return float((-s_diff / a_diff * step).mean())  # step 4: z_sr = (z~ - s eps_hat) / a, so b moves it by -s/a b


def test_the_exact_one_step_slope_is_a_spec_constant(abar: torch.Tensor) -> None:
    """d eps_hat / d z0 of the exact model at SPEC's timesteps (abar[100] = 0.89422, abar[250] = 0.67379):
    what bench_gdpo_gradient prints as the reference."""
    slope = float(abar[T_ADD].sqrt()) * _exact_k(abar)
    assert slope == pytest.approx(-0.38367, abs=1e-4)


def test_a_shrinking_denoiser_moves_toward_the_preferred_sample(abar: torch.Tensor) -> None:
    # k > 0: eps_hat rises with z0, as for a denoiser that pulls its estimate toward a zero-mean prior.
    assert _sample_mean_change(0.5, abar) > 0


def test_an_exact_one_step_model_moves_away_from_the_preferred_sample(abar: torch.Tensor) -> None:
    assert _exact_k(abar) < 0
    assert _sample_mean_change(_exact_k(abar), abar) < 0


def test_the_step_follows_the_preference_only_below_the_gain_threshold(abar: torch.Tensor) -> None:
    """A sampler that passes a direction of its input through with gain ``dz_sr/dz0`` is moved toward the preferred
    sample only if that gain is below ``sqrt(abar[250]) / sqrt(abar[100])`` (README: 0.868).  An SR model keeps
    the LR's brightness (gain about 1), so brightness is learnt backward whatever the model was trained from."""
    threshold = float(abar[T_ADD].sqrt() / abar[T_DIFF].sqrt())
    assert threshold == pytest.approx(0.8680, abs=1e-4)
    assert _k_for_gain(threshold, abar) == pytest.approx(0.0, abs=1e-6)  # eps_hat flat in z0: no move
    assert _sample_mean_change(_k_for_gain(0.8, abar), abar) > 0  # shrinks: forward
    assert _sample_mean_change(_k_for_gain(0.95, abar), abar) < 0  # faithful: backward
    assert _sample_mean_change(_k_for_gain(1.0, abar), abar) < 0

"""Real-ESRGAN degradation (SPEC section 6): shapes, determinism, each stage's measured effect, kernels."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special
from skimage import data

from common.config import from_mapping
from sr_data import kernels as K
from sr_data.degradation import (
    DegradationConfig,
    _distinct_levels,
    blur,
    degrade,
    degrade_lr,
    gaussian_noise,
    jpeg,
    poisson_noise,
    quantize,
    resize,
)


def photo(size: int = 64, batch: int = 2) -> torch.Tensor:
    """``[batch, 3, size, size]`` crops of real photos in [0, 1] (astronaut, cat)."""
    images = [data.astronaut(), data.chelsea()]
    out = []
    for i in range(batch):
        x = torch.from_numpy(images[i % 2]).permute(2, 0, 1).float()[None] / 255
        out.append(F.interpolate(x, size=(size, size), mode="area"))
    return torch.cat(out)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def high_freq_energy(x: torch.Tensor) -> float:
    """Mean squared response of a Laplacian: the energy at the highest spatial frequencies."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(x.shape[1], 1, 3, 3)
    return float(F.conv2d(x, lap, groups=x.shape[1]).pow(2).mean())


def blockiness(x: torch.Tensor) -> tuple[float, float]:
    """Mean |horizontal step| across 8-pixel block boundaries, and at all other column pairs."""
    diff = (x[..., 1:] - x[..., :-1]).abs()  # diff[..., j] is between columns j and j + 1
    at_boundary = torch.zeros(diff.shape[-1], dtype=torch.bool)
    at_boundary[7::8] = True
    return float(diff[..., at_boundary].mean()), float(diff[..., ~at_boundary].mean())


# --- the whole pipeline ------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DegradationConfig(), DegradationConfig.realesrgan()], ids=["gdpo", "realesrgan"])
def test_shapes_range_dtype_and_8bit(config: DegradationConfig) -> None:
    hr = photo(64, batch=3)
    for seed in range(6):  # different seeds take different branches (noise kind, order, resizes)
        lr_up = degrade(hr, gen(seed), config)
        assert lr_up.shape == hr.shape and lr_up.dtype == hr.dtype
        assert lr_up.min() >= 0.0 and lr_up.max() <= 1.0
        assert torch.equal(lr_up, quantize(lr_up))  # on the 8-bit grid
    lr = degrade_lr(hr, gen(0), config)
    assert lr.shape == (3, 3, 16, 16) and torch.equal(lr, quantize(lr))


def test_same_seed_same_output_different_seed_differs() -> None:
    hr = photo(64)
    a, b = degrade(hr, gen(7)), degrade(hr, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, degrade(hr, gen(8)))
    torch.manual_seed(0)  # the global RNG plays no part
    c = degrade(hr, gen(7))
    torch.manual_seed(123)
    assert torch.equal(c, degrade(hr, gen(7)))


def test_independent_samples_mode_and_degradation_changes_the_image() -> None:
    hr = photo(64, batch=2)
    out = degrade(hr, gen(3), DegradationConfig(independent_samples=True))
    assert out.shape == hr.shape
    assert (out - hr).abs().mean() > 0.01  # it is degraded, not a copy


def test_tiny_images_do_not_break_reflect_padding() -> None:
    hr = photo(16, batch=1)  # after a x0.15 resize the image is a few pixels: smaller than half a kernel
    for seed in range(10):
        assert degrade(hr, gen(seed), DegradationConfig.realesrgan()).shape == hr.shape


# SPEC section 6, written out: the lighter GDPO set (the dataclass defaults).  Real-ESRGAN's
# second stage always runs here (second_phase_prob 1.0 has no field); blur kernels are drawn at odd
# sizes 7..21 and padded to 21 x 21 ("size 21"), as Real-ESRGAN's kernel_range.
GDPO_DEFAULTS = {
    "scale": 4,
    "kernel_sizes": (7, 9, 11, 13, 15, 17, 19, 21),
    "kernel_list": ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"),
    "kernel_prob": (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    "sinc_prob": 0.1,
    "blur_sigma": (0.2, 3.0),
    "betag_range": (0.5, 4.0),
    "betap_range": (1.0, 2.0),
    "resize_prob": (0.2, 0.7, 0.1),
    "resize_range": (0.3, 1.5),
    "gaussian_noise_prob": 0.5,
    "noise_range": (1.0, 15.0),
    "poisson_scale_range": (0.05, 2.0),
    "gray_noise_prob": 0.4,
    "jpeg_range": (60.0, 95.0),
    "second_blur_prob": 0.5,
    "sinc_prob2": 0.1,
    "blur_sigma2": (0.2, 1.5),
    "betag_range2": (0.5, 4.0),
    "betap_range2": (1.0, 2.0),
    "resize_prob2": (0.3, 0.4, 0.3),
    "resize_range2": (0.6, 1.2),
    "gaussian_noise_prob2": 0.5,
    "noise_range2": (1.0, 12.0),
    "poisson_scale_range2": (0.05, 1.0),
    "gray_noise_prob2": 0.4,
    "jpeg_range2": (60.0, 100.0),
    "final_sinc_prob": 0.8,
    "resize_modes": ("area", "bilinear", "bicubic"),
    "upscale_modes": ("bicubic", "bilinear", "area"),
    "independent_samples": False,
}
# Real-ESRGAN x4plus (BasicSR's train_RealESRGANx4plus.yml, OSEDiff's set): the heavier ranges, the
# same kernels and probabilities (resize_prob2 is [0.3, 0.4, 0.3] there too).
REALESRGAN_DEFAULTS = {
    **GDPO_DEFAULTS,
    "resize_range": (0.15, 1.5),
    "noise_range": (1.0, 30.0),
    "poisson_scale_range": (0.05, 3.0),
    "jpeg_range": (30.0, 95.0),
    "second_blur_prob": 0.8,
    "resize_range2": (0.3, 1.2),
    "noise_range2": (1.0, 25.0),
    "poisson_scale_range2": (0.05, 2.5),
    "jpeg_range2": (30.0, 95.0),
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [(DegradationConfig(), GDPO_DEFAULTS), (DegradationConfig.realesrgan(), REALESRGAN_DEFAULTS)],
    ids=["gdpo", "realesrgan"],
)
def test_every_default_matches_the_reference(config: DegradationConfig, expected: dict[str, object]) -> None:
    """Every field, so that no default drifts unnoticed (a new field must be added here too)."""
    assert dataclasses.asdict(config) == expected


def test_configs_validate() -> None:
    assert DegradationConfig.realesrgan(jpeg_range2=(50.0, 90.0)).jpeg_range2 == (50.0, 90.0)  # overrides win
    assert from_mapping(DegradationConfig, {"noise_range": [1, 5]}).noise_range == (1.0, 5.0)
    for bad in ({"kernel_prob": (0.5, 0.5, 0, 0, 0, 0.1)}, {"kernel_sizes": (8,)}, {"jpeg_range2": (0.0, 95.0)},
                {"resize_range": (1.5, 0.3)}, {"sinc_prob": 1.5}, {"upscale_modes": ("nearest",)},
                {"resize_prob2": (0.5, 0.5, 0.5)}):  # fmt: skip
        with pytest.raises(ValueError):
            DegradationConfig(**bad)


# --- each stage, measured ----------------------------------------------------------------------


def test_blur_lowers_high_frequency_energy() -> None:
    hr = photo(64)
    kernel = K.bivariate_gaussian(21, 2.0, 2.0, 0.0).float()[None]
    blurred = blur(hr, kernel.expand(2, -1, -1))
    assert high_freq_energy(blurred) < 0.2 * high_freq_energy(hr)
    assert torch.allclose(blurred.mean(), hr.mean(), atol=0.01)  # a normalised kernel keeps the brightness
    assert torch.allclose(blur(hr, K.pulse_kernel().float()[None]), hr, atol=1e-6)  # the identity kernel


def test_gaussian_noise_raises_variance_of_a_flat_image_by_sigma_squared() -> None:
    flat = torch.full((2, 3, 64, 64), 0.5)
    sigma = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1) / 255
    noisy = gaussian_noise(flat, gen(0), sigma, gray=torch.zeros(2, 1, 1, 1))
    var = noisy.var(dim=(1, 2, 3))
    assert torch.allclose(var, sigma.flatten() ** 2, rtol=0.15)
    mono = gaussian_noise(flat, gen(0), sigma, gray=torch.ones(2, 1, 1, 1))
    assert torch.equal(mono[:, 0], mono[:, 1]) and torch.equal(mono[:, 1], mono[:, 2])  # grey noise


def test_poisson_noise_variance_matches_shot_noise() -> None:
    img = torch.full((2, 3, 64, 64), 128 / 255)
    img[:, :, 0, :] = (torch.arange(64.0) + 100) / 255  # 64 distinct levels (128 among them): 64 counts per unit
    scale = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    noisy = poisson_noise(img, gen(0), scale, gray=torch.zeros(2, 1, 1, 1))
    var = (noisy - img)[..., 8:, :].var(dim=(1, 2, 3))  # the flat part
    # shot noise: counts ~ Poisson(x * vals), so var(noise) = scale^2 * x / vals
    expected = scale.flatten() ** 2 * (128 / 255) / 64
    assert torch.allclose(var, expected, rtol=0.15)
    mixed = poisson_noise(img, gen(1), scale, gray=torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
    assert torch.equal(mixed[0, 0], mixed[0, 2]) and not torch.equal(mixed[1, 0], mixed[1, 2])  # grey vs colour
    assert _distinct_levels(img).tolist() == [len(torch.unique(s)) for s in img] == [64, 64]


def test_jpeg_leaves_8x8_block_artefacts() -> None:
    hr = photo(128, batch=1)
    before_boundary, before_inside = blockiness(hr)
    coded = jpeg(hr, torch.tensor([20.0]))
    after_boundary, after_inside = blockiness(coded)
    assert before_boundary / before_inside < 1.1  # a photo has no 8-pixel grid
    assert after_boundary / after_inside > 1.3
    assert (coded - hr).abs().mean() > 0.005


def test_resize_sizes_and_modes() -> None:
    hr = photo(64)
    for mode in ("area", "bilinear", "bicubic"):
        assert resize(hr, (13, 21), mode).shape == (2, 3, 13, 21)
    assert resize(hr, (64, 64), "bicubic") is hr


# --- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 13, 21])
def test_kernel_generators_are_normalised_and_sized(size: int) -> None:
    kernels = [
        K.bivariate_gaussian(size, 1.5, 0.7, 0.3),
        K.bivariate_generalized_gaussian(size, 1.5, 0.7, 0.3, beta=0.7),
        K.bivariate_plateau(size, 1.5, 0.7, 0.3, beta=1.5),
        K.circular_lowpass_kernel(math.pi / 2, size),
    ]
    for kernel in kernels:
        assert kernel.shape == (size, size)
        assert math.isclose(float(kernel.sum()), 1.0, abs_tol=1e-9)
    assert K.circular_lowpass_kernel(1.0, size, pad_to=21).shape == (21, 21)


def test_isotropic_kernel_is_symmetric_and_rotation_swaps_axes() -> None:
    iso = K.bivariate_gaussian(11, 1.8, 1.8, 0.0)
    assert torch.allclose(iso, iso.T) and torch.allclose(iso, iso.flip(0)) and torch.allclose(iso, iso.flip(1))
    assert int(iso.argmax()) == 11 * 5 + 5  # peak at the centre
    rotated = K.bivariate_gaussian(11, 2.5, 0.8, math.pi / 2)
    assert torch.allclose(rotated, K.bivariate_gaussian(11, 0.8, 2.5, 0.0), atol=1e-12)
    gen_beta1 = K.bivariate_generalized_gaussian(11, 2.5, 0.8, 0.4, beta=1.0)
    assert torch.allclose(gen_beta1, K.bivariate_gaussian(11, 2.5, 0.8, 0.4))  # beta = 1 is the Gaussian


def test_sinc_kernel_matches_its_closed_form() -> None:
    cutoff, size = 1.3, 21
    kernel = K.circular_lowpass_kernel(cutoff, size)
    c = size // 2
    r = 5.0  # the point (dx, dy) = (3, 4)
    closed_form = cutoff * special.j1(cutoff * r) / (2 * math.pi * r)
    centre = cutoff**2 / (4 * math.pi)  # the limit at r = 0
    ratio = float(kernel[c + 4, c + 3] / kernel[c, c])  # normalisation cancels in the ratio
    assert math.isclose(ratio, closed_form / centre, rel_tol=1e-5)  # torch's float64 J1 agrees with scipy to ~1e-6
    assert math.isclose(float(kernel[c + 3, c + 4]), float(kernel[c + 4, c + 3]), rel_tol=1e-12)


def test_random_kernels_are_reproducible_padded_and_normalised() -> None:
    cfg = DegradationConfig()
    args = dict(sizes=cfg.kernel_sizes, kinds=cfg.kernel_list, probs=cfg.kernel_prob, sigma_range=cfg.blur_sigma,
                betag_range=cfg.betag_range, betap_range=cfg.betap_range)  # fmt: skip
    for seed in range(20):
        kernel = K.random_blur_kernel(gen(seed), sinc_prob=0.5, **args)
        assert kernel.shape == (21, 21) and math.isclose(float(kernel.sum()), 1.0, abs_tol=1e-9)
        assert torch.equal(kernel, K.random_blur_kernel(gen(seed), sinc_prob=0.5, **args))
    assert torch.equal(K.random_final_sinc_kernel(gen(0), sizes=(7,), prob=0.0), K.pulse_kernel())
    sinc = K.random_final_sinc_kernel(gen(0), sizes=(7,), prob=1.0)
    assert sinc.shape == (21, 21) and not torch.equal(sinc, K.pulse_kernel())
    kinds = {K.choice(gen(s), 6, cfg.kernel_prob) for s in range(200)}
    assert kinds == set(range(6))  # every kind is reachable
    assert np.isclose(np.mean([K.choice(gen(s), 3, (0.2, 0.7, 0.1)) == 1 for s in range(400)]), 0.7, atol=0.08)

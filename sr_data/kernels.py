"""Blur kernels of the Real-ESRGAN degradation (SPEC section 6), in plain torch.

Deterministic generators (``bivariate_*``, :func:`circular_lowpass_kernel`)
build one ``[k, k]`` float64 kernel normalised to sum 1; the ``random_*``
samplers draw their parameters from a ``torch.Generator`` (never the global
RNG), so a degradation is reproducible from its seed.  Kernel formulas follow
Real-ESRGAN's ``basicsr.data.degradations``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
MAX_KERNEL_SIZE = 21  # Real-ESRGAN pads every kernel to 21 x 21 so a batch stacks


# --- sampling helpers: every draw goes through the caller's generator ---------------------------


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float uniform in ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def choice(generator: torch.Generator, n: int, probs: Sequence[float] | None = None) -> int:
    """An index in ``range(n)``, uniform or with ``probs``."""
    weights = torch.ones(n) if probs is None else torch.tensor(probs, dtype=torch.float64)
    return int(torch.multinomial(weights.to(generator.device), 1, generator=generator))


def sample_beta(generator: torch.Generator, beta_range: Sequence[float]) -> float:
    """Shape exponent: half the time below 1, half above (Real-ESRGAN's split sampling)."""
    if uniform(generator, 0.0, 1.0) < 0.5:
        return uniform(generator, beta_range[0], 1.0)
    return uniform(generator, 1.0, beta_range[1])


# --- deterministic kernel formulas -------------------------------------------------------------


def mesh_grid(size: int) -> Tensor:
    """``[k, k, 2]`` pixel offsets ``(x, y)`` from the kernel centre (odd ``size``)."""
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack((xx, yy), dim=-1)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """``[k, k]`` Mahalanobis term ``g^T S^-1 g`` of a rotated 2-D Gaussian covariance."""
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    grid = mesh_grid(size)
    return torch.einsum("hwi,ij,hwj->hw", grid, torch.linalg.inv(cov), grid)


def _check_size(size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")


def bivariate_gaussian(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """``[k, k]`` anisotropic Gaussian, rotated by ``theta`` radians, sum 1."""
    _check_size(size)
    kernel = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return kernel / kernel.sum()


def bivariate_generalized_gaussian(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> Tensor:
    """``[k, k]`` generalised Gaussian ``exp(-0.5 q^beta)``: beta < 1 peaky, > 1 flat-topped."""
    _check_size(size)
    kernel = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta)
    return kernel / kernel.sum()


def bivariate_plateau(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> Tensor:
    """``[k, k]`` plateau kernel ``1 / (q^beta + 1)``: a flat top with heavy tails."""
    _check_size(size)
    kernel = 1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta) ** beta + 1.0)
    return kernel / kernel.sum()


def circular_lowpass_kernel(cutoff: float, size: int, pad_to: int = 0) -> Tensor:
    """``[k, k]`` (or ``[pad_to, pad_to]``) ideal 2-D low-pass (sinc) filter, sum 1.

    ``h(r) = cutoff * J1(cutoff * r) / (2 pi r)`` with the limit ``cutoff^2 / (4 pi)``
    at ``r = 0``; ``cutoff`` is the angular cut-off frequency in radians/pixel.
    """
    _check_size(size)
    r = mesh_grid(size).norm(dim=-1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)  # avoid 0/0; the centre is set below
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * math.pi)
    kernel = kernel / kernel.sum()
    return pad_kernel(kernel, pad_to) if pad_to > size else kernel


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a centred odd ``[k, k]`` kernel to ``[size, size]``."""
    pad = (size - kernel.shape[-1]) // 2
    return torch.nn.functional.pad(kernel, (pad, pad, pad, pad))


def pulse_kernel(size: int = MAX_KERNEL_SIZE) -> Tensor:
    """``[size, size]`` identity kernel (no filtering)."""
    kernel = torch.zeros(size, size, dtype=torch.float64)
    kernel[size // 2, size // 2] = 1.0
    return kernel


# --- random kernels ----------------------------------------------------------------------------


def random_mixed_kernel(
    generator: torch.Generator,
    size: int,
    *,
    kinds: Sequence[str],
    probs: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
) -> Tensor:
    """``[k, k]`` kernel of a kind drawn from ``kinds`` with ``probs``; iso kinds have one sigma, no rotation."""
    kind = kinds[choice(generator, len(kinds), probs)]
    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; known: {KERNEL_KINDS}")
    sigma_x = uniform(generator, *sigma_range)
    if kind.endswith("aniso"):
        sigma_y = uniform(generator, *sigma_range)
        theta = uniform(generator, -math.pi, math.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kind.startswith("generalized"):
        return bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, sample_beta(generator, betag_range))
    if kind.startswith("plateau"):
        return bivariate_plateau(size, sigma_x, sigma_y, theta, sample_beta(generator, betap_range))
    return bivariate_gaussian(size, sigma_x, sigma_y, theta)


def random_blur_kernel(
    generator: torch.Generator,
    *,
    sizes: Sequence[int],
    sinc_prob: float,
    kinds: Sequence[str],
    probs: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    pad_to: int = MAX_KERNEL_SIZE,
) -> Tensor:
    """``[pad_to, pad_to]`` first/second-stage blur: a sinc with ``sinc_prob``, else a mixed Gaussian."""
    size = sizes[choice(generator, len(sizes))]
    if uniform(generator, 0.0, 1.0) < sinc_prob:
        # Real-ESRGAN: small kernels cannot carry very low cut-offs without heavy ringing
        low = math.pi / 3 if size < 13 else math.pi / 5
        kernel = circular_lowpass_kernel(uniform(generator, low, math.pi), size)
    else:
        kernel = random_mixed_kernel(
            generator,
            size,
            kinds=kinds,
            probs=probs,
            sigma_range=sigma_range,
            betag_range=betag_range,
            betap_range=betap_range,
        )
    return pad_kernel(kernel, pad_to)


def random_final_sinc_kernel(
    generator: torch.Generator, *, sizes: Sequence[int], prob: float, pad_to: int = MAX_KERNEL_SIZE
) -> Tensor:
    """``[pad_to, pad_to]`` final sinc (ringing/overshoot artefacts) with ``prob``, else the identity."""
    if uniform(generator, 0.0, 1.0) < prob:
        size = sizes[choice(generator, len(sizes))]
        return circular_lowpass_kernel(uniform(generator, math.pi / 3, math.pi), size, pad_to=pad_to)
    return pulse_kernel(pad_to)

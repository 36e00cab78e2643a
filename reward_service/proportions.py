"""Smooth/detail proportions of an HR image (SPEC section 4), vectorised over patches and images.

Per patch the reference does: bilinear resize to ``resize x resize`` (cv2 INTER_LINEAR, half-pixel
centres), Sobel 3x3 in x and y with replicated borders, magnitude, a 512-bin histogram over
(-5.5, 5.5), entropy in bits, complexity = entropy * patch pixels.  Resize and Sobel are both
linear and separable, so for a patch ``P`` (ph x pw) the two gradients are

    gx = (S Rh) P (D Rw)^T        gy = (D Rh) P (S Rw)^T

with ``Rh``/``Rw`` the interpolation matrices and ``S`` = [1, 2, 1], ``D`` = [-1, 0, 1] as
replicate-border convolution matrices.  All patches of one size class (full, right remainder,
bottom remainder, corner: at most 4) then go through two matrix products, and the histogram is a
``scatter_add`` of bin indices per patch: no Python loop over patches.  On CPU the same algebra
runs fused per patch in ``patch_entropy_cpu`` (``backend="fused"``, the CPU default), which keeps
the 4096 magnitudes of a patch in L1 instead of streaming them through memory five times.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from reward_service import patch_entropy_cpu

HIST_BINS = 512
HIST_RANGE = 5.5  # the histogram covers (-HIST_RANGE, HIST_RANGE); magnitudes >= 0 use the upper half
BIN_WIDTH = 2 * HIST_RANGE / HIST_BINS  # 11/512, exact in binary
# cv2 8-bit RGB->gray is fixed point with 15 fractional bits (R, G, B weights 0.299, 0.587, 0.114).
_GRAY_Q15 = {"luma": (9798, 19235, 3735), "opencv_bgr": (3735, 19235, 9798)}  # weights for channels 0, 1, 2
_RECHECK_MARGIN = 0.5  # float32 complexities this close to the threshold are recomputed in float64

Gray = Literal["opencv_bgr", "luma"]
Backend = Literal["auto", "fused", "torch"]  # auto: the fused kernel for CPU images, torch otherwise


def to_gray8(images: torch.Tensor, gray: Gray = "opencv_bgr") -> torch.Tensor:
    """RGB [B, 3, H, W] (uint8, or float in [0, 1]) -> 8-bit gray [B, H, W] int32, as cv2.cvtColor.

    ``opencv_bgr`` applies cv2's BGR2GRAY weights to RGB data (the reference quirk: 0.114 R +
    0.587 G + 0.299 B); ``luma`` is the true BT.601 luma.  Floats are first quantised with
    round(x * 255), since the reference works on 8-bit images.
    """
    check_rgb(images, "HR image")
    x = images if images.dtype == torch.uint8 else (images.float() * 255).round()
    w0, w1, w2 = _GRAY_Q15[gray]
    g = x[:, 0].to(torch.int32).mul_(w0)  # in place: one [B, H, W] int32 buffer, no temporaries
    g.add_(x[:, 1].to(torch.int32), alpha=w1).add_(x[:, 2].to(torch.int32), alpha=w2)
    return g.add_(1 << 14).bitwise_right_shift_(15)


def check_rgb(images: torch.Tensor, what: str) -> None:
    """ValueError unless ``images`` is [B, 3, H, W] uint8, or floating point with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{what}: expected shape [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[1] != 3:
        kind = {1: "grayscale", 4: "RGBA"}.get(images.shape[1], f"{images.shape[1]}-channel")
        raise ValueError(f"{what}: expected RGB with 3 channels, got a {kind} image of shape {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1 or images.shape[0] < 1:
        raise ValueError(f"{what}: empty image batch {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected uint8 or floating point, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what}: contains NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what}: values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")


def patch_complexity(
    images: torch.Tensor,
    *,
    gray: Gray = "opencv_bgr",
    patch_size: int = 10,
    resize: int = 64,
    threshold: float = 50.0,
    dtype: torch.dtype = torch.float32,
    chunk: int = 64,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Complexity of every patch: [B, ceil(H/ps), ceil(W/ps)] float64 (entropy bits * patch pixels).

    ``images`` is RGB [B, 3, H, W] (uint8 or float in [0, 1]).  With ``dtype=float32`` the patches
    whose complexity lands within 0.5 of ``threshold`` are recomputed in float64 with np.histogram's
    rules, so float32 rounding cannot flip a detailed/smooth decision: one of 4096 values crossing
    a bin edge moves a 10x10 complexity by 0.33 at most, and over 40k patches of the scikit-image
    photos 0.1% of patches moved at all, by 0.1 at most (either backend).

    ``backend="fused"`` (CPU images only) runs the size classes whose magnitudes stay inside the
    histogram range through the fused CPU kernel, the float64 re-check included; the others take
    the exact torch path.
    """
    fused = _use_fused(backend, images, dtype)
    g8 = to_gray8(images, gray)
    b, h, w = g8.shape
    out = torch.empty(b, -(-h // patch_size), -(-w // patch_size), dtype=torch.float64, device=g8.device)
    for rows, cols, patches8 in _size_classes(g8, patch_size):
        c = _class_complexity(patches8, resize, chunk, dtype, fused=fused)
        if dtype != torch.float64:  # float32 noise must not flip a decision: redo the close calls in float64
            near = (c - threshold).abs() <= _RECHECK_MARGIN
            if bool(near.any()):
                c[near] = _class_complexity(patches8[near], resize, chunk, torch.float64, exact=True, fused=fused)
        out[:, rows, cols] = c.view(b, rows.stop - rows.start, cols.stop - cols.start)
    return out


def detail_proportions(
    images: torch.Tensor,
    *,
    gray: Gray = "opencv_bgr",
    patch_size: int = 10,
    resize: int = 64,
    threshold: float = 50.0,
    round_to: int | None = 2,
    dtype: torch.dtype = torch.float32,
    chunk: int = 64,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho_s, rho_d), each [B] float64: the pixel fraction in non-detailed / detailed patches.

    ``round_to=2`` is the reference behaviour (both rounded to 2 decimals, half to even);
    ``None`` keeps the exact fractions.
    """
    c = patch_complexity(
        images,
        gray=gray,
        patch_size=patch_size,
        resize=resize,
        threshold=threshold,
        dtype=dtype,
        chunk=chunk,
        backend=backend,
    )
    h, w = images.shape[2], images.shape[3]
    area = _patch_areas(h, w, patch_size).to(c.device)  # [nh, nw] pixels per patch
    smooth = ((c <= threshold) * area).sum(dim=(1, 2)) / float(h * w)
    detail = 1.0 - smooth
    if round_to is not None:
        scale = 10.0**round_to
        smooth, detail = torch.round(smooth * scale) / scale, torch.round(detail * scale) / scale
    return smooth, detail


def _use_fused(backend: Backend, images: torch.Tensor, dtype: torch.dtype) -> bool:
    if backend not in ("auto", "fused", "torch"):
        raise ValueError(f"backend must be 'auto', 'fused' or 'torch', got {backend!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    on_cpu = images.device.type == "cpu"
    if backend == "fused" and not on_cpu:
        raise ValueError(f"backend='fused' is the CPU kernel; images are on {images.device}")
    return backend == "fused" or (backend == "auto" and on_cpu)


def _patch_areas(h: int, w: int, ps: int) -> torch.Tensor:
    rows = torch.tensor([min(ps, h - i) for i in range(0, h, ps)], dtype=torch.float64)
    cols = torch.tensor([min(ps, w - j) for j in range(0, w, ps)], dtype=torch.float64)
    return rows[:, None] * cols[None, :]


def _size_classes(g: torch.Tensor, ps: int) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield (row slice, col slice, patches [n, ph, pw]) for the (up to 4) patch sizes of [B, H, W].

    Patches are ordered image-major, then row-major over the patch grid, so ``view(B, rows, cols)``
    puts each complexity back at its grid position.
    """
    b, h, w = g.shape
    fh, fw = h // ps, w // ps  # full patches per column / row
    rh, rw = h - fh * ps, w - fw * ps  # remainder sizes (0 = none)
    top, left = g[:, : fh * ps], g[:, :, : fw * ps]
    if fh and fw:
        full = top[:, :, : fw * ps].reshape(b, fh, ps, fw, ps).permute(0, 1, 3, 2, 4)
        yield slice(0, fh), slice(0, fw), full.reshape(-1, ps, ps)
    if fh and rw:
        right = top[:, :, fw * ps :].reshape(b, fh, ps, rw)
        yield slice(0, fh), slice(fw, fw + 1), right.reshape(-1, ps, rw)
    if rh and fw:
        bottom = left[:, fh * ps :].reshape(b, rh, fw, ps).permute(0, 2, 1, 3)
        yield slice(fh, fh + 1), slice(0, fw), bottom.reshape(-1, rh, ps)
    if rh and rw:
        yield slice(fh, fh + 1), slice(fw, fw + 1), g[:, fh * ps :, fw * ps :].reshape(-1, rh, rw)


def _class_complexity(
    patches8: torch.Tensor, resize: int, chunk: int, dtype: torch.dtype, *, exact: bool = False, fused: bool = False
) -> torch.Tensor:
    """Complexities [n] float64 of same-size 8-bit gray patches [n, ph, pw], ``chunk`` at a time.

    The fast path is valid when no magnitude can reach the histogram's upper end, which holds
    whenever a patch is upsampled by more than ~2x (|Sobel| <= 8 * sqrt(2) * ph / resize): then every
    patch has exactly resize^2 values in range, bins are truncated magnitudes and the entropy is a
    table lookup per bin count.  Otherwise, and for ``exact``, np.histogram's rules are followed in
    float64: edges compared as np.histogram does, not magnitudes truncated in bin widths (a value
    on an edge may differ).  ``fused`` runs the in-range classes, exact or not, in the CPU kernel.
    """
    n, ph, pw = patches8.shape
    bound = 8 * math.sqrt(2) * min(1.0, max(ph, pw) / resize)  # largest possible Sobel magnitude
    in_range = bound < HIST_RANGE
    if fused and in_range:
        kernel = _fused_operators(ph, pw, resize, torch.float64 if exact else dtype, exact=exact)
        assert kernel is not None, (ph, pw, resize)  # upsampled > 2x: at most three taps per row
        return patch_entropy_cpu.class_complexity(patches8, kernel)
    exact = exact or not in_range
    patches = patches8.to(torch.float64 if exact else dtype) / 255.0
    ops = _operators(ph, pw, resize, dtype=patches.dtype, device=str(patches.device), exact=exact)
    if exact:
        counts = torch.cat([_exact_counts(patches[i : i + chunk], ops, resize) for i in range(0, n, chunk)])
        counts = counts.to(torch.float64)
        p = counts / (counts.sum(dim=1, keepdim=True) + 1e-5)
        entropy = -(p * torch.log2(p + 1e-10)).sum(dim=1)
    else:
        counts = torch.cat([_fast_counts(patches[i : i + chunk], ops, resize) for i in range(0, n, chunk)])
        terms = _entropy_terms(resize, str(patches.device))
        entropy = terms.index_select(0, counts.view(-1)).view(counts.shape).sum(dim=1)
    return entropy * (ph * pw)


def _gradients(patches: torch.Tensor, ops: tuple[torch.Tensor, ...], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel x/y of the resized patches: two [n*r, r] tensors (row n*r + i, column j)."""
    a, bx, by = ops
    n, ph, pw = patches.shape
    # One product for both row operators: [2r, ph] @ [ph, n*pw] -> [2, n, r, pw] (gx rows, gy rows).
    q = (a @ patches.permute(1, 0, 2).reshape(ph, n * pw)).view(2, r, n, pw).permute(0, 2, 1, 3)
    return q[0].reshape(n * r, pw) @ bx, q[1].reshape(n * r, pw) @ by


def _fast_counts(patches: torch.Tensor, ops: tuple[torch.Tensor, ...], r: int) -> torch.Tensor:
    """Counts [n, 256] int32 over the upper half of the histogram: bin k = floor(magnitude / BIN_WIDTH).

    The gradients are already in bin widths, so truncating the magnitude gives the bin directly.
    """
    gx, gy = _gradients(patches, ops, r)
    n = patches.shape[0]
    idx = gx.mul_(gx).addcmul_(gy, gy).sqrt_().to(torch.int64).view(n, r * r)
    ones = torch.ones(1, dtype=torch.int32, device=idx.device).expand(n, r * r)
    return torch.zeros(n, HIST_BINS // 2, dtype=torch.int32, device=idx.device).scatter_add_(1, idx, ones)


def _exact_counts(patches: torch.Tensor, ops: tuple[torch.Tensor, ...], r: int) -> torch.Tensor:
    """Counts [n, 512] int32 with np.histogram's rules: [e_i, e_i+1) bins, last bin closed, outliers dropped."""
    gx, gy = _gradients(patches, ops, r)
    n = patches.shape[0]
    mag = gx.mul_(gx).addcmul_(gy, gy).sqrt_().view(n, r * r)
    edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1, dtype=mag.dtype, device=mag.device)
    idx = torch.bucketize(mag, edges, right=True) - 1  # magnitudes are >= 0, so idx >= HIST_BINS // 2
    idx = torch.where(mag == HIST_RANGE, HIST_BINS - 1, idx)  # slot HIST_BINS: beyond the range, dropped
    ones = torch.ones(1, dtype=torch.int32, device=mag.device).expand(n, r * r)
    counts = torch.zeros(n, HIST_BINS + 1, dtype=torch.int32, device=mag.device).scatter_add_(1, idx, ones)
    return counts[:, :HIST_BINS]


@functools.lru_cache(maxsize=16)
def _entropy_terms(r: int, device: str) -> torch.Tensor:
    """[r*r + 1] float64: the reference's ``-p * log2(p + 1e-10)`` with ``p = c / (r*r + 1e-5)`` per count c.

    On the fast path every patch has exactly r*r values in range, so each bin's term depends only
    on its count: a lookup replaces five passes over [n, 256] floats.
    """
    p = torch.arange(r * r + 1, dtype=torch.float64) / (r * r + 1e-5)
    return (-(p * torch.log2(p + 1e-10))).to(device)


@functools.lru_cache(maxsize=16)
def _fused_operators(
    ph: int, pw: int, r: int, dtype: torch.dtype, *, exact: bool
) -> patch_entropy_cpu.FusedOperators | None:
    """The fused kernel's operands for one patch size, or None where it does not apply (downsampling)."""
    a, bx, by = (t.numpy() for t in _operators(ph, pw, r, dtype=torch.float64, device="cpu", exact=exact))
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1) if exact else None  # np.histogram's own edges
    terms = _entropy_terms(r, "cpu").numpy()
    return patch_entropy_cpu.FusedOperators.build(a, bx, by, terms, dtype=np_dtype, edges=edges)


@functools.lru_cache(maxsize=64)
def _operators(ph: int, pw: int, r: int, *, dtype: torch.dtype, device: str, exact: bool) -> tuple[torch.Tensor, ...]:
    """(A [2r, ph], Bx [pw, r], By [pw, r]) with gx = A[:r] P Bx, gy = A[r:] P By (fast path: in bin widths)."""
    rh, rw = _bilinear_matrix(ph, r), _bilinear_matrix(pw, r)
    smooth, deriv = _replicate_conv_matrix(r, (1.0, 2.0, 1.0)), _replicate_conv_matrix(r, (-1.0, 0.0, 1.0))
    scale = 1.0 if exact else 1.0 / BIN_WIDTH  # fold the bin width into the column operator
    a = torch.cat([smooth @ rh, deriv @ rh])
    bx, by = (deriv @ rw).T * scale, (smooth @ rw).T * scale
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (a, bx, by))


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 matrix of cv2.resize INTER_LINEAR (half-pixel centres, edge clamp).

    Same as F.interpolate(mode="bilinear", align_corners=False) without antialiasing.
    """
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return torch.from_numpy(m)


def _replicate_conv_matrix(n: int, kernel: tuple[float, float, float]) -> torch.Tensor:
    """[n, n] float64 matrix of a 3-tap correlation with replicated borders (cv2 BORDER_REPLICATE)."""
    m = np.zeros((n, n))
    rows = np.arange(n)
    for offset, weight in zip((-1, 0, 1), kernel, strict=True):
        np.add.at(m, (rows, np.clip(rows + offset, 0, n - 1)), weight)
    return torch.from_numpy(m)

"""Fused CPU kernel for the patch entropies of SPEC section 4 (numba; torch path in ``proportions``).

The torch path materialises every Sobel magnitude (4096 per 10x10 patch, about 11M per 512x512
image) and runs five separate kernels over them (two products, magnitude, bin index, scatter);
on a CPU those passes, not the arithmetic, set the time.  This kernel does the same linear
algebra per patch with every intermediate in L1: the column operators as a dense
[ph, pw] x [pw, r] product, the row operators as three taps per output row (a smoothed bilinear
row has at most three non-zeros when the patch is upsampled 2x or more), then magnitude, bin and
count in one pass over each output row, and the entropy from the counts.  Eight interleaved
sub-histograms break the store-to-load chain on the bins most values share (bin 0 when smooth).

Only size classes whose magnitudes stay inside the histogram range are fused, so every patch has
exactly r*r counts.  The fast path (float32) bins by truncating magnitudes in bin widths; the
borderline re-check runs the same kernel in float64 with np.histogram's edge rules (``edges``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

TAPS = 3  # non-zeros per row of (smooth or derivative) x bilinear when upsampling
_SUB_HISTOGRAMS = 8
MAX_BINS = 256  # bins are stored as uint8


@dataclass(frozen=True, eq=False)
class FusedOperators:
    """The kernel's operands for one patch size and float dtype (columns in bin widths unless ``edges``)."""

    patch_shape: tuple[int, int]  # (ph, pw): the kernel indexes unchecked, so patches must match
    col_x: np.ndarray  # [pw, r] column operator of gx (derivative x bilinear, transposed)
    col_y: np.ndarray  # [pw, r] column operator of gy (smooth x bilinear, transposed)
    row_start: np.ndarray  # [2r] int64: first source row of each output row (gx rows, then gy rows)
    row_weights: np.ndarray  # [2r, TAPS] weights of those source rows
    n_bins: int  # histogram slots that can be hit (see bins_needed)
    entropy_terms: np.ndarray  # [r*r + 1] float64: the entropy term of each possible bin count
    edges: np.ndarray | None  # None: operators in bin widths, bins truncated; [513]: np.histogram's edges

    @classmethod
    def build(
        cls,
        row_op: np.ndarray,
        col_x: np.ndarray,
        col_y: np.ndarray,
        entropy_terms: np.ndarray,
        *,
        dtype: np.dtype,
        edges: np.ndarray | None = None,
    ) -> FusedOperators | None:
        """From float64 operators (row [2r, ph], columns [pw, r]); None where the kernel does not apply.

        Without ``edges`` the column operators are in bin widths (the fast path); with np.histogram's
        ``edges`` they are in pixel units and the kernel bins by np.histogram's rules (float64 only).
        """
        taps = row_taps(row_op)
        if taps is None:
            return None
        width = 1.0 if edges is None else float(edges[1] - edges[0])
        # Callers fuse only classes whose magnitudes stay below the histogram's end (bin 255 at most),
        # so capping the float-rounding slot at MAX_BINS clamps exactly like np.histogram's closed last bin.
        n_bins = min(bins_needed(row_op, col_x / width, col_y / width), MAX_BINS)
        patch_shape = (row_op.shape[1], col_x.shape[0])
        col_x, col_y = (np.ascontiguousarray(m, dtype=dtype) for m in (col_x, col_y))
        terms = np.ascontiguousarray(entropy_terms)
        assert edges is None or dtype == np.float64, dtype
        return cls(patch_shape, col_x, col_y, taps[0], taps[1].astype(dtype), n_bins, terms, edges)


def row_taps(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """[rows, cols] operator -> (first column [rows] int64, weights [rows, TAPS]), or None.

    None when some row spans more than TAPS columns (downsampling), which this kernel does not fuse.
    """
    start = np.zeros(matrix.shape[0], dtype=np.int64)
    weights = np.zeros((matrix.shape[0], TAPS), dtype=matrix.dtype)
    for i, row in enumerate(matrix):
        nonzero = np.flatnonzero(row)
        if nonzero.size == 0:
            continue
        first, last = int(nonzero[0]), int(nonzero[-1])
        if last - first >= TAPS:
            return None
        start[i] = first
        weights[i, : last - first + 1] = row[first : last + 1]
    return start, weights


def bins_needed(row_op: np.ndarray, col_x: np.ndarray, col_y: np.ndarray) -> int:
    """Histogram slots that can be hit, from the operators (in bin widths) and pixels in [0, 1].

    At output pixel (i, j), gx = sum_ab A[i, a] B[b, j] P[a, b] is largest when P is 1 exactly where
    the product is positive (or negative), so with the positive/negative row and column sums
    |gx| <= max(pos_i pos_j + neg_i neg_j, pos_i neg_j + neg_i pos_j), and the same for gy.
    """
    r = col_x.shape[1]

    def bound(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # [r, r]
        pos_i, neg_i = np.clip(rows, 0, None).sum(1), np.clip(-rows, 0, None).sum(1)
        pos_j, neg_j = np.clip(cols, 0, None).sum(0), np.clip(-cols, 0, None).sum(0)
        same = np.outer(pos_i, pos_j) + np.outer(neg_i, neg_j)
        return np.maximum(same, np.outer(pos_i, neg_j) + np.outer(neg_i, pos_j))

    top = np.hypot(bound(row_op[:r], col_x), bound(row_op[r:], col_y)).max()
    return math.floor(top) + 2  # +1 for bin 0, +1 for float rounding


@numba.njit(cache=True, inline="always")
def _histogram_bin(m, edges, norm, top):  # pragma: no cover
    """np.histogram's bin of a magnitude m in [0, edges[-1]], counted from the middle edge (0.0).

    ``norm`` is np.histogram's ``n_bins / (last_edge - first_edge)``; the estimate from it is then
    corrected against the edges, as np.histogram does.
    """
    n = edges.shape[0] - 1
    i = min(int((m - edges[0]) * norm), n - 1)
    if m < edges[i]:
        i -= 1
    elif i != n - 1 and m >= edges[i + 1]:
        i += 1
    return np.uint8(min(i - n // 2, top))


@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _complexities(  # noqa: PLR0917 (a numba kernel takes its arrays positionally)
    patches, col_x, col_y, row_start, row_weights, n_bins, entropy_terms, edges, out
):  # pragma: no cover
    """patches [n, ph, pw] 8-bit gray (any int); col_* [pw, r]; row_* [2r] / [2r, 3]; out [n] f64.

    numba compiles one version per argument types: float32 without edges (the fast path, the
    ``edges is not None`` branch pruned) and float64 with edges (the re-check).
    """
    n, ph, pw = patches.shape
    r = col_x.shape[1]
    top_bin = col_x.dtype.type(n_bins - 1)
    tx = np.zeros((ph + TAPS - 1, r), col_x.dtype)  # rows past ph stay 0: taps may reach them
    ty = np.zeros((ph + TAPS - 1, r), col_x.dtype)
    bins = np.zeros(r, np.uint8)
    mags = np.zeros(r, col_x.dtype)
    hist = np.zeros((_SUB_HISTOGRAMS, n_bins), np.int32)
    for p in range(n):
        for u in range(ph):  # column operators: tx = P @ col_x, ty = P @ col_y
            txu = tx[u]
            tyu = ty[u]
            txu[:] = 0.0
            tyu[:] = 0.0
            for v in range(pw):
                value = col_x.dtype.type(patches[p, u, v]) / col_x.dtype.type(255.0)
                cx = col_x[v]
                cy = col_y[v]
                for j in range(r):
                    txu[j] += value * cx[j]
                    tyu[j] += value * cy[j]
        hist[:] = 0
        for i in range(r):  # row operators, magnitude, bin, count: one output row at a time
            ux, uy = row_start[i], row_start[r + i]
            a0, a1, a2 = row_weights[i, 0], row_weights[i, 1], row_weights[i, 2]
            b0, b1, b2 = row_weights[r + i, 0], row_weights[r + i, 1], row_weights[r + i, 2]
            x0, x1, x2 = tx[ux], tx[ux + 1], tx[ux + 2]
            y0, y1, y2 = ty[uy], ty[uy + 1], ty[uy + 2]
            if edges is not None:  # the float64 re-check (numba prunes this branch when edges is None)
                norm = (edges.shape[0] - 1) / (edges[-1] - edges[0])
                for j in range(r):
                    gx = a0 * x0[j] + a1 * x1[j] + a2 * x2[j]
                    gy = b0 * y0[j] + b1 * y1[j] + b2 * y2[j]
                    mags[j] = np.sqrt(gx * gx + gy * gy)
                for j in range(r):
                    bins[j] = _histogram_bin(mags[j], edges, norm, n_bins - 1)
            else:  # the fast path: magnitudes in bin widths, truncated
                for j in range(r):
                    gx = a0 * x0[j] + a1 * x1[j] + a2 * x2[j]
                    gy = b0 * y0[j] + b1 * y1[j] + b2 * y2[j]
                    bins[j] = np.uint8(min(np.sqrt(gx * gx + gy * gy), top_bin))
            for j in range(0, r - _SUB_HISTOGRAMS + 1, _SUB_HISTOGRAMS):
                for k in range(_SUB_HISTOGRAMS):
                    hist[k, bins[j + k]] += 1
            for j in range(r - r % _SUB_HISTOGRAMS, r):
                hist[0, bins[j]] += 1
        entropy = 0.0
        for b in range(n_bins):
            count = 0
            for k in range(_SUB_HISTOGRAMS):
                count += hist[k, b]
            entropy += entropy_terms[count]
        out[p] = entropy * (ph * pw)


def class_complexity(patches8: torch.Tensor, ops: FusedOperators) -> torch.Tensor:
    """Complexities [n] float64 of same-size 8-bit gray patches [n, ph, pw] (CPU), in ``ops``' dtype.

    One thread: a reward actor scales by actors, and a numba thread pool would share (and reset)
    torch's OpenMP thread count.
    """
    assert patches8.device.type == "cpu" and not patches8.is_floating_point(), (patches8.device, patches8.dtype)
    array = np.ascontiguousarray(patches8.numpy())
    assert array.shape[1:] == ops.patch_shape, (array.shape, ops.patch_shape)
    assert ops.col_y.dtype == ops.row_weights.dtype == ops.col_x.dtype, (ops.col_y.dtype, ops.row_weights.dtype)
    out = np.empty(array.shape[0], dtype=np.float64)
    _complexities(
        array, ops.col_x, ops.col_y, ops.row_start, ops.row_weights, ops.n_bins, ops.entropy_terms, ops.edges, out
    )
    return torch.from_numpy(out)

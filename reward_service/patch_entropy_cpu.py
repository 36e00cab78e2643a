"""Fused CPU kernel for the patch entropies of SPEC section 4 (numba; torch path in ``proportions``).

The torch path materialises every Sobel magnitude (4096 per 10x10 patch, about 11M per 512x512
image) and runs five separate kernels over them (two products, magnitude, bin index, scatter);
on a CPU those passes, not the arithmetic, set the time.  This kernel does the same linear
algebra per patch with every intermediate in L1: the column operators as a dense
[ph, pw] x [pw, r] product, the row operators as three taps per output row (a smoothed bilinear
row has at most three non-zeros when the patch is upsampled 2x or more), then magnitude, bin and
count in one pass over each output row, and the entropy from the counts.  Eight interleaved sub-histograms break the
store-to-load chain on the bins that most values share (bin 0 in smooth regions).

Only the fast path of ``proportions`` is fused: every magnitude inside the histogram range, so
the bin is the truncated magnitude in bin widths and every patch has exactly r*r counts.  The
caller re-checks borderline patches in float64, exactly as it does for the torch float32 path.
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
    """The kernel's operands for one patch size and float dtype (all in bin widths, like the torch path)."""

    col_x: np.ndarray  # [pw, r] column operator of gx (derivative x bilinear, transposed)
    col_y: np.ndarray  # [pw, r] column operator of gy (smooth x bilinear, transposed)
    row_start: np.ndarray  # [2r] int64: first source row of each output row (gx rows, then gy rows)
    row_weights: np.ndarray  # [2r, TAPS] weights of those source rows
    n_bins: int  # histogram slots that can be hit (see bins_needed)
    entropy_terms: np.ndarray  # [r*r + 1] float64: the entropy term of each possible bin count

    @classmethod
    def build(
        cls, row_op: np.ndarray, col_x: np.ndarray, col_y: np.ndarray, entropy_terms: np.ndarray, dtype: np.dtype
    ) -> FusedOperators | None:
        """From float64 operators (row [2r, ph], columns [pw, r]); None where the kernel does not apply."""
        taps = row_taps(row_op)
        n_bins = bins_needed(row_op, col_x, col_y)
        if taps is None or n_bins > MAX_BINS:
            return None
        col_x, col_y = (np.ascontiguousarray(m, dtype=dtype) for m in (col_x, col_y))
        return cls(col_x, col_y, taps[0], taps[1].astype(dtype), n_bins, np.ascontiguousarray(entropy_terms))


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


@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _complexities(  # noqa: PLR0917 (a numba kernel takes its arrays positionally)
    patches, col_x, col_y, row_start, row_weights, n_bins, entropy_terms, out
):  # pragma: no cover
    """patches [n, ph, pw] 8-bit gray (any int); col_* [pw, r]; row_* [2r] / [2r, 3]; out [n] f64.

    Compiled once per float dtype (float32 for speed, float64 for the borderline re-check).
    """
    n, ph, pw = patches.shape
    r = col_x.shape[1]
    top_bin = col_x.dtype.type(n_bins - 1)
    tx = np.zeros((ph + TAPS - 1, r), col_x.dtype)  # rows past ph stay 0: taps may reach them
    ty = np.zeros((ph + TAPS - 1, r), col_x.dtype)
    bins = np.zeros(r, np.uint8)
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
    assert array.shape[2] == ops.col_x.shape[0], (array.shape, ops.col_x.shape)
    out = np.empty(array.shape[0], dtype=np.float64)
    _complexities(array, ops.col_x, ops.col_y, ops.row_start, ops.row_weights, ops.n_bins, ops.entropy_terms, out)
    return torch.from_numpy(out)

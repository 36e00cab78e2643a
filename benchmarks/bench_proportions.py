"""Smooth/detail proportions vs the reference's own per-patch loop (cv2 + np.histogram), 512x512.

    python benchmarks/bench_proportions.py [--threads 1] [--repeats 7] [--image astronaut]

The baseline is SPEC section 4 transcribed as the reference implementation computes it: the image
to float64 gray once (cv2.cvtColor, BGR weights on RGB data, / 255), then per 10x10 patch
cv2.resize (INTER_LINEAR) to 64x64, cv2.Sobel x and y (CV_64F, 3x3, replicated borders), the
magnitude, np.histogram (512 bins over (-5.5, 5.5)) and the entropy in bits.  It and both
backends of ``reward_service.proportions`` (the fused CPU kernel, the default on CPU, and the
torch path used on GPU) run interleaved in one process, cv2 and torch on ``--threads`` threads.
The table reports the best and the median of the repeats (the best is the least disturbed by
other load on a shared machine).  Every backend must give the baseline's detailed/smooth decision
for every patch and its rho_s exactly; the script exits with status 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reward_service.proportions import detail_proportions, patch_complexity

PATCH, RESIZE, BINS, RANGE, THRESHOLD = 10, 64, 512, (-5.5, 5.5), 50.0


def reference_patch_entropy(patch: np.ndarray) -> float:
    """Entropy (bits) of one float64 gray patch's Sobel magnitudes, as the reference computes it."""
    resized = cv2.resize(patch, (RESIZE, RESIZE), interpolation=cv2.INTER_LINEAR)
    gx = cv2.Sobel(resized, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(resized, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = np.sqrt(gx**2 + gy**2)
    hist, _ = np.histogram(magnitude, bins=BINS, range=RANGE)
    p = hist / (hist.sum() + 1e-5)
    return float(-np.sum(p * np.log2(p + 1e-10)))


def reference_complexity(rgb: np.ndarray) -> np.ndarray:
    """Complexity (entropy x patch pixels) per patch, [ceil(H/10), ceil(W/10)]; rgb is [H, W, 3] uint8."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY) / 255.0  # the reference quirk: BGR weights on RGB data
    h, w = gray.shape
    out = np.empty((-(-h // PATCH), -(-w // PATCH)))
    for a, top in enumerate(range(0, h, PATCH)):
        for b, left in enumerate(range(0, w, PATCH)):
            patch = gray[top : top + PATCH, left : left + PATCH]  # right/bottom remainders are smaller
            out[a, b] = reference_patch_entropy(patch) * patch.shape[0] * patch.shape[1]
    return out


def reference_rho_s(complexity: np.ndarray, h: int, w: int) -> float:
    """Fraction of the pixels in non-detailed patches (complexity <= 50)."""
    rows = np.array([min(PATCH, h - i) for i in range(0, h, PATCH)])
    cols = np.array([min(PATCH, w - j) for j in range(0, w, PATCH)])
    return int(np.outer(rows, cols)[complexity <= THRESHOLD].sum()) / (h * w)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and cv2 threads (the fused kernel uses one)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image", default="astronaut", help="a skimage.data image of at least 512x512")
    parser.add_argument("--chunk", type=int, default=64, help="patches per step of the torch backend")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rgb = np.ascontiguousarray(getattr(data, args.image)()[:512, :512, :3])
    hr = torch.from_numpy(rgb).permute(2, 0, 1)[None]

    backends = ("fused", "torch")
    times: dict[str, list[float]] = {"reference": [], **{b: [] for b in backends}}
    results = {b: patch_complexity(hr, chunk=args.chunk, backend=b)[0].numpy() for b in backends}  # warm-up, JIT
    ref = reference_complexity(rgb)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = reference_complexity(rgb)
        times["reference"].append(time.perf_counter() - t0)
        for b in backends:
            t0 = time.perf_counter()
            results[b] = patch_complexity(hr, chunk=args.chunk, backend=b)[0].numpy()
            times[b].append(time.perf_counter() - t0)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    rho_ref = reference_rho_s(ref, *rgb.shape[:2])
    print(f"image {args.image} 512x512, {ref.size} patches, threads {args.threads}, {args.repeats} repeats")
    labels = (("reference", "reference per-patch loop"), ("torch", "torch backend"), ("fused", "fused CPU kernel"))
    for name, label in labels:
        line = f"{label:24}: best {best[name] * 1e3:8.1f} ms   median {med[name] * 1e3:8.1f} ms"
        if name != "reference":
            line += f"   speed-up best/best {best['reference'] / best[name]:5.1f}x  median/median "
            line += f"{med['reference'] / med[name]:5.1f}x"
        print(line)
    agree = True
    for b in backends:
        vec = results[b]
        rho_s = float(detail_proportions(hr, round_to=None, chunk=args.chunk, backend=b)[0][0])
        rounded = float(detail_proportions(hr, chunk=args.chunk, backend=b)[0][0])
        flips = int(((vec > THRESHOLD) != (ref > THRESHOLD)).sum())
        same = flips == 0 and rho_s == rho_ref and rounded == round(rho_ref, 2)
        agree &= same
        print(
            f"{b:5}: max |complexity diff| {np.abs(vec - ref).max():.3g}, detailed-patch disagreements {flips}, "
            f"rho_s {rho_s:.6f} vs reference {rho_ref:.6f} (rounded {rounded:.2f}): {'same' if same else 'DIFFERENT'}"
        )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

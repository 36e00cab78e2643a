"""Vectorised smooth/detail proportions vs a naive per-patch loop (cv2 + np.histogram), 512x512.

    python benchmarks/bench_proportions.py [--threads 1] [--repeats 7] [--image astronaut]

Both run interleaved in one process; the table reports the best and the median of the repeats (the
best is the least disturbed by other load on a shared machine) and checks the results agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch
from skimage import data

from reward_service.proportions import detail_proportions, patch_complexity


def naive_complexity(rgb: np.ndarray, ps: int = 10, r: int = 64) -> np.ndarray:
    """SPEC section 4 read literally: one Python iteration per patch."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY) / 255.0  # the reference's BGR weights on RGB data
    h, w = gray.shape
    out = np.zeros((-(-h // ps), -(-w // ps)))
    for a, i in enumerate(range(0, h, ps)):
        for b, j in enumerate(range(0, w, ps)):
            patch = gray[i : i + ps, j : j + ps]
            big = cv2.resize(patch, (r, r), interpolation=cv2.INTER_LINEAR)
            gx = cv2.Sobel(big, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
            gy = cv2.Sobel(big, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
            hist, _ = np.histogram(np.sqrt(gx**2 + gy**2), bins=512, range=(-5.5, 5.5))
            p = hist / (hist.sum() + 1e-5)
            out[a, b] = -np.sum(p * np.log2(p + 1e-10)) * patch.size
    return out


def naive_rho_s(rgb: np.ndarray, ps: int = 10) -> float:
    comp = naive_complexity(rgb, ps)
    h, w = rgb.shape[:2]
    areas = np.outer([min(ps, h - i) for i in range(0, h, ps)], [min(ps, w - j) for j in range(0, w, ps)])
    return float(areas[comp <= 50].sum() / (h * w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (cv2 is left as is)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image", default="astronaut", help="a skimage.data image of at least 512x512")
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rgb = np.ascontiguousarray(getattr(data, args.image)()[:512, :512, :3])
    hr = torch.from_numpy(rgb).permute(2, 0, 1)[None]

    naive_times, vec_times = [], []
    vec = patch_complexity(hr, chunk=args.chunk)[0].numpy()  # warm-up (operator tables are cached)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = naive_complexity(rgb)
        t1 = time.perf_counter()
        vec = patch_complexity(hr, chunk=args.chunk)[0].numpy()
        t2 = time.perf_counter()
        naive_times.append(t1 - t0)
        vec_times.append(t2 - t1)

    rho_vec = float(detail_proportions(hr, round_to=None, chunk=args.chunk)[0][0])
    rho_ref = naive_rho_s(rgb)
    best_n, best_v = min(naive_times), min(vec_times)
    med_n, med_v = statistics.median(naive_times), statistics.median(vec_times)
    print(f"image {args.image} 512x512, {vec.size} patches, torch threads {args.threads}, {args.repeats} repeats")
    print(f"naive per-patch loop : best {best_n * 1e3:8.1f} ms   median {med_n * 1e3:8.1f} ms")
    print(f"vectorised (torch)   : best {best_v * 1e3:8.1f} ms   median {med_v * 1e3:8.1f} ms")
    print(f"speed-up             : best/best {best_n / best_v:6.1f}x   median/median {med_n / med_v:6.1f}x")
    flips = int(((vec > 50) != (ref > 50)).sum())
    print(f"max |complexity diff| {np.abs(vec - ref).max():.3g}; detailed-patch disagreements {flips}")
    print(f"rho_s vectorised {rho_vec:.6f}  naive {rho_ref:.6f}  (rounded {round(rho_vec, 2)} / {round(rho_ref, 2)})")


if __name__ == "__main__":
    main()

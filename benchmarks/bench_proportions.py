"""Vectorised smooth/detail proportions vs a naive per-patch loop (cv2 + np.histogram), 512x512.

    python benchmarks/bench_proportions.py [--threads 1] [--repeats 7] [--image astronaut]

The naive loop and both backends of ``reward_service.proportions`` (the fused CPU kernel, the
default on CPU, and the torch path used on GPU) run interleaved in one process.  The table reports
the best and the median of the repeats (the best is the least disturbed by other load on a shared
machine) and checks that the results agree.
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
    parser.add_argument("--threads", type=int, default=1, help="torch (and fused-kernel) threads; cv2 is left as is")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image", default="astronaut", help="a skimage.data image of at least 512x512")
    parser.add_argument("--chunk", type=int, default=64, help="patches per step of the torch backend")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rgb = np.ascontiguousarray(getattr(data, args.image)()[:512, :512, :3])
    hr = torch.from_numpy(rgb).permute(2, 0, 1)[None]

    backends = ("fused", "torch")
    times: dict[str, list[float]] = {"naive": [], **{b: [] for b in backends}}
    results = {b: patch_complexity(hr, chunk=args.chunk, backend=b)[0].numpy() for b in backends}  # warm-up, JIT
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = naive_complexity(rgb)
        times["naive"].append(time.perf_counter() - t0)
        for b in backends:
            t0 = time.perf_counter()
            results[b] = patch_complexity(hr, chunk=args.chunk, backend=b)[0].numpy()
            times[b].append(time.perf_counter() - t0)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    rho_ref = naive_rho_s(rgb)
    print(f"image {args.image} 512x512, {ref.size} patches, threads {args.threads}, {args.repeats} repeats")
    for name, label in (("naive", "naive per-patch loop"), ("torch", "torch backend"), ("fused", "fused CPU kernel")):
        line = f"{label:21}: best {best[name] * 1e3:8.1f} ms   median {med[name] * 1e3:8.1f} ms"
        if name != "naive":
            line += f"   speed-up best/best {best['naive'] / best[name]:5.1f}x  median/median "
            line += f"{med['naive'] / med[name]:5.1f}x"
        print(line)
    for b in backends:
        vec = results[b]
        rho = float(detail_proportions(hr, round_to=None, chunk=args.chunk, backend=b)[0][0])
        flips = int(((vec > 50) != (ref > 50)).sum())
        print(
            f"{b:5}: max |complexity diff| {np.abs(vec - ref).max():.3g}, detailed-patch disagreements {flips}, "
            f"rho_s {rho:.6f} vs naive {rho_ref:.6f}"
        )


if __name__ == "__main__":
    main()

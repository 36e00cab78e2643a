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
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reward_service.proportions import detail_proportions, patch_complexity
from tests.reward_service.conftest import naive_complexity, naive_rho_s  # the loop the tests compare against


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the fused kernel uses one)")
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
    rho_ref = naive_rho_s(rgb, ref)
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

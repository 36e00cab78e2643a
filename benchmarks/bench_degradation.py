"""Time the Real-ESRGAN degradation on a batch of 512x512 images: ``python benchmarks/bench_degradation.py``.

Reports the whole pipeline per batch (several seeds: each takes a different
branch: noise kind, resize factors, sinc/JPEG order) for the GDPO and the
heavier Real-ESRGAN parameter sets, then the cost of each stage at full size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sr_data import kernels as K
from sr_data.degradation import (
    DegradationConfig,
    blur,
    degrade,
    draw_kernels,
    gaussian_noise,
    jpeg,
    poisson_noise,
    resize,
)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_pipeline(hr: torch.Tensor, config: DegradationConfig, seeds: int) -> list[float]:
    degrade(hr, torch.Generator().manual_seed(10_000), config)  # warm-up (allocator, kornia tables)
    return [timed(lambda s=s: degrade(hr, torch.Generator().manual_seed(s), config), hr.device) for s in range(seeds)]


def bench_stages(hr: torch.Tensor, repeats: int) -> dict[str, float]:
    b = hr.shape[0]
    g = torch.Generator().manual_seed(0)
    kernel = torch.stack([K.bivariate_gaussian(21, 2.0, 1.0, 0.5) for _ in range(b)]).float()
    zeros = torch.zeros(b, 1, 1, 1, device=hr.device)
    stages = {
        "blur 21x21 per-sample": lambda: blur(hr, kernel),
        "resize bicubic x0.5": lambda: resize(hr, (256, 256), "bicubic"),
        "gaussian noise": lambda: gaussian_noise(hr, g, zeros + 10 / 255, zeros),
        "poisson noise": lambda: poisson_noise(hr, g, zeros + 1.0, zeros),
        "jpeg q=75": lambda: jpeg(hr, torch.full((b,), 75.0)),
        "draw 3xB kernels": lambda: draw_kernels(b, g, DegradationConfig(), hr.device),
    }
    out = {}
    for name, fn in stages.items():
        fn()
        out[name] = statistics.median(timed(fn, hr.device) for _ in range(repeats))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hr = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x3x{args.size}x{args.size}")
    for name, config in (("gdpo", DegradationConfig()), ("realesrgan", DegradationConfig.realesrgan())):
        times = bench_pipeline(hr, config, args.seeds)
        print(f"{name:>10}: median {statistics.median(times):.3f} s/batch  min {min(times):.3f}  "
              f"max {max(times):.3f}  ({args.seeds} seeds)  = {statistics.median(times) / args.batch * 1e3:.0f} "
              f"ms/image")  # fmt: skip
    for stage, seconds in bench_stages(hr, args.repeats).items():
        print(f"  stage {stage:<24} {seconds * 1e3:8.1f} ms (full-size batch)")


if __name__ == "__main__":
    main()

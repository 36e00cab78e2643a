"""Tiny-model build time and one NAOSD group forward (G=6) at 64x64 and 128x128 (issue 2).

python benchmarks/bench_naosd_forward.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=6)
    args = parser.parse_args()

    import torch

    from common.naosd import ModelConfig
    from common.weights import build_naosd

    start = time.perf_counter()
    model = build_naosd(ModelConfig())
    print(f"tiny model build (imports already done): {time.perf_counter() - start:.2f} s (target < 10 s)")
    emb = model.encode_prompts([""])
    for side in (64, 128):
        lr = torch.rand(1, 3, side, side) * 2 - 1
        times = []
        with torch.no_grad():
            model.sample_group(lr, emb, group_size=args.group_size)  # warm-up
            for i in range(args.repeats):
                gen = torch.Generator().manual_seed(i)
                t0 = time.perf_counter()
                model.sample_group(lr, emb, group_size=args.group_size, generator=gen)
                times.append(time.perf_counter() - t0)
        print(f"NAOSD group forward G={args.group_size} {side}x{side}: median {statistics.median(times) * 1e3:.1f} ms "
              f"(min {min(times) * 1e3:.1f}, {args.repeats} runs, {torch.get_num_threads()} threads)")  # fmt: skip


if __name__ == "__main__":
    main()

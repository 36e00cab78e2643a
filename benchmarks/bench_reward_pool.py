"""Reward pool throughput (groups of G per second) with 1 and 2 Ray workers on the offline metrics.

    python benchmarks/bench_reward_pool.py [--size 128] [--group 6] [--groups-per-batch 2] [--batches 12]

Each worker gets num_cpus=1; Ray is started with as many CPUs as the largest pool.  Workers are
started and warmed up (one batch each) before the clock starts, so the numbers are steady-state
scoring throughput, including Arrow transfer to and from the actors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reward_service.config import RewardConfig, RewardPoolConfig
from reward_service.pool import RewardPool
from tests.reward_service.conftest import make_rollout_batch  # the synthetic groups the tests score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workers: int, batches: list, warmup: list) -> tuple[float, list]:
    config = RewardPoolConfig(num_workers=workers, num_cpus=1, timeout_s=600)
    with RewardPool(RewardConfig.offline(), config) as pool:
        pool.score(warmup[:workers])
        start = time.perf_counter()
        results = pool.score(batches)
        return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--group", type=int, default=6, help="G, samples per group")
    parser.add_argument("--groups-per-batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    n, g = args.groups_per_batch, args.group
    batches = [make_rollout_batch(n, g, args.size, seed) for seed in range(args.batches)]
    warmup = [make_rollout_batch(n, g, args.size, 10_000 + i) for i in range(max(args.workers))]
    total = n * args.batches
    print(f"{args.batches} batches x {n} groups of G={g} at {args.size}x{args.size}, offline metrics")
    try:
        for workers in args.workers:
            seconds, results = run(workers, batches, warmup)
            metric_s = statistics.mean(r.stats.metric_seconds for r in results)
            prop_s = statistics.mean(r.stats.proportion_seconds for r in results)
            call_s = statistics.mean(r.stats.seconds for r in results)
            print(
                f"{workers} worker(s): {total / seconds:6.2f} groups/s ({seconds:.2f} s for {total} groups); "
                f"per batch call {call_s * 1e3:.0f} ms = metrics {metric_s * 1e3:.0f} ms + proportions "
                f"{prop_s * 1e3:.0f} ms + rest"
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

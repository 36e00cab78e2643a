"""Adapter push latency: an SD 2.1-sized rank-4 ``gdpo`` adapter to N rollout actors via Ray's object store.

Builds SD 2.1-base's UNet (random weights, CPU, ~865M parameters), attaches the
rank-4 LoRA of SPEC section 2, keeps ``adapter_state_dict`` and frees the UNet.
Then it times :func:`learner.group.push_weights` (one ``ray.put``, every
actor's ``set_adapter`` acknowledged) ``--pushes`` times after ``--warmup``
pushes, with two kinds of receiver:

- ``ack``: returns at once (transport only: object store + deserialisation);
- ``apply``: verifies the sha256 digest and copies every tensor into
  preallocated tensors of the same shapes, i.e. what ``apply_to`` does minus
  the peft name lookup (4 full SD UNets would not fit this machine's memory).

It also times :func:`common.adapter_sync.pack` (copy + digest) on the learner side.

    python benchmarks/bench_weight_push.py [--actors 4] [--pushes 10] [--rank 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from common.adapter_sync import AdapterWeights, pack, verify  # noqa: E402
from learner.group import push_weights  # noqa: E402


class Receiver:
    """A rollout actor stand-in that either only acknowledges or verifies and copies in place."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], apply: bool) -> None:
        torch.set_num_threads(1)
        self.apply = apply
        self.buffers = {name: torch.zeros(shape) for name, shape in shapes.items()}  # stands in for the LoRA params

    def set_adapter(self, weights: AdapterWeights) -> int:
        if self.apply:
            verify(weights)
            with torch.no_grad():
                for name, tensor in weights.tensors.items():
                    self.buffers[name].copy_(tensor)
        return weights.version


def sd21_adapter_state(rank: int) -> tuple[dict[str, torch.Tensor], int, float]:
    """The rank-``rank`` adapter tensors of an SD 2.1-base UNet; also its parameter count and build seconds."""
    from benchmarks.sd21_unet import sd21_unet
    from common.naosd import UNET_LORA_PATTERNS, add_gdpo_adapter
    from common.weights import adapter_state_dict

    start = time.perf_counter()
    unet = sd21_unet()
    add_gdpo_adapter(unet, rank=rank, alpha=2.0 * rank, patterns=UNET_LORA_PATTERNS)
    base_params = sum(p.numel() for n, p in unet.named_parameters() if ".gdpo." not in n)
    state = adapter_state_dict(unet)
    del unet
    gc.collect()
    return state, base_params, time.perf_counter() - start


def time_pushes(state: dict[str, torch.Tensor], actors: int, pushes: int, warmup: int, apply: bool) -> list[float]:
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    receivers = [ray.remote(num_cpus=0)(Receiver).remote(shapes, apply) for _ in range(actors)]
    try:
        seconds = []
        for version in range(warmup + pushes):
            weights = pack(version, state)
            result = push_weights(weights, receivers)
            if version >= warmup:
                seconds.append(result.seconds)
        return seconds
    finally:
        for actor in receivers:
            ray.kill(actor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--pushes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()

    state, base_params, build_s = sd21_adapter_state(args.rank)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pack_s = []
    for version in range(5):
        start = time.perf_counter()
        pack(version, state)
        pack_s.append(time.perf_counter() - start)

    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}
    )
    report = {
        "unet_base_params": base_params,
        "lora_rank": args.rank,
        "adapter_tensors": len(state),
        "adapter_params": sum(t.numel() for t in state.values()),
        "adapter_mib": round(nbytes / 2**20, 2),
        "build_unet_s": round(build_s, 1),
        "pack_median_ms": round(1e3 * statistics.median(pack_s), 1),
        "actors": args.actors,
        "pushes": args.pushes,
    }
    for mode in ("ack", "apply"):
        seconds = time_pushes(state, args.actors, args.pushes, args.warmup, apply=mode == "apply")
        report[f"push_{mode}_median_ms"] = round(1e3 * statistics.median(seconds), 1)
        report[f"push_{mode}_min_ms"] = round(1e3 * min(seconds), 1)
        report[f"push_{mode}_max_ms"] = round(1e3 * max(seconds), 1)
    ray.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

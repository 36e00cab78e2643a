"""Distributed loop versus the same math in one plain process (issue 4).

Distributed: ``rollout.driver.train`` on the tiny config (Ray actors, Arrow
records, DeepSpeed learner).  Plain: one process, no Ray, DeepSpeed or Arrow:
NAOSD group sampling, the ARF reward (``RewardWorker.score_images``), the GDPO
loss and AdamW with gradient clipping, step after step.  Both report
steady-state SR samples per second (first step excluded).  Target ratio >= 0.8.

    python benchmarks/bench_loop_overhead.py [--steps 8] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plain_samples_per_second(job, steps: int) -> float:
    import torch

    from common.naosd import adapter_disabled, lora_parameters
    from common.weights import build_naosd
    from learner.gdpo_loss import gdpo_loss
    from reward_service.worker import RewardWorker
    from rollout.worker import group_seed
    from sr_data.source import PairSource

    model = build_naosd(job.model)
    source, scorer = PairSource(job.data), RewardWorker(job.reward)
    params = list(lora_parameters(model.unet).values())
    lc = job.learner
    opt = torch.optim.AdamW(params, lr=lc.lr, betas=lc.betas, eps=lc.eps, weight_decay=lc.weight_decay)
    n, g = job.run.groups_per_step, job.rollout.group_size
    emb = model.encode_prompts([""])
    index, start = 0, None
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        srs, z0s, hrs = [], [], []
        with torch.no_grad(), adapter_disabled(model.unet):  # reference sampling, as the tiny config
            for _ in range(n):
                pair = source.sample(index)
                gen = torch.Generator().manual_seed(group_seed(job.rollout.seed, index))
                lr = torch.from_numpy(pair.lr).float().div(127.5).sub(1).unsqueeze(0)
                sr = model.sample_group(lr, emb, group_size=g, generator=gen)[0]
                z0s.append(model.encode(sr, gen))
                srs.append(sr.add(1).div(2))
                hrs.append(torch.from_numpy(pair.hr))
                index += 1
        rewards = scorer.score_images(torch.stack(srs), torch.stack(hrs))
        out = gdpo_loss(
            model.unet,
            latents=torch.stack(z0s),
            noise=torch.randn(n, g, *z0s[0].shape[1:]),
            text_emb=emb.expand(n, -1, -1),
            advantages=torch.as_tensor(rewards.advantage, dtype=torch.float32),
            alphas_cumprod=model.alphas_cumprod,
            config=lc.loss,
        )
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, lc.grad_clip)
        opt.step()
    return (steps - 1) * n * g / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import ray

    from rollout.cli import pool_requests
    from rollout.driver import train
    from rollout.job import load_job

    out = tempfile.mkdtemp(prefix="bench-loop-")
    overrides = [f"run.steps={args.steps}", f"run.output_dir={out}", "run.sample_grid=false", *args.overrides]
    job = load_job("tiny", overrides)
    plain = plain_samples_per_second(job, args.steps)
    print(f"plain process: {plain:.2f} samples/s (steady state, {args.steps - 1} steps)")
    cpus = sum(p.total["CPU"] for p in pool_requests(job.cluster))
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus + 0.999)), include_dashboard=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        summary = train(job)
    finally:
        ray.shutdown()
    distributed = summary["steady_samples_per_second"]
    print(f"distributed loop: {distributed:.2f} samples/s (steady state), "
          f"learner wait fraction {summary['learner_wait_fraction']:.2f}")  # fmt: skip
    print(f"ratio distributed / plain = {distributed / plain:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()

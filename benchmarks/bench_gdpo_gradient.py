"""How much of one GDPO gradient is signal?  Why a short GDPO run on the tiny model barely moves it.

Eq. 9 re-noises each re-encoded SR latent with a fresh ``e_i`` (SPEC section 5), so the gradient of
one group is a random variable even for fixed samples and advantages.  This script scores real groups
of the start NAOSD (the committed tiny one, or ``--naosd-path``) on training crops (rollout worker ->
reward worker, as the loop does) and, from policy = reference, takes the GDPO gradient on the adapter under
``--draws`` loss-noise draws:

- *within a group*: the mean cosine between two draws' gradients (1 = the noise does not matter);
- *between groups*: the cosine between different groups' draw-averaged gradients (> 0: the groups
  agree on a direction that could generalise to unseen images).

With a per-step gradient whose consistent part is a fraction ``f`` of its length, an optimiser needs
on the order of ``1 / f^2`` gradients before the drift beats the random walk: that, against the
paper's 64 groups per step for 1,500 steps, is what the numbers are for.

``--resample`` also draws a second group of every crop from other NAOSD noise and compares the two groups'
gradients: near 1 if an image's preference is its own, near 0 if the sampling noise decides it.

``--shared-noise`` draws one loss noise per group (``learner.loss.noise=per_group``), as Diffusion-DPO's
code does for its pair: the members' errors then differ only through their latents.

    python benchmarks/bench_gdpo_gradient.py                  # 4 groups of G = 6, 8 draws each
    python benchmarks/bench_gdpo_gradient.py --shared-noise   # the same with one noise per group
    python benchmarks/bench_gdpo_gradient.py --groups 12 --draws 4 --shared-noise --resample --weighting fr_only
    python benchmarks/bench_gdpo_gradient.py --groups 12 --draws 4 --shared-noise --control brighter

It also prints, per latent channel, how the noise prediction Eq. 9 compares moves with the latent: the
slope of ``mean(eps_hat(x_i))`` on ``mean(z0_i)`` across a group's members under one shared loss noise.
With the noise shared, the GDPO gradient on a bias ``b`` of ``eps_hat`` is proportional to
``sum_i A_i eps_hat_i``, and NAOSD's step 4 turns ``b`` into ``-sqrt(1 - abar[t_diff]) / sqrt(abar[t_diff]) b``
on the sample: where the slope is negative, a step moves the one-step sampler *away* from the preferred
members along that direction.  A one-step model that returns a direction exactly
(``z0_hat = x / sqrt(abar[t_add])``) has the slope
``sqrt(abar[t_noise]) (1 - sqrt(abar[t_diff]) / sqrt(abar[t_add])) / sqrt(1 - abar[t_diff])`` when the loss asks
it at its own ``t_diff`` (SPEC: t_model = t_diff = 100): -0.384 with t_noise = t_add = 250, and negative for any
t_noise whenever ``t_add > t_diff``.

``--control brighter`` (or ``darker``, ``sharper``) scores the groups with ``bench_learning``'s positive-control reward,
which prefers the same thing (brighter, darker, more Sobel gradient) in every image.

``--probe-step`` then steps the adapter along the summed gradient (no optimiser, one step of a few lengths) and
samples held-out crops: which way the *sampler* moves, against the same step along a random direction.
``--naosd-path`` with ``--t-add/--t-diff/--t-noise/--t-model`` asks the same of another tiny model, e.g. the
diffusion denoiser of ``train_tiny_denoiser.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.bench_learning import CONTROLS, add_model_arguments, control_worker, model_config, sample
from common.records import decode_rewards, decode_rollout
from learner.gdpo_loss import GDPOLossConfig, gdpo_loss, predict_noise, renoised
from reward_service.config import RewardConfig
from reward_service.worker import RewardWorker
from rollout.worker import RolloutConfig, RolloutWorker
from sr_data.source import DataConfig
from sr_tools.heldout import heldout_crops, reward_metrics


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


@torch.no_grad()
def noise_slope(model: torch.nn.Module, groups: object, config: GDPOLossConfig) -> np.ndarray:
    """``[C]``: per latent channel, d mean(eps_hat) / d mean(z0) across the members of every group, one shared
    loss noise per group (so the members' inputs differ only through their latents)."""
    latents = torch.tensor(groups.latents)  # [N, G, C, h, w]
    noise = torch.randn(latents[:, :1].shape, generator=torch.Generator().manual_seed(0)).expand_as(latents)
    x, _, cond = renoised(latents, noise, torch.tensor(groups.text_emb), model.alphas_cumprod[config.t_noise])
    eps = predict_noise(model.unet, x, cond, config.t_model).unflatten(0, latents.shape[:2]).mean(dim=(3, 4))
    z = latents.mean(dim=(3, 4))  # [N, G, C]
    z, eps = z - z.mean(1, keepdim=True), eps - eps.mean(1, keepdim=True)
    return ((z * eps).sum(dim=(0, 1)) / (z * z).sum(dim=(0, 1))).numpy()


def exact_slope(model: torch.nn.Module, config: GDPOLossConfig) -> float:
    """The slope of a one-step model that returns a direction exactly (``z0_hat = x / sqrt(abar[t_add])`` by step 4
    at ``t_diff``), for inputs re-noised at the loss's ``t_noise``."""
    a = model.alphas_cumprod.sqrt()
    return float(a[config.t_noise] * (1 - a[model.t_diff] / a[model.t_add]) / (1 - a[model.t_diff] ** 2).sqrt())


PROBE_STEPS = (0.003, 0.01, 0.03)  # lengths of the probe's step, as a fraction of the adapter weights' norm


@torch.no_grad()
def probe_step(model: torch.nn.Module, lora: list[torch.nn.Parameter], gradient: torch.Tensor, control: str) -> None:
    """``--probe-step``: which way does one plain gradient step on Eq. 9 move the *sampler*?  The held-out crops
    of ``bench_learning`` are sampled (fixed noise) before and after ``theta - eta |theta| g / |g|`` and scored
    with the absolute ARF reward and, with ``--control``, the control's raw metric.  The same step along a random
    direction is the null: what any step of that length changes.  A first-order answer: no optimiser state, no
    saturation of the logit, no second step."""
    hr, lr = heldout_crops(12, 64)
    workers = {"reward": RewardWorker(RewardConfig.offline())}
    if control:
        workers[control] = control_worker(control)
    theta = torch.cat([p.flatten() for p in lora])
    # At policy = reference every lora_B is zero, so the gradient (and any first-order change) lives on the B
    # entries only: the random direction is drawn there too, or part of its length would do nothing.
    noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
    directions = {"gradient": gradient, "random": noise * (gradient != 0)}

    def metrics() -> dict[str, float]:
        images = sample(model.eval(), lr, 2, seed=0)
        return {name: reward_metrics(worker, images, hr)[name] for name, worker in workers.items()}

    start = metrics()
    print(f"one plain step of relative length eta, held-out change ({len(hr)} crops, 2 samples, fixed noise):")
    for label, direction in directions.items():
        for eta in PROBE_STEPS:
            torch.nn.utils.vector_to_parameters(theta - eta * theta.norm() * direction / direction.norm(), lora)
            now = metrics()
            print(f"  {label:>8} eta {eta:<6g}" + "".join(f" {k} {now[k] - start[k]:+.5f}" for k in now), flush=True)
    torch.nn.utils.vector_to_parameters(theta, lora)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--draws", type=int, default=8, help="loss-noise draws per group")
    parser.add_argument("--omega", type=float, default=5000.0)
    parser.add_argument("--weighting", default="arf", choices=["arf", "fixed", "fr_only", "nr_only"])
    parser.add_argument("--control", default="", choices=["", *CONTROLS], help="a positive-control reward instead")
    parser.add_argument("--seed", type=int, default=0, help="the training crops' and the rollout's seed")
    add_model_arguments(parser)
    parser.add_argument("--probe-step", action="store_true",
                        help="also: which way one plain gradient step moves the held-out samples' metric")  # fmt: skip
    parser.add_argument(
        "--shared-noise",
        action="store_true",
        help="one loss noise per group (learner.loss.noise=per_group), as Diffusion-DPO shares it in a pair",
    )
    parser.add_argument(
        "--resample",
        action="store_true",
        help="also a second group of every crop from other NAOSD noise: does the same image prefer the same way?",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = DataConfig(crop_size=64, degradation="bicubic", seed=args.seed)  # the same crops for both rollout seeds
    offline = RewardConfig.offline(weighting=args.weighting)
    reward = control_worker(args.control) if args.control else RewardWorker(offline)
    rollouts = [RolloutWorker(model_config(args), RolloutConfig(group_size=args.group_size, seed=seed), data, "grad")
                for seed in ((args.seed, args.seed + 1) if args.resample else (args.seed,))]  # fmt: skip
    scored = [reward.score_batch(rollout.generate(range(args.groups)))[0] for rollout in rollouts]
    decoded = [(decode_rollout(batch), decode_rewards(batch)) for batch in scored]  # per rollout: groups, rewards
    config = GDPOLossConfig(
        omega=args.omega,
        noise="per_group" if args.shared_noise else "per_sample",
        t_noise=args.t_noise,
        t_model=args.t_model,
    )
    model = rollouts[0].model
    lora = [p.requires_grad_(True) for name, p in model.unet.named_parameters() if ".gdpo." in name]

    def gradient(r: int, i: int, draw: int) -> torch.Tensor:
        """Group ``i`` of rollout ``r``, loss-noise draw ``draw``: every group has draws of its own."""
        groups, rewards = decoded[r]
        latents = torch.tensor(groups.latents[i : i + 1])
        seed = 1000 * (r * args.groups + i) + draw
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        out = gdpo_loss(
            model.unet,
            latents=latents,
            noise=noise,
            text_emb=torch.tensor(groups.text_emb[i : i + 1]),
            advantages=torch.tensor(rewards.advantage[i : i + 1], dtype=torch.float32),
            alphas_cumprod=model.alphas_cumprod,
            config=config,
        )
        grads = torch.autograd.grad(out.loss, lora, allow_unused=True)
        flat = [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(lora, grads, strict=True)]
        return torch.cat(flat)

    print(f"GDPO gradient on the adapter of the start NAOSD (policy = reference), omega {args.omega}, "
          f"{args.groups} groups of G={args.group_size}, {args.draws} loss-noise draws each, "
          f"reward {args.control or args.weighting}, "
          f"{'one loss noise per group' if args.shared_noise else 'a fresh loss noise per sample'}")  # fmt: skip
    means, within_all = [], []
    for i in range(args.groups):
        draws = torch.stack([gradient(0, i, k) for k in range(args.draws)])
        within = float(np.mean([cosine(draws[a], draws[b]) for a, b in itertools.combinations(range(args.draws), 2)]))
        within_all.append(within)
        means.append(draws.mean(0))
        print(f"  group {i}: advantages {np.array2string(decoded[0][1].advantage[i], precision=2)}; "
              f"cosine between two draws {within:+.3f}", flush=True)  # fmt: skip
    between = [cosine(means[a], means[b]) for a, b in itertools.combinations(range(args.groups), 2)]
    print(f"within a group, cosine between two loss-noise draws: mean {np.mean(within_all):+.3f}")
    print(f"between groups, cosine of {args.draws}-draw mean gradients: mean {np.mean(between):+.3f} "
          f"(min {np.min(between):+.3f}, max {np.max(between):+.3f}; {len(between)} pairs)")  # fmt: skip
    slope = noise_slope(model, decoded[0][0], config)
    print(f"d mean(eps_hat) / d mean(z0) per latent channel, within groups: {np.array2string(slope, precision=3)} "
          f"(a model exact along a direction: {exact_slope(model, config):+.3f}; < 0: a step moves the sampler away "
          f"from the preferred members there)")  # fmt: skip
    if args.probe_step:
        probe_step(model, lora, torch.stack(means).sum(0), args.control)
    if args.resample:  # > 0: an image's preference is its own (learnable); ~ 0: it is the sampling noise's
        same = [cosine(means[i], torch.stack([gradient(1, i, k) for k in range(args.draws)]).mean(0))
                for i in range(args.groups)]  # fmt: skip
        print(f"same crop, a second group from other NAOSD noise: cosine of the two groups' mean gradients "
              f"{np.mean(same):+.3f} (min {np.min(same):+.3f}, max {np.max(same):+.3f}; {len(same)} crops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

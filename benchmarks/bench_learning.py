"""Does it learn?  (a) the tiny NAOSD against bicubic, (b) a short GDPO run against its starting point.

Both on held-out crops of photos nothing ever trains on (``sr_data.embedded_images.EMBEDDED_HELDOUT``),
degraded as the tiny config's training data is (bicubic x4).

(a) PSNR-Y, SSIM-Y and a sharpness ratio (mean Sobel gradient magnitude of the image over the HR's;
    1 = as sharp as the HR) of bicubic upsampling and of the tiny NAOSD (mean over its samples).
(b) For each seed: GDPO from the committed tiny NAOSD, through the same plain classes the Ray actors
    host (RolloutWorker -> RewardWorker -> LearnerRank with DeepSpeed, one rank, in this process),
    for ``--steps`` steps.  Then start and end model sample the held-out crops with *identical* noise
    (as the paper's Table 1) and are scored with the reward's own metrics on their fixed score
    ranges (an absolute ARF reward: Eq. 7 with range- instead of group-normalised scores) and with
    metrics the reward does not contain (SSIM-Y, sharpness).  Mean and spread over the seeds.

    ``--control brighter`` (or ``darker``, ``sharper``) trains on a reward whose preference is the same for
    every image (brighter, darker, or more Sobel gradient is better) instead of the ARF: a positive control
    for the whole loop.  If GDPO raises such a reward on the held-out crops, the loop (rollout -> reward ->
    advantage -> loss -> step) learns in the rewarded direction and what fails to carry over is the ARF's
    preference; if it does not, the loss's effect on the one-step sampler is in question.
    ``--control random`` scores every sample with a coin: the null control, what any run at that lr changes.

(c) ``--objective gdpo dpo nft oars reward_feedback``: every learner objective (SPEC section 10) for the
    same budget (steps, groups, lr) from the same start and seeds, then the (b) metrics' held-out change
    of each, in one table.

    python benchmarks/bench_learning.py                      # (a) and (b): 80 steps of 16 groups, 3 seeds
    python benchmarks/bench_learning.py --skip-gdpo          # (a) only, about a minute
    python benchmarks/bench_learning.py --control brighter   # (b) on the positive-control reward
    python benchmarks/bench_learning.py --control brighter --eval-every 1   # and the held-out change per step
    python benchmarks/bench_learning.py --naosd-path runs/tiny-denoiser --t-add 250 --t-diff 250 --t-model 250
    python benchmarks/bench_learning.py --steps 30 --seeds 0 1 --objective gdpo dpo nft oars reward_feedback
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kornia
import numpy as np
import torch

from common.adapter_sync import apply_to
from common.naosd import NAOSD, ModelConfig
from common.weights import build_naosd
from learner.reward_feedback_model import sobel_sharpness
from reward_service.config import RewardConfig
from reward_service.metrics_iqa import MetricFn
from reward_service.worker import RewardWorker
from sr_data.embedded_images import EMBEDDED_HELDOUT
from sr_tools.heldout import heldout_crops, image_metrics, reward_metrics
from sr_tools.heldout import sample_fixed_noise as sample  # crop i's noise depends on (seed, i) only


@torch.no_grad()
def vae_reconstruction(model: NAOSD, hr: torch.Tensor) -> torch.Tensor:
    """The HR through the VAE (posterior mode): the best any latent can give, ``[N, 3, H, W]`` in [0, 1]."""
    z = model.vae.encode(hr.float().div(127.5).sub(1)).latent_dist.mode() * model.scaling_factor
    return model.decode(z).add(1).div(2)


def compare_bicubic(config: ModelConfig, hr: torch.Tensor, lr: torch.Tensor, samples: int) -> None:
    model = build_naosd(config).eval()
    sr = sample(model, lr, samples, seed=0)
    rows = {"bicubic": image_metrics(lr.float().div(255), hr), "tiny NAOSD": image_metrics(sr, hr)}
    # Where the gap comes from: the VAE alone (HR in, HR out), the injected noise (the average of 16 samples,
    # i.e. of 16 noise draws, is not a sample: it shows what the per-sample spread costs), other t_add.
    rows["VAE(HR)"] = image_metrics(vae_reconstruction(model, hr), hr)
    rows["mean of 16"] = image_metrics(sample(model, lr, 16, seed=0).mean(1), hr)
    for t_add in (150, 200):
        # t_diff never above t_add: a model sampled at t_diff = t_add (a denoiser's own step) stays so
        other = build_naosd(dataclasses.replace(config, t_add=t_add, t_diff=min(config.t_diff, t_add))).eval()
        rows[f"t_add={t_add}"] = image_metrics(sample(other, lr, samples, seed=0), hr)
    print(f"\n(a) held-out: {len(hr)} crops of {hr.shape[-1]}x{hr.shape[-1]} from {sorted(EMBEDDED_HELDOUT)}, "
          f"x4 bicubic LR; NAOSD: mean over {samples} samples per crop")  # fmt: skip
    print(f"{'':>12} {'PSNR-Y':>8} {'SSIM-Y':>8} {'sharpness':>10}")
    for name, m in rows.items():
        print(f"{name:>12} {m['psnr_y']:8.3f} {m['ssim_y']:8.4f} {m['sharpness']:10.3f}")
    gap = rows["tiny NAOSD"]["psnr_y"] - rows["bicubic"]["psnr_y"]
    print(f"PSNR-Y of NAOSD (t_add={model.t_add}) minus bicubic: {gap:+.3f} dB (target: >= -1 dB); "
          "VAE(HR): the HR encoded and decoded, the ceiling for any latent")  # fmt: skip


# --objective: a learner.objective, or "oars" = the nft objective on the process-aware reward with the group
# filter (tiny stand-ins: SSIM fidelity, PIQE quality); reward_feedback uses the tiny_rfsr stand-ins.
OBJECTIVES = ("gdpo", "dpo", "nft", "oars", "reward_feedback")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The start model and the timesteps the loss asks it at; shared with ``bench_gdpo_gradient.py``."""
    parser.add_argument("--naosd-path", default="", help="another tiny-architecture model folder (a pre-training "
                        "export, or train_tiny_denoiser.py's); default: the committed tiny model")  # fmt: skip
    parser.add_argument("--t-add", type=int, default=250, help="model.t_add: the sampler's noise-injection step")
    parser.add_argument("--t-diff", type=int, default=100, help="model.t_diff: the sampler's UNet timestep")
    parser.add_argument("--t-noise", type=int, default=250, help="learner.loss.t_noise: z0 is re-noised here (SPEC 5)")
    parser.add_argument("--t-model", type=int, default=100, help="learner.loss.t_model: the UNets are asked here")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model every part starts from: the committed tiny NAOSD, or ``--naosd-path``."""
    return ModelConfig(naosd_path=args.naosd_path, t_add=args.t_add, t_diff=args.t_diff)


def _luminance(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    return kornia.color.rgb_to_grayscale(sr).mean(dim=(1, 2, 3))


def _gradient(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    return sobel_sharpness(sr)


_COIN = torch.Generator().manual_seed(0)


def _random(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    return torch.rand(sr.shape[0], generator=_COIN)


# --control: no-reference rewards that prefer the same thing in every image, so every group's gradient could point
# the same way: (metric, lower is better).  brighter and darker rank the same samples in opposite orders, so a
# change that both produce is not the reward's doing.  random is the null control: advantages that carry no
# preference at all, so what it changes is what any GDPO run at that lr changes.  The coin is reseeded with each
# run's seed (``gdpo_run``), so seed s flips the same coins in every invocation and different seeds flip different
# ones; held-out scoring draws from it too.  Values lie in [0, 1].
CONTROLS = {
    "brighter": (_luminance, False),
    "darker": (_luminance, True),
    "sharper": (_gradient, False),
    "random": (_random, False),
}


def control_worker(name: str) -> RewardWorker:
    """A reward worker whose reward is the control ``name`` alone (min-max over the group, Eq. 8)."""
    fn, lower_better = CONTROLS[name]
    config = RewardConfig(fr_metrics=(), nr_metrics=(name,), weighting="nr_only")
    return RewardWorker(config, metrics=[MetricFn(name=name, fn=fn, lower_better=lower_better)])


def reward_worker(args: argparse.Namespace, config: RewardConfig) -> RewardWorker:
    """The worker for ``config``, or, with ``--control``, the control metric's."""
    return control_worker(args.control) if args.control else RewardWorker(config)


def held_out(worker: RewardWorker, control: RewardWorker | None, images: torch.Tensor, hr: torch.Tensor) -> dict:
    """The ARF's metrics and absolute reward, the image metrics, and the control metric when there is one."""
    values = {**reward_metrics(worker, images, hr), **image_metrics(images, hr)}
    if control is not None:
        (name,) = control.metric_names
        values[name] = reward_metrics(control, images, hr)[name]
    return values


def method_configs(args: argparse.Namespace, objective: str, seed: int) -> tuple[RewardConfig, object]:
    """The training reward's and the learner's config of one ``--objective`` (same lr, seed and budget for all)."""
    from learner.config import LearnerConfig
    from learner.gdpo_loss import GDPOLossConfig
    from learner.reward_feedback import RewardFeedbackConfig

    reward = RewardConfig.offline(weighting=args.weighting)
    if objective == "oars":
        reward = RewardConfig(kind="process_aware", fr_metrics=("ssim",), nr_metrics=("piqe",), filter_groups=True)
    rf = RewardFeedbackConfig(metric="sobel_sharpness", features="tiny_conv")
    loss = GDPOLossConfig(omega=args.omega, noise=args.loss_noise, t_noise=args.t_noise, t_model=args.t_model)
    learner = LearnerConfig(
        lr=args.lr, seed=seed, checkpoint_every=0, loss=loss, reward_feedback=rf,
        objective="nft" if objective == "oars" else objective,
    )  # fmt: skip
    return reward, learner


def gdpo_run(
    args: argparse.Namespace, seed: int, objective: str = "gdpo", on_step: Callable[[int, object], None] | None = None
) -> object:
    """``objective`` (GDPO by default) from the start model; returns the final adapter.  ``on_step(step, adapter)``
    runs after every ``--eval-every`` steps."""
    steps, groups_per_step, group_size = args.steps, args.groups_per_step, args.group_size
    from learner.engine import LearnerRank
    from rollout.worker import RolloutConfig, RolloutWorker
    from sr_data.source import DataConfig

    data = DataConfig(crop_size=64, degradation="bicubic", seed=seed)
    rollout_config = RolloutConfig(group_size=group_size, seed=seed, sample_from=args.sample_from)
    rollout = RolloutWorker(model_config(args), rollout_config, data, f"bench{seed}")
    reward_config, config = method_configs(args, objective, seed)
    reward = reward_worker(args, reward_config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.manual_seed(seed)
    _COIN.manual_seed(seed)
    learner = LearnerRank(model_config(args), config, 0, 1, "127.0.0.1", port)
    start = time.perf_counter()
    for step in range(steps):
        batch = rollout.generate(range(step * groups_per_step, (step + 1) * groups_per_step))
        scored, _ = reward.score_batch(batch)
        if scored.num_rows == 0:  # every group filtered (oars): no step, the budget counts it
            print(f"  seed {seed} step {step + 1}: every group filtered, no update", flush=True)
            continue
        stats = learner.train_step(scored)
        if args.sample_from == "policy":  # on-policy variant (SPEC section 3): the next groups see this step
            rollout.set_adapter(learner.adapter_weights())
        if (step + 1) % max(steps // 5, 1) == 0:
            print(f"  {objective} seed {seed} step {step + 1}/{steps}: loss {stats['loss']:.4f} "
                  f"grad {stats['grad_norm']:.3g} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        if on_step is not None and args.eval_every and (step + 1) % args.eval_every == 0:
            on_step(step + 1, learner.adapter_weights())
    return learner.adapter_weights()


@dataclasses.dataclass
class LearningCurve:
    """``--eval-every``: the held-out change of the reward (and the control) at a step of a run."""

    model: NAOSD  # sampled with the run's adapter; the same noise per crop as the start's
    worker: RewardWorker
    control: RewardWorker | None
    hr: torch.Tensor
    lr: torch.Tensor
    seed: int
    start: dict[str, float]  # the start model's held-out values
    args: argparse.Namespace

    def __call__(self, step: int, weights: object) -> None:
        apply_to(self.model.unet, weights)
        images = sample(self.model, self.lr, self.args.samples, seed=self.seed)
        now = held_out(self.worker, self.control, images, self.hr)
        keys = dict.fromkeys(("reward", self.args.control or "reward"))
        print(f"    held-out change at step {step}: "
              + ", ".join(f"{key} {now[key] - self.start[key]:+.4f}" for key in keys), flush=True)  # fmt: skip


def compare_gdpo(args: argparse.Namespace, hr: torch.Tensor, lr: torch.Tensor) -> None:
    if args.objective != ["gdpo"]:
        compare_objectives(args, hr, lr)
        return
    worker = RewardWorker(RewardConfig.offline())
    control = control_worker(args.control) if args.control else None
    start_model = build_naosd(model_config(args)).eval()
    rows: dict[str, list[float]] = {}
    trained_on = f"the control {args.control}" if control else f"{worker.metric_names} ({args.weighting})"
    print(f"\n(b) GDPO: {args.steps} steps x {args.groups_per_step} groups of G={args.group_size}, lr {args.lr}, "
          f"omega {args.omega}, loss noise {args.loss_noise} at t {args.t_noise} asked at {args.t_model}, "
          f"samples from the {args.sample_from}, reward {trained_on}; seeds {args.seeds}")  # fmt: skip
    for seed in args.seeds:
        start = held_out(worker, control, sample(start_model, lr, args.samples, seed=seed), hr)
        end_model = build_naosd(model_config(args)).eval()
        weights = gdpo_run(args, seed, on_step=LearningCurve(end_model, worker, control, hr, lr, seed, start, args))
        apply_to(end_model.unet, weights)
        after = sample(end_model, lr, args.samples, seed=seed)  # identical noise per crop
        for name, values in (("start", start), ("gdpo", held_out(worker, control, after, hr))):
            for key, value in values.items():
                rows.setdefault(f"{key}|{name}", []).append(value)
        for key in dict.fromkeys(("reward", args.control or "reward")):
            print(f"  seed {seed}: held-out {key} {rows[f'{key}|start'][-1]:.4f} -> {rows[f'{key}|gdpo'][-1]:.4f} "
                  f"({rows[f'{key}|gdpo'][-1] - rows[f'{key}|start'][-1]:+.4f})", flush=True)  # fmt: skip
    print(f"\n{'metric':>12} {'start':>18} {'after GDPO':>18} {'change':>18}   (mean ± std over seeds)")
    for key in dict.fromkeys(k.split("|")[0] for k in rows):
        a, b = np.array(rows[f"{key}|start"]), np.array(rows[f"{key}|gdpo"])
        d = b - a
        if control:
            lower = " (its raw metric, lower is better)" if CONTROLS[args.control][1] else ""
            note = f"  (the training reward{lower})" if key == args.control else "  (not trained on)"
        else:
            note = "" if key in ("reward", *worker.metric_names) else "  (not in the reward)"
        print(f"{key:>12} {a.mean():10.4f} ± {a.std():<6.4f} {b.mean():10.4f} ± {b.std():<6.4f} "
              f"{d.mean():+10.4f} ± {d.std():<6.4f}{note}")  # fmt: skip


def compare_objectives(args: argparse.Namespace, hr: torch.Tensor, lr: torch.Tensor) -> None:
    """Every ``--objective`` for the same budget from the same start; one table of held-out changes."""
    worker = RewardWorker(RewardConfig.offline())
    control = control_worker(args.control) if args.control else None
    start_model = build_naosd(model_config(args)).eval()
    changes: dict[str, dict[str, list[float]]] = {}
    starts: dict[str, list[float]] = {}
    print(f"\n(c) objectives {args.objective}: {args.steps} steps x {args.groups_per_step} groups of "
          f"G={args.group_size}, lr {args.lr}, seeds {args.seeds}; held-out change vs the start")  # fmt: skip
    for seed in args.seeds:
        before = sample(start_model, lr, args.samples, seed=seed)
        start = held_out(worker, control, before, hr)
        for key, value in start.items():
            starts.setdefault(key, []).append(value)
        for objective in args.objective:
            begun = time.perf_counter()
            end_model = build_naosd(model_config(args)).eval()
            apply_to(end_model.unet, gdpo_run(args, seed, objective))
            after = sample(end_model, lr, args.samples, seed=seed)  # identical noise per crop
            end = held_out(worker, control, after, hr)
            for key, value in end.items():
                changes.setdefault(objective, {}).setdefault(key, []).append(value - start[key])
            print(f"  {objective} seed {seed}: {time.perf_counter() - begun:.0f} s", flush=True)
    keys = list(starts)
    print(f"\n{'method':>16} " + " ".join(f"{k:>17}" for k in keys) + "   (change: mean ± std over seeds)")
    print(f"{'start (value)':>16} " + " ".join(f"{np.mean(starts[k]):17.4f}" for k in keys))
    for objective, row in changes.items():
        cells = " ".join(f"{np.mean(row[k]):+9.4f} ± {np.std(row[k]):<6.4f}" for k in keys)
        print(f"{objective:>16} {cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=24, help="held-out crops")
    parser.add_argument("--size", type=int, default=64, help="HR crop side")
    parser.add_argument("--samples", type=int, default=2, help="NAOSD samples per crop (fixed noises)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # Many groups per step at a small lr: one group's gradient is mostly loss noise (README, "Does GDPO improve it?").
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--groups-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4, help="paper: 5e-5 (SD); 1e-3 overshoots here")
    parser.add_argument("--weighting", default="arf", choices=["arf", "fixed", "fr_only", "nr_only"],
                        help="the training reward's weighting (reward.weighting); evaluation always reports ARF")
    parser.add_argument("--omega", type=float, default=5000.0)
    parser.add_argument("--loss-noise", default="per_sample", choices=["per_sample", "per_group"],
                        help="learner.loss.noise: a fresh e_i per member (SPEC 5) or one per group (Diffusion-DPO)")
    parser.add_argument("--sample-from", default="reference", choices=["reference", "policy"],
                        help="rollout.sample_from: the frozen reference (paper) or the current policy")
    parser.add_argument("--objective", nargs="+", default=["gdpo"], choices=OBJECTIVES,
                        help="learner objectives to compare (same start, budget, lr and seeds); oars = nft on the "
                             "process-aware reward with the group filter")  # fmt: skip
    parser.add_argument("--control", default="", choices=["", *CONTROLS],
                        help="train (b) on a positive-control reward (the same preference for every image) "
                             "instead of the ARF; the ARF and image metrics are still reported")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=0, help="(b): also print the held-out change every N "
                        "steps (a learning curve; the end point is the table's; with --control random the extra "
                        "held-out scoring draws from the run's coin: training sees another coin sequence)")  # fmt: skip
    parser.add_argument("--skip-gdpo", action="store_true", help="only (a)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hr, lr = heldout_crops(args.crops, args.size)
    compare_bicubic(model_config(args), hr, lr, args.samples)
    if not args.skip_gdpo:
        compare_gdpo(args, hr, lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

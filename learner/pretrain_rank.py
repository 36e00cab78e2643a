"""One data-parallel rank of NAOSD pre-training (SPEC section 9) under DeepSpeed.

A plain class (tests drive it without Ray; :mod:`learner.pretrain` hosts one
per Ray actor).  Each step the rank reads its shard of the global batch from
the data source by index, runs NAOSD's one-step forward, and takes one
optimiser step on two parameter groups: the generator (NAOSD) and, with VSD,
the fake score network, each clipped to ``grad_clip`` on its own as the
reference clips each of its two optimisers.  DeepSpeed averages the gradients
over ranks once per step (the generator's backward stays inside the
accumulation window, the fake network's closes it).

Everything random in a step (posterior samples, injected noise, VSD's
timesteps and noises) comes from a generator seeded by (seed, step, rank), and
the data indices from the step, so a resumed run repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from common import checkpoint_files, checkpoint_store
from common.naosd import ModelConfig
from learner.pretrain_loss import ImageLoss, PretrainLossConfig
from learner.pretrain_model import PretrainModelConfig, PretrainNAOSD
from sr_data.source import DataConfig, PairSource

# The reference's negative prompt: the unconditional branch of the real score's guidance (VSD).
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth"
)
_CLIENT_KEY = "naosd_pretrain_state"


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """How one pre-training rank optimises NAOSD (defaults: the paper and the reference script)."""

    batch_size: int = 16  # images per step over all ranks (paper: 16 on 4 GPUs)
    lr: float = 5e-5
    fake_lr: float = 5e-5  # the fake score network's optimiser
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: float = 1.0  # per parameter group; 0 = off
    # 0: constant lr (the paper); N: cosine decay from lr to 0 over N steps (the tiny model trained from scratch)
    lr_decay_steps: int = 0
    seed: int = 0
    negative_prompt: str = NEGATIVE_PROMPT
    lpips_weights_dir: str = ""  # folder with LPIPS-VGG's weight files (pyiqa names); needed when lambda_lpips > 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)

    def __post_init__(self) -> None:
        for name in ("lr", "fake_lr", "eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < float("inf") or not 0 <= self.grad_clip < float("inf"):
            raise ValueError("weight_decay and grad_clip must be finite and >= 0")
        if self.lr_decay_steps < 0:
            raise ValueError(f"lr_decay_steps must be >= 0, got {self.lr_decay_steps}")
        if self.batch_size < 1 or self.seed < 0:
            raise ValueError(f"batch_size must be >= 1 and seed >= 0, got {self.batch_size}, {self.seed}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


def deepspeed_config(config: PretrainConfig, world_size: int) -> dict[str, Any]:
    """ZeRO stage 0, fp32: the trainable weights are LoRA (or a tiny model), and the clipping is ours."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # clipped per parameter group in train_step
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }


def lpips_loss(weights_dir: str, device: torch.device | str, name: str = "lpips-vgg", **options: Any) -> ImageLoss:
    """pyiqa's LPIPS (VGG by default, as the reference) as a differentiable loss on [-1, 1] images.

    Weights come from local files only (``weights_dir``, then the usual caches); none found is a
    ``ValueError``, never a download and never a silently dropped term.
    """
    from sr_tools.iqa import MissingWeights, create_metric

    try:
        metric = create_metric(name, weights_dir=weights_dir or None, device=str(device), as_loss=True, **options)
    except MissingWeights as err:
        raise ValueError(f"pretrain.loss.lambda_lpips > 0 needs {name}'s weights: {err}") from None
    metric.model.requires_grad_(False)

    def lpips(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return metric.model((sr + 1) / 2, (hr + 1) / 2).reshape(-1)

    return lpips


class PretrainRank:
    """One rank: NAOSD with its pre-training adapters, a DeepSpeed engine, a data source."""

    def __init__(  # noqa: PLR0917 - the positional signature matches LearnerRank's
        self,
        model_config: ModelConfig,
        config: PretrainConfig,
        data_config: DataConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
    ) -> None:
        if config.batch_size % world_size:
            raise ValueError(f"pretrain.batch_size={config.batch_size} must divide evenly over {world_size} ranks")
        from learner.engine import init_distributed, initialize  # DeepSpeed: in the rank's process only

        self.config, self.rank, self.world_size = config, rank, world_size
        init_distributed(rank, world_size, master_addr, master_port)
        torch.manual_seed(config.seed)  # the LoRA init (identical on every rank)
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(auto if config.device == "auto" else config.device)
        self.model = PretrainNAOSD(model_config, config.model, config.loss).to(device)
        groups = self.model.trainable_groups()
        self._groups = {name: params for name, params in groups.items() if params}
        lrs = {"generator": config.lr, "fake": config.fake_lr}
        self._base_lrs = [lrs[name] for name in self._groups]
        optimizer = torch.optim.AdamW(
            [{"params": params, "lr": lrs[name]} for name, params in self._groups.items()],
            betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
        )  # fmt: skip
        params = [p for group in self._groups.values() for p in group]
        self.engine = initialize(self.model, optimizer, params, deepspeed_config(config, world_size))
        self.engine.train()
        self.device = self.engine.device
        self.source = PairSource(data_config)
        self.lpips = lpips_loss(config.lpips_weights_dir, self.device) if config.loss.lambda_lpips else None
        naosd = self.model.naosd
        with torch.no_grad():
            self._negative = naosd.encode_prompts([config.negative_prompt]) if self.model.vsd else None
        self._prompts: dict[str, torch.Tensor] = {}

    @property
    def step(self) -> int:
        return int(self.engine.global_steps)

    def indices(self, step: int) -> list[int]:
        """The data indices this rank trains on at ``step`` (the data position is the step)."""
        per = self.config.batch_size // self.world_size
        start = step * self.config.batch_size + self.rank * per
        return list(range(start, start + per))

    def train_step(self) -> dict[str, float]:
        """One optimiser step on this rank's shard; returns this rank's loss terms and grad norms."""
        step = self.step
        pairs = [self.source.sample(i) for i in self.indices(step)]
        lr = torch.from_numpy(np.stack([p.lr for p in pairs])).to(self.device).float().div(127.5).sub(1)
        hr = torch.from_numpy(np.stack([p.hr for p in pairs])).to(self.device).float().div(127.5).sub(1)
        text = torch.cat([self._embed(p.prompt) for p in pairs])
        negative = None if self._negative is None else self._negative.expand(len(pairs), -1, -1)
        generator = torch.Generator(self.device).manual_seed(_step_seed(self.config.seed, step, self.rank))
        losses = self.engine(lr, hr, text, negative, generator=generator, lpips=self.lpips)
        if losses.fake is not None:
            self.engine.set_gradient_accumulation_boundary(False)  # one all-reduce per step, after both
            self.engine.backward(losses.generator.total)
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(losses.fake)
        else:
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(losses.generator.total)
        norms = {f"grad_norm_{name}": self._clip(params) for name, params in self._groups.items()}
        factor = lr_factor(step, self.config.lr_decay_steps)
        for group, base in zip(self.engine.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor  # a function of the step alone: nothing to checkpoint
        self.engine.step()
        stats = {f"loss_{k}": v for k, v in losses.generator.terms.items()}
        stats["loss_total"] = float(losses.generator.total.detach())
        if losses.fake is not None:
            stats["loss_fake"] = float(losses.fake.detach())
        return {**stats, **norms, "step": float(self.step)}

    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        grads = [p for p in params if p.grad is not None]
        if not grads:
            return 0.0
        if self.config.grad_clip:
            return float(torch.nn.utils.clip_grad_norm_(grads, self.config.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))

    def _embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompts:
            with torch.no_grad():
                self._prompts[prompt] = self.model.naosd.encode_prompts([prompt])
        return self._prompts[prompt]

    def save_checkpoint(self, root: str | Path, *, keep: int = 0) -> str:
        """Every rank writes its DeepSpeed state into ``<root>/checkpoint-<step>/``, atomically (a collective).

        The step is the data position.  Same layout and rules as the GDPO learner's
        (:func:`learner.rank_checkpoint.save_atomically`: manifest written last, rename, ``latest``, retention).
        """
        from learner.rank_checkpoint import save_atomically

        def write(staging: Path) -> None:
            self.engine.save_checkpoint(
                str(staging), tag=f"step{self.step:08d}", client_state={_CLIENT_KEY: {"step": self.step}},
                exclude_frozen_parameters=True,  # the frozen base is rebuilt from its source
            )  # fmt: skip

        return save_atomically(root, self.step, self.rank, write, keep=keep)

    def load_checkpoint(self, directory: str | Path) -> int:
        """Resume from one ``checkpoint-<step>/`` (manifest verified first, weights only); returns the step."""
        from learner.engine import load_deepspeed_state

        with checkpoint_store.local_copy(directory) as local:  # a URI is downloaded to this node first
            checkpoint_files.verify(local)
            path, states = load_deepspeed_state(self.engine, local, checkpoint_files.step_of(local))
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint under {directory}")
        saved = (states or {}).get(_CLIENT_KEY, {}).get("step")
        assert saved == self.step, (saved, self.step)
        return self.step

    def export(self, directory: str | Path, dtype: str = "float32") -> str:
        """Rank 0 writes the merged model (``unet/``, ``vae/``, in ``dtype``) and, in LoRA mode, the adapters."""
        if self.rank == 0:
            self.model.export(directory, dtype=_EXPORT_DTYPES[dtype])
        return str(directory)


_EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # PretrainRunConfig.export_dtype


def lr_factor(step: int, decay_steps: int) -> float:
    """1 (constant), or the cosine schedule ``0.5 (1 + cos(pi step / decay_steps))``, 0 past its end."""
    if not decay_steps:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, decay_steps) / decay_steps))


def _step_seed(seed: int, step: int, rank: int) -> int:
    words = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])

"""Configs of the learner: the optimisation (one rank) and the pool of ranks (Ray resources).

SPEC section 5 fixes the optimiser: AdamW (betas 0.9/0.999, weight decay 1e-2,
eps 1e-8), lr 5e-5 constant, gradient clipping at 1.0, fp16 mixed precision on
8 GPUs.  The defaults here are those values, except ``zero_stage`` and
``precision``, which default to what runs on a CPU-only machine (the paper
config sets ``zero_stage: 2`` and ``precision: fp16``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from common.ray_session import validate_custom_resources
from learner.gdpo_loss import GDPOLossConfig
from learner.nft_loss import NFTLossConfig
from learner.reward_feedback import RewardFeedbackConfig

Precision = Literal["fp32", "fp16", "bf16"]
# gdpo: SPEC section 5; dpo: Diffusion-DPO (best/worst of each group, beta = loss.omega); nft: OARS's
# negative-aware loss; reward_feedback: RFSR (SPEC section 10).
Objective = Literal["gdpo", "dpo", "nft", "reward_feedback"]


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    """How one learner rank optimises the ``gdpo`` adapter, and with which objective."""

    lr: float = 5e-5  # constant, no schedule (SPEC section 5)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm; 0 turns clipping off
    zero_stage: int = 0  # 0 on the tiny model; 2 on the paper's 8 GPUs
    precision: Precision = "fp32"
    micro_batch_groups: int = 1  # groups per rank per forward; bounds activation memory
    push_every: int = 1  # steps between adapter pushes to the rollout workers
    checkpoint_every: int = 100  # steps between checkpoints; 0 = only when asked
    seed: int = 0  # with a group's seed and the step, fixes the loss noise e_i
    objective: Objective = "gdpo"
    loss: GDPOLossConfig = field(default_factory=GDPOLossConfig)  # gdpo and dpo
    nft: NFTLossConfig = field(default_factory=NFTLossConfig)
    reward_feedback: RewardFeedbackConfig = field(default_factory=RewardFeedbackConfig)

    def __post_init__(self) -> None:
        _positive(lr=self.lr, eps=self.eps, micro_batch_groups=self.micro_batch_groups, push_every=self.push_every)
        _non_negative(
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
        )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.objective not in ("gdpo", "dpo", "nft", "reward_feedback"):
            raise ValueError(f"objective must be gdpo, dpo, nft or reward_feedback, got {self.objective!r}")
        rf = self.reward_feedback
        if self.objective == "reward_feedback" and rf.features == "vgg16" and not rf.vgg_weights_path:
            raise ValueError(
                "objective=reward_feedback with features=vgg16 needs reward_feedback.vgg_weights_path "
                "(torchvision's VGG16 ImageNet weights, never downloaded), or features=tiny_conv"
            )


@dataclass(frozen=True, kw_only=True)
class LearnerPoolConfig:
    """How many learner ranks Ray starts, and what each one reserves."""

    num_ranks: int = 1  # data-parallel world size
    num_cpus: float = 1.0  # per rank
    num_gpus: float = 0.0  # per rank; 0 = CPU ranks (gloo), else NCCL
    # Custom Ray resources per rank, e.g. {gdpo_learner: 1}: keeps ranks on the node group that declares it.
    resources: dict[str, float] = field(default_factory=dict)
    start_timeout_s: float = 600.0  # longest wait for the ranks' placement group, then for the group to form

    def __post_init__(self) -> None:
        validate_custom_resources(self.resources)
        _positive(num_ranks=self.num_ranks, num_cpus=self.num_cpus, start_timeout_s=self.start_timeout_s)
        _non_negative(num_gpus=self.num_gpus)
        if 0 < self.num_gpus < 1:
            raise ValueError(f"num_gpus must be 0 or at least 1 (a rank owns whole GPUs), got {self.num_gpus}")


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for ``config``.

    ``gradient_accumulation_steps`` is 1 because the number of micro-batches
    per step follows the batch that arrives; :meth:`LearnerRank.train_step`
    marks the accumulation boundary itself and scales the losses.
    """
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_groups,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        # memory_efficient_linear (ZeRO-3) would replace torch.nn.functional.linear for the whole
        # process and never restore it, changing every other model's arithmetic there.
        "zero_optimization": {"stage": config.zero_stage, "memory_efficient_linear": False},
        # A torch AdamW runs everywhere without building DeepSpeed's FusedAdam op;
        # ZeRO refuses it unless told it is allowed.
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if config.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0 = dynamic loss scale
    elif config.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds

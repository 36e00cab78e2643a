"""LearnerConfig / LearnerPoolConfig: SPEC defaults, validation, loading from a mapping."""

from __future__ import annotations

import pytest

from common.config import from_mapping
from learner.config import LearnerConfig, LearnerPoolConfig


def test_defaults_are_the_papers_optimiser():
    config = LearnerConfig()
    assert (config.lr, config.betas, config.weight_decay, config.eps, config.grad_clip) == (
        5e-5, (0.9, 0.999), 1e-2, 1e-8, 1.0,
    )  # fmt: skip
    assert config.loss.omega == 5000.0 and (config.loss.t_noise, config.loss.t_model) == (250, 100)
    assert config.loss.noise == "per_sample"  # SPEC section 5: a fresh e_i for every group member


def test_from_mapping_builds_the_nested_loss_config():
    config = from_mapping(
        LearnerConfig,
        {"lr": "1e-5", "betas": [0.8, 0.99], "zero_stage": 2, "precision": "fp16", "loss": {"omega": 100}},
    )
    assert config.lr == 1e-5 and config.betas == (0.8, 0.99) and config.loss.omega == 100.0
    with pytest.raises(ValueError, match=r"learner\.loss: omega must be positive"):
        from_mapping(LearnerConfig, {"loss": {"omega": 0}}, where="learner")
    with pytest.raises(ValueError, match="precision"):
        from_mapping(LearnerConfig, {"precision": "fp8"})
    assert from_mapping(LearnerConfig, {"loss": {"noise": "per_group"}}).loss.noise == "per_group"
    with pytest.raises(ValueError, match="noise"):
        from_mapping(LearnerConfig, {"loss": {"noise": "per_batch"}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be positive"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"grad_clip": -0.1}, "grad_clip"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"micro_batch_groups": 0}, "micro_batch_groups"),
        ({"push_every": 0}, "push_every"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_learner_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnerConfig(**kwargs)


def test_pool_config_validation():
    assert LearnerPoolConfig(num_ranks=2, num_cpus=1, num_gpus=1).num_gpus == 1
    with pytest.raises(ValueError, match="num_ranks"):
        LearnerPoolConfig(num_ranks=0)
    with pytest.raises(ValueError, match="num_gpus"):
        LearnerPoolConfig(num_gpus=0.5)

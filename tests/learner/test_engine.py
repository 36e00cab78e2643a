"""One LearnerRank (world size 1, gloo on CPU): a step, the full-batch equivalence, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.naosd import ModelConfig, lora_parameters
from common.records import decode_rewards, decode_rollout
from common.weights import adapter_state_dict, build_policy_unet
from learner.config import LearnerConfig, deepspeed_config
from learner.engine import LearnerRank, loss_noise
from learner.gdpo_loss import gdpo_loss

_TORCH_LINEAR = torch.nn.functional.linear  # captured before any DeepSpeed engine exists


def _rank(port: int, **learner: object) -> LearnerRank:
    return LearnerRank(ModelConfig(), LearnerConfig(**learner), 0, 1, "127.0.0.1", port)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _plain_torch_step(batch, config: LearnerConfig) -> tuple[dict[str, torch.Tensor], float]:
    """The full-batch step written without DeepSpeed: one forward on all groups, clip, AdamW."""
    torch.manual_seed(config.seed)
    unet, abar = build_policy_unet(ModelConfig())
    params = list(lora_parameters(unet).values())
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    groups, rewards = decode_rollout(batch), decode_rewards(batch)
    latents = torch.tensor(groups.latents)
    out = gdpo_loss(
        unet,
        latents=latents,
        noise=loss_noise(config.seed, groups.seed, 0, tuple(latents.shape[1:])),
        text_emb=torch.tensor(groups.text_emb),
        advantages=torch.tensor(rewards.advantage),
        alphas_cumprod=abar,
        config=config.loss,
    )
    out.loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    opt.step()
    return adapter_state_dict(unet), norm


def test_a_step_changes_the_adapter(free_port, scored_batch):
    rank = _rank(free_port)
    before = rank.adapter_weights()
    assert before.version == rank.step == 0
    stats = rank.train_step(scored_batch(n=4, g=3))
    after = rank.adapter_weights()
    assert stats["step"] == rank.step == after.version == 1
    assert stats["step_applied"] == 1.0 and stats["num_groups"] == 4
    # LoRA B = 0 at init: the policy is the reference, so inside = 0 and the loss is log 2.
    assert math.isfinite(stats["loss"]) and stats["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert stats["policy_mse"] == stats["reference_mse"] and stats["inside_mean"] == 0.0
    assert stats["grad_norm"] > 0
    assert after.digest != before.digest
    assert any(float(t.abs().max()) > 0 for name, t in after.tensors.items() if "lora_B" in name)


def test_one_micro_batch_is_the_plain_torch_step(free_port, scored_batch):
    batch, config = scored_batch(n=4, g=3, seed=3), LearnerConfig()
    expected, expected_norm = _plain_torch_step(batch, config)
    whole = _rank(free_port, micro_batch_groups=4)  # one micro-batch: the same arithmetic as plain torch
    stats = whole.train_step(batch)
    assert stats["grad_norm"] == pytest.approx(expected_norm, rel=1e-6)
    assert _max_abs_diff(whole.adapter_weights().tensors, expected) < 1e-9


# ZeRO-3 once kept only the last micro-batch's gradient (module called around engine.forward).
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_micro_batches_give_the_full_batch_step(free_port, scored_batch, zero_stage):
    batch, config = scored_batch(n=4, g=3, seed=3), LearnerConfig()
    expected, expected_norm = _plain_torch_step(batch, config)
    # Four micro-batches: the gradient sums in another order. Adam divides each coordinate by its
    # own |grad|, so coordinates whose clipped gradient is ~eps (1e-8) turn that rounding into
    # update differences of a few percent of lr; a lost micro-batch would show up as ~lr.
    split = _rank(free_port, micro_batch_groups=1, zero_stage=zero_stage)
    stats = split.train_step(batch)
    assert stats["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert _max_abs_diff(split.adapter_weights().tensors, expected) < 0.1 * config.lr
    # ZeRO-3's memory-efficient linear would have swapped F.linear for the whole process (other tests too).
    assert torch.nn.functional.linear is _TORCH_LINEAR


# ZeRO-2 pickles DeepSpeed records into its optimizer shard: the weights_only allow-list must cover them.
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_checkpoint_resume_is_exact(free_port, tmp_path, scored_batch, zero_stage):
    first, second = scored_batch(seed=1), scored_batch(seed=2)
    client = {"data_position": 17, "rng": np.random.default_rng(5).bit_generator.state}

    run = _rank(free_port, zero_stage=zero_stage)
    run.train_step(first)
    checkpoint = run.save_checkpoint(tmp_path, client)
    assert checkpoint == str(tmp_path / "checkpoint-1")
    saved = run.adapter_weights()
    run.train_step(second)
    uninterrupted = run.adapter_weights()

    resumed = _rank(free_port, zero_stage=zero_stage)
    assert resumed.step == 0 and resumed.adapter_weights().digest != saved.digest
    assert resumed.load_checkpoint(checkpoint) == client
    assert resumed.step == 1 and resumed.adapter_weights().digest == saved.digest
    resumed.train_step(second)
    after = resumed.adapter_weights()
    assert resumed.step == run.step == 2
    # Bit-identical: Adam's moments and step count came back, and the loss noise depends on the step.
    assert after.digest == uninterrupted.digest
    assert all(torch.equal(after.tensors[k], uninterrupted.tensors[k]) for k in after.tensors)


def test_load_checkpoint_rejects_a_non_checkpoint(free_port, tmp_path):
    with pytest.raises(ValueError, match="no MANIFEST"):
        _rank(free_port).load_checkpoint(tmp_path)


def test_loss_noise_depends_only_on_seeds_and_step():
    seeds = np.array([5, -7, 2**62], dtype=np.int64)
    noise = loss_noise(0, seeds, step=3, shape=(3, 4, 2, 2))  # [n, G, C, h, w]
    assert noise.shape == (3, 3, 4, 2, 2)
    # The same group gets the same noise alone or in any batch (any rank, any micro-batch).
    assert torch.equal(loss_noise(0, seeds[1:2], step=3, shape=(3, 4, 2, 2))[0], noise[1])
    assert not torch.equal(loss_noise(0, seeds, step=4, shape=(3, 4, 2, 2)), noise)
    assert not torch.equal(loss_noise(1, seeds, step=3, shape=(3, 4, 2, 2)), noise)


def test_deepspeed_config_follows_the_learner_config():
    ds = deepspeed_config(LearnerConfig(zero_stage=2, precision="fp16", micro_batch_groups=2, grad_clip=1.0))
    assert ds["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False}
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["fp16"]["enabled"] and "bf16" not in ds
    assert "optimizer" not in ds  # the torch AdamW object is passed in: no FusedAdam build
    assert deepspeed_config(LearnerConfig(precision="bf16"))["bf16"] == {"enabled": True}

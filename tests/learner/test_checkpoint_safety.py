"""A LearnerRank's checkpoints are never code, and a non-finite step never reaches the adapter."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from common import checkpoint_files
from common.naosd import ModelConfig, lora_parameters
from common.records import decode_rewards
from learner.config import LearnerConfig
from learner.engine import LearnerRank, _nan_unless_finite

MODEL_STATES = "deepspeed/step00000001/mp_rank_00_model_states.pt"


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the classic code-in-a-checkpoint attack."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _rank(port: int, **learner: object) -> LearnerRank:
    return LearnerRank(ModelConfig(), LearnerConfig(**learner), 0, 1, "127.0.0.1", port)


def _with_advantages(batch: pa.RecordBatch, value: float) -> pa.RecordBatch:
    advantage = decode_rewards(batch).advantage.copy()
    advantage[0, 0] = value
    index = batch.schema.get_field_index("advantage")
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(advantage)
    return batch.set_column(index, batch.schema.field(index), column)


def test_a_planted_pickle_is_refused_and_never_runs(free_port, tmp_path, scored_batch):
    run = _rank(free_port)
    run.train_step(scored_batch(seed=1))
    checkpoint = Path(run.save_checkpoint(tmp_path / "run", {"step": 1}))
    marker = tmp_path / "payload-ran"
    torch.save({"module": _Payload(marker)}, checkpoint / MODEL_STATES)  # swapped after the commit

    fresh = _rank(free_port)
    with pytest.raises(checkpoint_files.CheckpointError, match=r"mp_rank_00_model_states\.pt"):
        fresh.load_checkpoint(checkpoint)  # layer 1: the manifest no longer matches
    assert not marker.exists()

    # Layer 2: an attacker who also rewrites the manifest still gets no code run (weights_only=True).
    resealed = checkpoint.with_name(checkpoint.name + ".tmp")
    checkpoint.rename(resealed)
    checkpoint_files.commit(resealed)
    checkpoint_files.verify(checkpoint)
    with pytest.raises(checkpoint_files.CheckpointError, match="refused to unpickle"):
        fresh.load_checkpoint(checkpoint)
    assert not marker.exists()

    # The payload is live: DeepSpeed's own loader (weights_only=False) would have run it.
    copy = tmp_path / "copy.pt"
    shutil.copy(checkpoint / MODEL_STATES, copy)
    torch.load(copy, weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nan_step_is_skipped_and_counted_and_the_next_step_applies(free_port, tmp_path, scored_batch, zero_stage):
    rank = _rank(free_port, zero_stage=zero_stage)
    before = rank.adapter_weights()
    stats = rank.train_step(_with_advantages(scored_batch(seed=1), float("nan")))
    assert stats["nonfinite"] == 1.0 and stats["step_applied"] == 0.0 and not np.isfinite(stats["loss"])
    after = rank.adapter_weights()
    assert after.digest == before.digest  # not one bit of the adapter moved
    assert rank.step == 1 and rank.engine.skipped_steps == 1  # the batch is consumed: the step counts
    assert all(p.grad is None or not p.grad.abs().sum() for p in lora_parameters(rank.unet).values())
    if zero_stage == 0:
        assert not rank.engine.optimizer.state  # Adam's moments never saw the NaN gradient

    good = rank.train_step(scored_batch(seed=2))
    assert good["nonfinite"] == 0.0 and good["step_applied"] == 1.0 and np.isfinite(good["grad_norm"])
    weights = rank.adapter_weights()
    assert weights.digest != before.digest and all(torch.isfinite(t).all() for t in weights.tensors.values())
    rank.save_checkpoint(tmp_path, {"step": 2})  # finite: written


def test_an_infinite_loss_with_a_finite_gradient_is_made_nan():
    w = torch.tensor(2.0, requires_grad=True)
    (w + float("inf")).backward()
    assert w.grad == 1.0  # finite: a gradient check alone would let this step through
    w.grad = None
    _nan_unless_finite(w + float("inf")).backward()
    assert torch.isnan(w.grad)
    finite = w * 3
    assert _nan_unless_finite(finite) is finite


def test_a_non_finite_adapter_is_never_written(free_port, tmp_path):
    rank = _rank(free_port)
    with torch.no_grad():
        next(iter(lora_parameters(rank.unet).values())).view(-1)[0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite adapter"):
        rank.save_checkpoint(tmp_path, {"step": 0})
    assert checkpoint_files.committed(tmp_path) == []

"""Every objective and reward kind of SPEC section 10, from its shipped tiny config, through the Ray loop.

Each run is the real driver (rollout, reward and learner actors) for 2 steps on the tiny trained model;
the checks are that it trains (the adapter's LoRA B leaves its zero init) on rewards of the chosen kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from rollout.driver import train
from rollout.job import load_job

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]  # end-to-end Ray runs, 30-60 s each


def _trained_lora_b(out: Path) -> float:
    """The largest |LoRA B| in the run's saved adapter (its checkpoint)."""
    states = [load_file(str(f)) for f in sorted(out.rglob("*.safetensors"))]
    values = [float(v.abs().max()) for state in states for k, v in state.items() if "lora_B" in k]
    assert values, f"no adapter saved under {out}"
    return max(values)


@pytest.mark.parametrize(
    ("config", "objective", "kind"),
    [("tiny_dpo", "dpo", "arf"), ("tiny_oars", "nft", "process_aware"), ("tiny_rfsr", "reward_feedback", "arf")],
)
def test_method_config_trains_end_to_end(tmp_path, config, objective, kind):
    job = load_job(config, [f"run.output_dir={tmp_path}", "run.steps=2", "learner.lr=1e-3"])
    assert (job.learner.objective, job.reward.kind) == (objective, kind)
    summary = train(job)
    assert summary["step"] == 2.0 and np.isfinite(summary["loss"]) and np.isfinite(summary["reward_mean"])
    assert _trained_lora_b(tmp_path) > 0, "the adapter did not move"


@pytest.mark.parametrize("weighting", ["fr_only", "nr_only", "fixed"])
def test_arf_ablations_run_end_to_end(tmp_path, weighting):
    job = load_job("tiny", [f"run.output_dir={tmp_path}", "run.steps=1", f"reward.weighting={weighting}",
                            "learner.lr=1e-3", "run.sample_grid=false"])  # fmt: skip
    summary = train(job)
    assert summary["step"] == 1.0 and np.isfinite(summary["loss"])
    assert _trained_lora_b(tmp_path) > 0

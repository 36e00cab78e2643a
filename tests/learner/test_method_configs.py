"""The shipped configs of the sibling methods (SPEC section 10) hold what their papers state."""

from __future__ import annotations

import pytest

from reward_service.config import RewardConfig
from reward_service.metrics_iqa import build_pyiqa_metric
from rollout.job import load_job


def test_dpo_config_is_the_paper_setting_with_the_dpo_objective():
    dpo, paper = load_job("dpo"), load_job("paper")
    assert dpo.learner.objective == "dpo" and dpo.learner.loss.omega == 5000.0  # beta = omega
    assert (dpo.rollout, dpo.reward, dpo.model) == (paper.rollout, paper.reward, paper.model)


def test_oars_config_holds_the_process_aware_reward_filter_and_nft():
    job = load_job("oars")
    r = job.reward
    assert (r.kind, r.fr_metrics, r.nr_metrics, r.gamma, r.quality_scale) == (
        "process_aware", ("dists",), ("musiq",), 7.0, (1.0, 5.0))  # fmt: skip
    assert (r.filter_groups, r.filter_mean, r.filter_std, job.rollout.group_size) == (True, 0.9, 0.05, 24)
    assert (job.learner.objective, job.learner.nft.adv_max) == ("nft", 2.0)


def test_rfsr_config_expects_local_vgg_and_metric_weights():
    rf = load_job("rfsr").learner
    assert rf.objective == "reward_feedback"
    assert (rf.reward_feedback.metric, rf.reward_feedback.features) == ("musiq", "vgg16")
    assert rf.reward_feedback.vgg_weights_path.endswith("vgg16-397923af.pth")
    with pytest.raises(ValueError, match="vgg_weights_path"):
        load_job("rfsr", ["learner.reward_feedback.vgg_weights_path="])


def test_dists_weights_are_never_downloaded(tmp_path):
    with pytest.raises(ValueError, match="DISTS_weights"):
        build_pyiqa_metric("dists", RewardConfig(kind="process_aware", fr_metrics=("dists",), nr_metrics=("piqe",),
                                                 weights_dir=str(tmp_path)))  # fmt: skip

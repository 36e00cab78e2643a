"""The held-out validator (in-process) and the reward-hacking guard provoked end to end through the driver."""

from __future__ import annotations

import csv
import functools
import sys
from pathlib import Path

import pytest
import ray
import torch
from ray import cloudpickle

from common.adapter_sync import pack
from common.naosd import ModelConfig
from common.telemetry import MetricsConfig, Telemetry
from common.weights import adapter_state_dict, build_naosd
from reward_service.config import RewardConfig
from reward_service.metrics import snapshot
from reward_service.metrics_iqa import MetricFn
from reward_service.worker import RewardWorker
from rollout import driver
from rollout.alarm import RewardHackingStop
from rollout.job import load_job
from rollout.validation import CSV_NAME, HeldoutValidator, ValidationConfig, ValidationRunner

# The actors unpickle the artefact reward below: ship this module's functions by value (workers cannot import it).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def high_frequency_energy(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """A reward that pays for an artefact: mean |Laplacian| of the grey image, i.e. noise and ringing."""
    grey = sr.mean(1, keepdim=True)
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=grey.dtype).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, kernel).abs().mean((1, 2, 3))


HF_METRIC = MetricFn(name="hf", fn=high_frequency_energy, score_range=(0.0, 0.5))  # no-reference, higher better
HF_REWARD = ("reward.fr_metrics=[]", "reward.nr_metrics=[hf]", "reward.weighting=nr_only")


@pytest.fixture(scope="module")
def validator() -> HeldoutValidator:
    return HeldoutValidator(ModelConfig(), RewardConfig.offline(), ValidationConfig(crops=2, samples=2))


def test_same_policy_same_numbers_and_every_metric_recorded(validator):
    first, second = validator.validate(0), validator.validate(0)
    assert first.metrics == second.metrics  # fixed crops, fixed noise: a validation is a pure function of the policy
    assert set(first.metrics) == {"reward", "reward.psnr_y", "reward.piqe", "reward.entropy", "psnr_y", "ssim_y",
                                  "sharpness"}  # fmt: skip
    # the reward's PSNR-Y (pyiqa through the reward's callable) and the outside one agree on the same images
    assert first.metrics["reward.psnr_y"] == pytest.approx(first.metrics["psnr_y"], abs=1e-4)
    assert validator.ready() == {"reward": True, "reward.psnr_y": True, "reward.piqe": False,
                                 "reward.entropy": True, "psnr_y": True, "ssim_y": True}  # fmt: skip


def test_it_validates_the_pushed_adapter_and_never_rolls_back(validator):
    before = validator.validate(0).metrics
    names = adapter_state_dict(validator.model.unet)
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in names.items()}
    assert validator.set_adapter(pack(2, perturbed)) == 2
    after = validator.validate(2)
    assert after.version == 2 and after.metrics["ssim_y"] < before["ssim_y"]  # a random LoRA damages the samples
    assert validator.set_adapter(pack(1, {k: torch.zeros_like(v) for k, v in names.items()})) == 2  # stale push
    assert validator.validate(2).metrics == after.metrics
    validator.set_adapter(pack(3, {k: torch.zeros_like(v) for k, v in names.items()}))  # B = 0: the start again
    assert validator.validate(3).metrics == before


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_reward_paying_for_noise_trips_the_alarm_and_stops_the_run(tmp_path, monkeypatch):
    """GDPO on a reward that pays for high-frequency energy: held-out reward up, held-out SSIM down, run stopped.

    lr 5e-2 and omega 20 (far above the tiny config's) make the policy move within 2 steps; validations at
    steps 0, 1 and 2 fill the window of 3.  (At this lr the policy overshoots later: on an earlier tiny model
    the held-out reward.hf was back below its start by step 4.)
    """
    job = load_job("tiny", [
        f"run.output_dir={tmp_path}", "run.steps=2", "run.validate_every=1", *HF_REWARD,
        "learner.lr=5e-2", "learner.loss.omega=20", "rollout.sample_from=policy",
        "validation.crops=4", "validation.alarm={window: 3, margins: {ssim_y: 0.01}, action: stop}",
    ])  # fmt: skip
    monkeypatch.setattr(driver, "RewardPool", functools.partial(
        driver.RewardPool, worker_factory=functools.partial(RewardWorker, metrics=[HF_METRIC])))  # fmt: skip
    monkeypatch.setattr(driver, "ValidationRunner", functools.partial(ValidationRunner, metrics=[HF_METRIC]))
    telemetries: list[Telemetry] = []  # the driver's, read after the run
    monkeypatch.setattr(driver, "Telemetry", lambda: telemetries.append(Telemetry()) or telemetries[-1])
    with pytest.raises(RewardHackingStop, match="held-out ssim_y fell"):
        driver.train(job)
    with (tmp_path / CSV_NAME).open() as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["version"] for r in rows] == [0, 1, 2]
    assert rows[-1]["reward.hf"] > rows[0]["reward.hf"]  # the paid-for artefact went up ...
    assert rows[-1]["ssim_y"] < rows[0]["ssim_y"] - 0.01  # ... and the held-out fidelity went down
    assert rows[-1]["psnr_y"] < rows[0]["psnr_y"]
    values = snapshot(telemetries[0].registry)
    assert values['gdpo_reward_hacking_alarms_total{metric="ssim_y"}'] == 1.0
    assert values['gdpo_validation_metric{metric="reward.hf"}'] == pytest.approx(rows[-1]["reward.hf"])
    assert values["gdpo_validation_step"] == 2.0


def test_runner_records_csv_metrics_and_tensorboard(tmp_path):
    """The driver-side records without Ray: CSV rows appended, gauges set, TensorBoard scalars written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rollout.validation import ValidationRecord, ValidationTelemetry, write_csv_row

    telemetry = Telemetry()
    telemetry.serve(MetricsConfig(enabled=False), tensorboard_dir=tmp_path / "tb")
    series = ValidationTelemetry(telemetry)
    for step, ssim in ((0, 0.75), (2, 0.5)):
        record = ValidationRecord(step=step, version=step, seconds=0.5, metrics={"reward": 0.25, "ssim_y": ssim})
        write_csv_row(tmp_path / CSV_NAME, {"step": record.step, "version": record.version, **record.metrics})
        series.record(record.step, record.metrics, record.seconds)
    series.alarm("ssim_y")
    telemetry.close()
    assert (tmp_path / CSV_NAME).read_text().splitlines() == [
        "step,version,reward,ssim_y",
        "0,0,0.25,0.75",
        "2,2,0.25,0.5",
    ]
    values = snapshot(telemetry.registry)
    assert values['gdpo_validation_metric{metric="ssim_y"}'] == 0.5
    assert values['gdpo_reward_hacking_alarms_total{metric="ssim_y"}'] == 1.0
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("validation/ssim_y")] == [(0, 0.75), (2, 0.5)]


def test_tiny_config_validates_and_the_cli_reserves_the_actor():
    from rollout.cli import pool_requests

    job = load_job("tiny")
    assert job.run.validate_every == 2 and job.validation.alarm.action == "warn"
    names = [p.name for p in pool_requests(job.cluster, job.validation)]
    assert names == ["rollout", "reward", "learner", "validation"]
    with pytest.raises(ValueError, match=r"validation\.alarm: window must be >= 2"):
        load_job("tiny", ["validation.alarm.window=1"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_job("tiny", ["validation.bogus=1"])
    assert Path(ValidationConfig().folder) == Path()  # "" = the embedded held-out photos


@pytest.mark.usefixtures("ray_session")
def test_a_dead_validation_actor_is_replaced_until_max_restarts_and_a_resume_restores_the_history(tmp_path, capsys):
    config, telemetry = ValidationConfig(crops=1, samples=2, max_restarts=1), Telemetry()
    runner = ValidationRunner(config, ModelConfig(), RewardConfig.offline(), every=1, out=tmp_path,
                              telemetry=telemetry)  # fmt: skip
    zeros = pack(0, {k: torch.zeros_like(v) for k, v in adapter_state_dict(build_naosd(ModelConfig()).unet).items()})
    try:
        runner.after_step(0, lambda: zeros)
        runner.finish()
        ray.kill(runner.actor, no_restart=True)  # as a lost node or an OOM kill takes it
        runner.after_step(1, lambda: zeros)
        runner.finish()  # step 1 is skipped, the run goes on with a new actor
        assert "validation actor died" in capsys.readouterr().out and runner.restarts == 1
        runner.after_step(2, lambda: zeros)
        runner.finish()
        (_, first), (step, again) = runner.guard.reward
        assert step == 2 and again == first  # the new actor validates as the old one did: same policy, same noise
        assert snapshot(telemetry.registry)["gdpo_validation_restarts_total"] == 1.0
        saved = (tmp_path / CSV_NAME).read_bytes()
        # A resume at step 2 (the run stopped after validating it): the history before it, the CSV cut there.
        (tmp_path / CSV_NAME).unlink()  # another node: only the copy in run storage is left
        assert runner.restore(2, lambda: saved) == 1
        assert [s for s, _ in runner.guard.reward] == [0] and [s for s, _ in runner.guard.heldout["ssim_y"]] == [0]
        assert (tmp_path / CSV_NAME).read_bytes().splitlines() == saved.splitlines()[:2]  # header and step 0
        ray.kill(runner.actor, no_restart=True)
        with pytest.raises(RuntimeError, match=r"died 2 times \(validation.max_restarts=1\)"):
            runner.after_step(3, lambda: zeros)  # the death may show at once, or when the run waits for it
            runner.finish()
    finally:
        runner.shutdown()

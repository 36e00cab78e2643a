"""The run's metrics and experiment log: counters Prometheus can rate, renamed series, TensorBoard, final scrape."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.telemetry import MetricsConfig, StepRecord, Telemetry

SCALARS = {"loss": 0.5, "reward_mean": 0.25, "reward_std": 0.125, "advantage_abs_mean": 0.75,
           "grad_norm": 2.0, "learner_wait_fraction": 0.375, "samples_per_second": 3.0}  # fmt: skip


def _record(step: int, **changes) -> StepRecord:
    fields = dict(step=step, groups=2, samples=12, zero_variance_groups=1, step_seconds=0.2, wait_seconds=0.1,
                  scalars=SCALARS, reward_metrics={"psnr_y": 24.5, "musiq": 61.0})  # fmt: skip
    return StepRecord(**{**fields, **changes})


def test_step_records_become_counters_and_gauges():
    t = Telemetry()
    t.record_step(_record(1))
    t.record_step(_record(2, zero_variance_groups=0))
    value = t.registry.get_sample_value
    assert value("gdpo_samples_total") == 24.0 and value("gdpo_groups_consumed_total") == 4.0
    assert value("gdpo_groups_zero_variance_total") == 1.0
    assert value("gdpo_learner_step") == 2.0 and value("gdpo_grad_norm") == 2.0
    assert value("gdpo_learner_wait_ratio") == 0.375
    assert value("gdpo_reward_metric", {"metric": "psnr_y"}) == 24.5
    assert value("gdpo_reward_metric", {"metric": "musiq"}) == 61.0
    names = {m.name for m in t.registry.collect()}
    assert not names & {"gdpo_samples_per_second", "gdpo_learner_wait_fraction", "gdpo_worker_restarts"}


def test_resume_restores_the_step_gauge():
    t = Telemetry()
    t.resumed(40)
    assert t.registry.get_sample_value("gdpo_learner_step") == 40.0


def test_the_last_steps_gauges_survive_a_resume():
    before = Telemetry()
    before.record_step(_record(2))
    saved = before.last_gauges()  # what the driver puts into the checkpoint
    assert all(isinstance(v, float) for v in saved.values())
    after = Telemetry()
    after.resumed(2, saved)
    for name, labels in [("gdpo_grad_norm", None), ("gdpo_learner_wait_ratio", None), ("gdpo_loss", None),
                         ("gdpo_reward_metric", {"metric": "psnr_y"}), ("gdpo_reward_metric", {"metric": "musiq"})]:
        want = before.registry.get_sample_value(name, labels)
        assert want is not None and after.registry.get_sample_value(name, labels) == want, name
    assert after.last_gauges() == saved  # a checkpoint written before the next step keeps them


def test_tensorboard_scalars_in_the_run_folder(tmp_path):
    t = Telemetry()
    t.serve(MetricsConfig(enabled=False), tensorboard_dir=tmp_path / "tensorboard")
    t.record_step(_record(1))
    t.record_step(_record(2, scalars={**SCALARS, "loss": 0.25, "staleness_max": 1.0}))
    t.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "reward/mean", "reward/psnr_y", "reward/musiq", "advantage/abs_mean",
            "throughput/samples_per_second", "staleness/max_versions"} <= tags  # fmt: skip
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.value for e in events.Scalars("reward/psnr_y")] == [24.5, 24.5]


def test_tensorboard_switch_off_writes_nothing(tmp_path):
    t = Telemetry()
    t.serve(MetricsConfig(enabled=False, tensorboard=False), tensorboard_dir=tmp_path / "tensorboard")
    t.record_step(_record(1))
    t.close()
    assert not (tmp_path / "tensorboard").exists()


def test_endpoint_stays_up_for_the_final_scrape():
    t = Telemetry()
    port = t.serve(MetricsConfig(port=0, final_scrape_s=1.5))
    t.record_step(_record(7))
    closer = threading.Thread(target=t.close)
    start = time.monotonic()
    closer.start()
    time.sleep(0.5)  # the run is over and close() has begun: a last scrape still sees the last step
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "gdpo_learner_step 7.0" in text
    closer.join()
    assert time.monotonic() - start >= 1.5
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_bad_metrics_config_is_refused():
    with pytest.raises(ValueError, match="final_scrape_s"):
        MetricsConfig(final_scrape_s=-1)

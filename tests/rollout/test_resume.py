"""Resume safety without Ray: guarded config keys, the old config kept, stop signals, the non-finite limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import checkpoint_files
from common.telemetry import Telemetry
from rollout.job import load_job
from rollout.resume import CONFIG_FILE, config_changes, prepare_run_folder
from rollout.step_report import check_finite
from rollout.stop import StopSignals


def _job(out, *overrides):
    return load_job("tiny", [f"run.output_dir={out}", "run.resume=true", *overrides])


def _fake_checkpoint(out) -> None:
    staging = checkpoint_files.staging_dir(out / "checkpoints", 2)
    (staging / "state.json").write_text("{}")
    checkpoint_files.commit(staging)


def test_config_changes_lists_guarded_leaves_only():
    saved = {"model": {"t_add": 250, "lora_rank": 4}, "rollout": {"seed": 0, "group_size": 4}, "run": {"steps": 4}}
    new = {"model": {"t_add": 300, "lora_rank": 4}, "rollout": {"seed": 1, "group_size": 8}, "run": {"steps": 9}}
    assert config_changes(saved, new) == ["model.t_add: 250 -> 300", "rollout.seed: 0 -> 1"]
    assert config_changes({"model": {}}, {"learner": {"objective": "dpo"}}) == []  # a key one file lacks


@pytest.mark.parametrize("change", ["data.crop_size=32", "rollout.seed=5", "learner.objective=dpo", "model.t_add=300"])
def test_a_resume_that_changes_what_the_checkpoint_was_made_with_is_refused(tmp_path, change):
    prepare_run_folder(_job(tmp_path))
    _fake_checkpoint(tmp_path)
    key = change.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}: .* -> .*run\.resume_force=true"):
        prepare_run_folder(_job(tmp_path, change))
    assert [p.name for p in tmp_path.glob("config*.yaml")] == [CONFIG_FILE]  # nothing touched

    prepare_run_folder(_job(tmp_path, change, "run.resume_force=true"))
    kept = list(tmp_path.glob("config.*.yaml"))
    assert len(kept) == 1  # the old config, beside the new one
    section, leaf = key.split(".")
    old, new = (yaml.safe_load(p.read_text())[section][leaf] for p in (kept[0], tmp_path / CONFIG_FILE))
    assert str(new) == change.split("=")[1] and old != new


def test_the_cli_refuses_a_changed_resume_before_ray_as_a_config_error(tmp_path):
    prepare_run_folder(_job(tmp_path))
    _fake_checkpoint(tmp_path)
    args = ["--config", "tiny", f"run.output_dir={tmp_path}", "run.resume=true", "data.crop_size=32"]
    out = subprocess.run([sys.executable, "-m", "rollout", *args], check=False, capture_output=True, text=True,
                         cwd=Path(__file__).parents[2], timeout=180)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: resuming") and "data.crop_size: 64 -> 32" in last
    assert "Traceback" not in out.stderr and "ray" not in out.stdout.lower()


def test_unguarded_changes_and_fresh_runs_are_accepted(tmp_path):
    prepare_run_folder(_job(tmp_path))
    prepare_run_folder(_job(tmp_path, "rollout.seed=5"))  # no checkpoint yet: nothing to protect
    _fake_checkpoint(tmp_path)
    prepare_run_folder(_job(tmp_path, "rollout.seed=5", "run.steps=40", "learner.lr=1e-4"))
    assert len(list(tmp_path.glob("config.*.yaml"))) == 2


def test_stop_signals_record_the_first_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)  # not always Python's default: Ray or an earlier test may set it
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode: no exit, only a flag
        assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # a second one would act at once
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is before_int


def test_nonfinite_steps_in_a_row_stop_the_run():
    telemetry = Telemetry()
    nan, ok = {"nonfinite": 1.0, "loss": float("nan"), "grad_norm": float("nan")}, {"nonfinite": 0.0}
    assert check_finite(nan, 1, 0, 3, telemetry) == 1
    assert check_finite(nan, 2, 1, 3, telemetry) == 2
    assert check_finite(ok, 3, 2, 3, telemetry) == 0  # a good step resets the run
    assert check_finite(nan, 4, 0, 0, telemetry) == 1  # 0: never stop
    with pytest.raises(RuntimeError, match=r"3 learner steps in a row .*\(run\.max_nonfinite_steps=3\)"):
        check_finite(nan, 5, 2, 3, telemetry)
    assert telemetry.registry.get_sample_value("gdpo_learner_nonfinite_steps_total") == 4

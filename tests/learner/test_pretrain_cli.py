"""The pre-training command line fails before Ray on a wrong path, with one `config error` line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_data_folder_is_a_config_error_before_ray():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-m", "learner.pretrain", "--config", "tiny_pretrain", "data.hr_dir=/no/such/photos"],
        cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == "config error: data.hr_dir=/no/such/photos: no such folder"
    assert "ray:" not in out.stdout and "Traceback" not in out.stderr

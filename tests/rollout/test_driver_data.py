"""The loop meets bad data: files skipped and counted without a worker restart; no usable data fails at once.

A dead rollout actor IS replaced: ``test_driver.test_killed_rollout_actor_is_replaced_and_the_run_completes``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from common.records import decode_rollout
from learner.group import LearnerGroup
from rollout.driver import train
from rollout.job import load_job
from rollout.pool import RolloutPool
from sr_data.scan import NoUsableImages
from tests.sr_data.conftest import photo, save

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]  # end-to-end Ray runs


def _job(tmp_path: Path, hr_dir: Path, *overrides: str):
    return load_job("tiny", [f"run.output_dir={tmp_path / 'out'}", f"data.hr_dir={hr_dir}", "run.validate_every=0",
                             "run.sample_grid=false", *overrides])  # fmt: skip


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header still reads


def _hostile_folder(root: Path) -> Path:
    for name, seed in (("good.png", 1), (os.fsdecode(b"bad\xff.png"), 2), ("also_good.png", 8)):
        save(root / name, photo(96, 96, seed=seed))
    for name, seed in (("cut1.jpg", 3), ("sub/cut2.jpg", 4)):
        save(root / name, photo(96, 96, seed=seed))
        _truncate(root / name)
    rgba = np.dstack([photo(96, 96, seed=6), np.full((96, 96), 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # transparent corner
    save(root / "holes.png", rgba)
    save(root / "dot.png", photo(1, 1, seed=5))
    return root


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record the pool's metrics registry, the image ids collected, worker replacements and learner starts."""
    seen: dict[str, list] = {"registry": [], "ids": [], "replaced": [], "learner": []}
    init, collect, replace, learner_init = (
        RolloutPool.__init__, RolloutPool.collect, RolloutPool.replace, LearnerGroup.__init__,
    )  # fmt: skip

    def init_spy(self, *args, registry=None, **kwargs):
        seen["registry"].append(registry)
        init(self, *args, registry=registry, **kwargs)

    def collect_spy(self, slot, call):
        batch = collect(self, slot, call)
        seen["ids"].extend(decode_rollout(batch).image_id)
        return batch

    def replace_spy(self, slot, weights):
        seen["replaced"].append(slot)
        return replace(self, slot, weights)

    def learner_spy(self, *args, **kwargs):
        seen["learner"].append(1)
        learner_init(self, *args, **kwargs)

    monkeypatch.setattr(RolloutPool, "__init__", init_spy)
    monkeypatch.setattr(RolloutPool, "collect", collect_spy)
    monkeypatch.setattr(RolloutPool, "replace", replace_spy)
    monkeypatch.setattr(LearnerGroup, "__init__", learner_spy)
    return seen


def test_bad_files_are_skipped_counted_and_logged_without_a_restart(tmp_path, monkeypatch, capsys):
    # data.seed=3: index 0 reads a good image (the start-up probe finds only the 1x1), and indices 0-2
    # meet both truncated files and the transparent one while sampling (checked with a local PairSource).
    seen = _spy(monkeypatch)
    result = train(_job(tmp_path, _hostile_folder(tmp_path / "hr"), "data.seed=3", "run.steps=3"))
    assert result["step"] == 3 and result["rollout_restarts"] == 0 and seen["replaced"] == []
    registry = seen["registry"][0]
    counts = {r: registry.get_sample_value("gdpo_data_skipped_total", {"reason": r}) for r in ("too_small",
              "unreadable", "transparent", "unlistable", "duplicate_id")}  # fmt: skip
    assert counts == {"too_small": 1, "unreadable": 2, "transparent": 1, "unlistable": 0, "duplicate_id": 0}
    assert {"good.png", "also_good.png", "bad\\xff.png"} == set(seen["ids"])  # the undecodable name is trained on
    out = capsys.readouterr().out
    assert "data: 7 image file(s) found in" in out and "6 usable, 1 skipped (too_small 1), 0 upscaled" in out
    assert "1 with a name that is not valid UTF-8" in out
    assert "data: skipped dot.png (too_small: 1x1: shorter side below data.min_side=64) [indexing]" in out
    for name, reason in (("cut1.jpg", "unreadable"), ("sub/cut2.jpg", "unreadable"), ("holes.png", "transparent")):
        lines = re.findall(rf"data: skipped {re.escape(name)} \({reason}: .*\[(\w+)\]", out)
        assert lines == ["rollout0"], (name, lines)  # once, found by the worker while sampling


def test_a_folder_of_only_truncated_images_fails_at_once(tmp_path, monkeypatch):
    root = tmp_path / "hr"
    for i in range(3):
        save(root / f"cut{i}.jpg", photo(96, 96, seed=i))
        _truncate(root / f"cut{i}.jpg")
    seen = _spy(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(NoUsableImages, match=r"(?s)no readable image left in .*cut0.jpg: unreadable"):
        train(_job(tmp_path, root))
    print(f"failed after {time.perf_counter() - start:.1f} s")
    assert seen["replaced"] == [] and seen["learner"] == []  # no restart; the learner never started


def test_data_that_goes_bad_mid_run_fails_the_run_without_a_restart(tmp_path, monkeypatch):
    root = tmp_path / "hr"
    for i in range(2):
        save(root / f"img{i}.png", photo(96, 96, seed=i))
    seen = _spy(monkeypatch)
    finish_step = LearnerGroup.finish_step

    def step_then_truncate(self, pending):
        stats = finish_step(self, pending)
        for path in root.iterdir():  # every file damaged after the first step: nothing left to read
            _truncate(path)
        return stats

    monkeypatch.setattr(LearnerGroup, "finish_step", step_then_truncate)
    with pytest.raises(NoUsableImages, match="no readable image left"):
        train(_job(tmp_path, root, "run.steps=6"))
    assert seen["replaced"] == []

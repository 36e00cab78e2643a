"""Checkpoint folders: atomic commit, manifest verification, retention, ``latest``, rejection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import checkpoint_files as cf


def _write(root: Path, step: int, *, keep: int = 0, payload: bytes = b"weights") -> Path:
    staging = cf.staging_dir(root, step)
    (staging / "adapter").mkdir()
    (staging / "adapter" / "model.safetensors").write_bytes(payload + str(step).encode())
    (staging / "state.json").write_text(json.dumps({"step": step}))
    return cf.commit(staging, keep=keep)


def test_commit_renames_into_place_with_a_manifest_and_latest(tmp_path):
    final = _write(tmp_path, 7)
    assert final == tmp_path / "checkpoint-7" and not (tmp_path / "checkpoint-7.tmp").exists()
    manifest = json.loads((final / cf.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["adapter/model.safetensors", "state.json"]
    assert manifest["files"]["state.json"]["bytes"] == len('{"step": 7}')
    assert (tmp_path / cf.LATEST).read_text().strip() == "checkpoint-7"
    cf.verify(final)  # intact


def test_an_uncommitted_staging_folder_is_never_a_candidate(tmp_path):
    _write(tmp_path, 3)
    torn = cf.staging_dir(tmp_path, 6)  # a crash mid-write leaves this behind
    (torn / "state.json").write_text("{}")
    assert cf.committed(tmp_path) == [tmp_path / "checkpoint-3"]


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "state.json").write_text('{"step": 9}'), "changed after"),  # same size, other bytes
        (lambda d: (d / "state.json").write_text("{}"), "bytes"),
        (lambda d: (d / "state.json").unlink(), "missing"),
        (lambda d: (d / "adapter" / "evil.pt").write_bytes(b"x"), "not in the manifest"),
        (lambda d: (d / cf.MANIFEST).unlink(), "no MANIFEST"),
        (lambda d: (d / cf.MANIFEST).write_text("{not json"), "unreadable"),
        (lambda d: (d / "link").symlink_to(d / "state.json"), "symlink"),
    ],
)
def test_verify_refuses_any_change_after_the_commit(tmp_path, damage, match):
    final = _write(tmp_path, 2)
    damage(final)
    with pytest.raises(cf.CheckpointError, match=match):
        cf.verify(final)


def test_retention_keeps_the_newest_by_step(tmp_path):
    for step in (1, 2, 10, 3):
        _write(tmp_path, step, keep=2)
    assert [p.name for p in cf.committed(tmp_path)] == ["checkpoint-10", "checkpoint-3"]
    assert (tmp_path / cf.LATEST).read_text().strip() == "checkpoint-3"  # the one written last


def test_recommitting_a_step_replaces_it(tmp_path):
    _write(tmp_path, 4, payload=b"old")
    final = _write(tmp_path, 4, payload=b"new")
    cf.verify(final)
    assert (final / "adapter" / "model.safetensors").read_bytes() == b"new4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", cf.LATEST]


def test_reject_moves_a_checkpoint_out_of_the_candidates(tmp_path):
    _write(tmp_path, 1)
    bad = _write(tmp_path, 2)
    assert cf.reject(bad) == tmp_path / "checkpoint-2.rejected"
    assert cf.committed(tmp_path) == [tmp_path / "checkpoint-1"]
    assert cf.reject(_write(tmp_path, 2)) == tmp_path / "checkpoint-2.rejected.1"  # earlier evidence kept

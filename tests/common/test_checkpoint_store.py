"""Checkpoints on a run-storage URI: per-rank uploads, the manifest last, retention, refusal, verified download."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import checkpoint_files, checkpoint_store


def _rank_files(root: Path, step: int, rank: int) -> Path:
    """What one rank writes for one checkpoint, on its own disk."""
    staging = root / f"rank{rank}" / f"checkpoint-{step}"
    (staging / "deepspeed").mkdir(parents=True)
    (staging / "deepspeed" / f"zero_rank{rank}.pt").write_bytes(bytes([step, rank]) * 100)
    if rank == 0:
        (staging / "adapter.safetensors").write_bytes(b"adapter" * step)
    return staging


def _save(uri: str, scratch: Path, step: int, *, keep: int = 0, ranks: int = 2) -> str:
    parts = [checkpoint_store.upload(uri, _rank_files(scratch, step, r)) for r in range(ranks)]
    return checkpoint_store.publish(uri, f"checkpoint-{step}", checkpoint_store.merge(parts), keep=keep)


def test_a_checkpoint_is_committed_only_once_its_manifest_is_uploaded(tmp_path):
    uri = f"file://{tmp_path}/store/checkpoints"
    assert checkpoint_store.committed(uri) == []
    checkpoint_store.upload(uri, _rank_files(tmp_path, 1, 0))  # a rank uploaded, nobody published: torn
    assert checkpoint_store.committed(uri) == []
    assert _save(uri, tmp_path, 2) == f"{uri}/checkpoint-2"
    assert checkpoint_store.committed(uri) == [f"{uri}/checkpoint-2"]
    assert (tmp_path / "store" / "checkpoints" / "latest").read_text() == "checkpoint-2\n"
    with checkpoint_store.local_copy(f"{uri}/checkpoint-2") as local:
        checkpoint_files.verify(local)  # both ranks' files, byte for byte
        assert sorted(p.name for p in (local / "deepspeed").iterdir()) == ["zero_rank0.pt", "zero_rank1.pt"]
        assert checkpoint_files.step_of(local) == 2
    assert not local.exists()  # the download is removed afterwards


def test_retention_keeps_the_newest_and_removes_older_folders_torn_ones_too(tmp_path):
    uri = f"file://{tmp_path}/checkpoints"
    checkpoint_store.upload(uri, _rank_files(tmp_path / "torn", 1, 0))
    for step in (2, 3, 4):
        _save(uri, tmp_path / str(step), step, keep=2)
    assert [checkpoint_store.name_of(c) for c in checkpoint_store.committed(uri)] == ["checkpoint-4", "checkpoint-3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4", "latest"]


def test_a_rejected_checkpoint_is_never_listed_again(tmp_path):
    uri = f"file://{tmp_path}/checkpoints"
    _save(uri, tmp_path / "a", 1)
    _save(uri, tmp_path / "b", 2)
    assert checkpoint_store.reject(f"{uri}/checkpoint-2", "torn") == f"{uri}/checkpoint-2"
    assert checkpoint_store.committed(uri) == [f"{uri}/checkpoint-1"]
    assert (tmp_path / "checkpoints" / "checkpoint-2" / checkpoint_store.REJECTED).read_text() == "torn"


def test_a_file_changed_in_storage_fails_verification_after_download(tmp_path):
    uri = f"file://{tmp_path}/checkpoints"
    _save(uri, tmp_path, 1)
    (tmp_path / "checkpoints" / "checkpoint-1" / "adapter.safetensors").write_bytes(b"swapped")
    with checkpoint_store.local_copy(f"{uri}/checkpoint-1") as local, pytest.raises(checkpoint_files.CheckpointError):
        checkpoint_files.verify(local)


def test_two_ranks_writing_one_name_differently_is_an_error():
    same, other = {"a.pt": {"bytes": 1, "sha256": "x"}}, {"b.pt": {"bytes": 2, "sha256": "y"}}
    assert checkpoint_store.merge([same, same, other]) == {**same, **other}
    with pytest.raises(RuntimeError, match=r"a\.pt"):
        checkpoint_store.merge([same, {"a.pt": {"bytes": 1, "sha256": "z"}}])


def test_a_plain_folder_root_keeps_the_local_rules(tmp_path):
    staging = checkpoint_files.staging_dir(tmp_path, 5)
    (staging / "f").write_text("f")
    checkpoint_files.commit(staging)
    assert checkpoint_store.committed(tmp_path) == [str(tmp_path / "checkpoint-5")]
    with checkpoint_store.local_copy(tmp_path / "checkpoint-5") as local:
        assert local == tmp_path / "checkpoint-5"  # no copy
    assert checkpoint_store.reject(tmp_path / "checkpoint-5", "why") == str(tmp_path / "checkpoint-5.rejected")

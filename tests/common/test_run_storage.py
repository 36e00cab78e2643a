"""Run storage through pyarrow.fs (file:// stands in for s3:// and gs://: the same code path), and its checks."""

from __future__ import annotations

import pytest

from common.run_storage import RAY_JOB_ENV, RunOutputs, RunStorage, check_location, is_uri, open_checked


def test_a_uri_folder_round_trips_files_and_trees(tmp_path):
    storage = RunStorage(f"file://{tmp_path}/store")
    assert is_uri(storage.uri()) and storage.uri("a/b") == f"file://{tmp_path}/store/a/b"
    assert not storage.exists("x.txt") and storage.subfolders() == [] and storage.files("nothing") == []
    storage.write_bytes("deep/x.txt", b"hello")
    assert storage.read_bytes("deep/x.txt") == b"hello" and (tmp_path / "store" / "deep" / "x.txt").is_file()

    local = tmp_path / "local"
    (local / "keep" / "sub").mkdir(parents=True)
    (local / "keep" / "sub" / "w.bin").write_bytes(bytes(range(256)) * 5000)  # > one copy chunk
    (local / "top.txt").write_text("top")
    (local / "skipped").mkdir()
    (local / "skipped" / "s.txt").write_text("no")
    assert storage.upload_tree(local, "run", skip=["skipped"]) == ["keep/sub/w.bin", "top.txt"]
    assert storage.subfolders() == ["deep", "run"] and storage.files("run") == ["keep/sub/w.bin", "top.txt"]
    back = tmp_path / "back"
    assert storage.download_tree("run", back) == ["keep/sub/w.bin", "top.txt"]
    assert (back / "keep" / "sub" / "w.bin").read_bytes() == (local / "keep" / "sub" / "w.bin").read_bytes()
    storage.delete("run")
    storage.delete("run")  # gone already: nothing to do
    assert storage.subfolders() == ["deep"]


def test_a_plain_absolute_path_is_storage_too(tmp_path):
    storage = RunStorage(str(tmp_path / "plain"))
    storage.write_bytes("f.txt", b"1")
    assert (tmp_path / "plain" / "f.txt").read_bytes() == b"1" and storage.uri("f.txt") == f"{tmp_path}/plain/f.txt"


@pytest.mark.parametrize(
    ("storage", "message"),
    [("relative/store", "absolute path or a URI"), ("{out}", "overlap"), ("{out}/inner", "overlap"),
     ("file://{out}", "overlap"), ("{parent}", "overlap")],
)  # fmt: skip
def test_check_location_refuses_relative_and_overlapping_storage(tmp_path, storage, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        check_location(str(out), storage.format(out=out, parent=tmp_path))


@pytest.mark.parametrize("storage", ["", "s3://bucket/runs/x", "gs://b/x", "hdfs://nn:8020/x", "/elsewhere/x"])
def test_check_location_accepts_uris_and_absolute_paths_without_opening_them(tmp_path, storage):
    check_location(str(tmp_path / "run"), storage)  # pure: no network, no credentials


def test_relative_output_dir_is_refused_under_ray_job_submit(monkeypatch, tmp_path):
    open_checked("runs/x", "")  # a local run: relative to the current folder, as always
    monkeypatch.setenv(RAY_JOB_ENV, "{}")  # what `ray job submit` sets for the entrypoint
    with pytest.raises(ValueError, match=r"relative: under `ray job submit`.*set run.storage"):
        open_checked("runs/x", "")
    with pytest.raises(ValueError, match="relative") as err:
        open_checked("runs/x", f"file://{tmp_path}")
    assert "set run.storage" not in str(err.value)  # storage is set: only the output_dir is wrong
    open_checked(str(tmp_path / "abs"), "")


def test_a_storage_pyarrow_cannot_open_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"run.storage='nosuch://b/x': pyarrow.fs cannot open it"):
        open_checked(str(tmp_path), "nosuch://b/x")


def test_run_outputs_write_locally_and_into_storage_and_mirror(tmp_path):
    plain = RunOutputs(str(tmp_path / "only"))
    assert plain.read("config.yaml") is None
    plain.write("config.yaml", b"a: 1\n")
    assert plain.read("config.yaml") == b"a: 1\n"
    assert plain.persistent("checkpoints") == str(tmp_path / "only" / "checkpoints")
    assert plain.mirror() == []  # nothing to mirror to

    store = f"file://{tmp_path}/store"
    outputs = RunOutputs(str(tmp_path / "out"), store)
    assert outputs.persistent("checkpoints") == f"{store}/checkpoints"
    outputs.write("config.yaml", b"b: 2\n")
    (tmp_path / "out" / "config.yaml").write_text("changed locally")
    assert outputs.read("config.yaml") == b"b: 2\n"  # the persistent copy is read, not the local one
    (tmp_path / "out" / "checkpoints").mkdir()
    (tmp_path / "out" / "checkpoints" / "x").write_text("x")
    (tmp_path / "out" / "samples.png").write_bytes(b"png")
    assert outputs.mirror(skip=["checkpoints"]) == ["config.yaml", "samples.png"]
    assert (tmp_path / "store" / "samples.png").read_bytes() == b"png"
    assert not (tmp_path / "store" / "checkpoints").exists()

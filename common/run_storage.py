"""Run storage (``run.storage``): where a run's checkpoints and outputs persist, reached through pyarrow.fs.

A location is one of two kinds:

- a **plain absolute path** (``/mnt/runs/x``): a folder every process sees at that path, a local
  disk on one node or a shared mount (NFS, ...) on several.  Checkpoints are written into it
  directly and committed with an atomic rename (:mod:`common.checkpoint_files`).
- a **URI** (``s3://bucket/runs/x``, ``gs://...``, ``hdfs://...``, ``file:///...``): any
  filesystem pyarrow.fs supports, reached from whichever node writes.  Nothing is renamed there
  (object stores cannot): writers stage on their own disk and upload, and a checkpoint counts
  only once its manifest, uploaded last, exists (:mod:`common.checkpoint_store`).

The driver's own files (``config.yaml``, samples, validation CSV, TensorBoard events, data log)
are written into the local ``run.output_dir`` and mirrored here by :meth:`RunStorage.upload_tree`.
No heavy imports: the driver and every learner rank use this module.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

# Set by `ray job submit` in the entrypoint's environment (ray.dashboard.modules.job.job_supervisor).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def is_uri(location: str) -> bool:
    """Whether ``location`` is a pyarrow.fs URI (``scheme://...``) rather than a plain path."""
    return "://" in location


def check_location(output_dir: str, storage: str) -> None:
    """ValueError unless ``storage`` (``run.storage``) is empty, an absolute path or a URI, apart from ``output_dir``.

    Pure checks only (a config parse must not reach the network): :func:`open_checked` opens it.
    """
    if not storage:
        return
    if not is_uri(storage) and not os.path.isabs(storage):
        raise ValueError(f"run.storage={storage!r} must be an absolute path or a URI (s3://, gs://, hdfs://, file://)")
    if (local := _local_folder(storage)) is not None:  # the mirror copies output_dir into storage: keep them apart
        a, b = Path(os.path.abspath(local)), Path(os.path.abspath(output_dir))
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(f"run.storage={storage!r} and run.output_dir={output_dir!r} overlap; leave run.storage "
                             "empty to keep everything in run.output_dir, or give a folder apart from it")  # fmt: skip


def _local_folder(storage: str) -> str | None:
    """The folder on this machine that ``storage`` names (a plain path or ``file://``), None for remote URIs."""
    if storage.startswith("file://"):
        return storage.removeprefix("file://")
    return None if is_uri(storage) else storage


def open_checked(output_dir: str, storage: str) -> None:
    """What a command checks before Ray starts: ValueError for a relative ``output_dir`` under
    ``ray job submit``, or a ``storage`` that pyarrow.fs cannot open (unknown scheme, no credentials)."""
    if os.environ.get(RAY_JOB_ENV) and not os.path.isabs(output_dir):
        where = "" if storage else " and set run.storage (an s3://, gs:// or hdfs:// URI, or a shared mount)"
        raise ValueError(
            f"run.output_dir={output_dir!r} is relative: under `ray job submit` it would land in Ray's temporary copy "
            f"of the working directory ({os.getcwd()}) and be lost with it; give an absolute run.output_dir{where}"
        )
    if storage:
        RunStorage(storage)


@functools.lru_cache(maxsize=32)
def _open(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``location``, once per process: opening an s3:// URI asks S3 for the region."""
    return pafs.FileSystem.from_uri(location)


class RunStorage:
    """A folder on any pyarrow.fs filesystem, addressed by paths relative to it (``""`` is the folder)."""

    def __init__(self, location: str, *, key: str = "run.storage") -> None:
        try:
            self.fs, base = _open(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as err:
            raise ValueError(f"{key}={location!r}: pyarrow.fs cannot open it: {err}") from None
        self.location, self.base = location.rstrip("/"), base.rstrip("/")

    def uri(self, rel: str = "") -> str:
        """The location of ``rel`` in the form it was given (a URI stays a URI)."""
        return f"{self.location}/{rel}" if rel else self.location

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as stream:
            return stream.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.create_dir(self._path(rel).rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self._path(rel)) as stream:
            stream.write(data)

    def subfolders(self, rel: str = "") -> list[str]:
        """Names of the folders directly in ``rel`` (none when it does not exist)."""
        selector = pafs.FileSelector(self._path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def files(self, rel: str) -> list[str]:
        """Relative paths (``a/b.bin``) of every file below ``rel``."""
        root = self._path(rel)
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def delete(self, rel: str) -> None:
        """Remove the folder ``rel`` and everything below it (nothing when it does not exist)."""
        if self.exists(rel):
            self.fs.delete_dir(self._path(rel))

    def upload_file(self, local: str | Path, rel: str) -> None:
        self.fs.create_dir(self._path(rel).rsplit("/", 1)[0], recursive=True)
        with open(local, "rb") as source, self.fs.open_output_stream(self._path(rel)) as target:
            shutil.copyfileobj(source, target, 1 << 20)

    def upload_tree(self, local_dir: str | Path, rel: str = "", *, skip: Iterable[str] = ()) -> list[str]:
        """Copy every file below ``local_dir`` to ``rel``, except the top-level entries named in ``skip``.

        Files are copied as they are now (a file still being appended to, such as TensorBoard's,
        is copied up to its current length).  Returns the relative paths copied.
        """
        local_dir, skipped = Path(local_dir), set(skip)
        copied = []
        for path in sorted(local_dir.rglob("*")):
            name = path.relative_to(local_dir).as_posix()
            if path.is_file() and not path.is_symlink() and name.split("/", 1)[0] not in skipped:
                self.upload_file(path, f"{rel}/{name}" if rel else name)
                copied.append(name)
        return copied

    def download_tree(self, rel: str, local_dir: str | Path) -> list[str]:
        """Copy every file below ``rel`` into ``local_dir``; returns the relative paths copied."""
        names = self.files(rel)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._path(rel), str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        return names


@dataclass(frozen=True)
class RunOutputs:
    """A run's two homes: ``output_dir`` on the driver's disk, and ``storage`` where it persists.

    With ``storage`` empty, ``output_dir`` is both (a single node, or a mount every node shares).
    """

    output_dir: str
    storage: str = ""

    @property
    def local(self) -> Path:
        return Path(self.output_dir)

    def persistent(self, name: str) -> str:
        """Where ``name`` persists (a path or a URI): what learner ranks write to and resume reads from."""
        return f"{self.storage.rstrip('/')}/{name}" if self.storage else str(self.local / name)

    def read(self, name: str) -> bytes | None:
        """The persistent copy of file ``name`` (None when there is none)."""
        if not self.storage:
            path = self.local / name
            return path.read_bytes() if path.is_file() else None
        storage = RunStorage(self.storage)
        return storage.read_bytes(name) if storage.exists(name) else None

    def write(self, name: str, data: bytes) -> Path:
        """Write file ``name`` into ``output_dir`` and, when set, into storage; returns the local path."""
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if self.storage:
            RunStorage(self.storage).write_bytes(name, data)
        return path

    def mirror(self, *, skip: Iterable[str] = ()) -> list[str]:
        """Copy ``output_dir`` (but the top-level entries in ``skip``) into storage; returns what was copied."""
        if not self.storage or not self.local.is_dir():
            return []
        return RunStorage(self.storage).upload_tree(self.local, skip=skip)

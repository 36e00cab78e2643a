"""Checkpoint roots that are a plain folder or a run-storage URI (:mod:`common.run_storage`): one interface.

A plain folder keeps :mod:`common.checkpoint_files`' rules as they are: staging folder, manifest,
atomic rename, ``latest``, retention, ``*.rejected``.  On a URI nothing can be renamed, so the
same guarantees come from the order of writes:

    <root>/checkpoint-<step>/...            every rank uploads the files it wrote
    <root>/checkpoint-<step>/MANIFEST.json  then rank 0 uploads the merged manifest: now it is committed
    <root>/latest                           then the pointer, then retention removes older folders
    <root>/checkpoint-<step>/REJECTED       a refused checkpoint is marked (with why), never resumed from

A folder without a manifest (a crash mid-upload) is never listed.  Loading downloads the
folder to the loading process's own disk and verifies it against its manifest there, exactly
as a local checkpoint is verified.  No heavy imports: the driver and every learner rank use this.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from common import checkpoint_files
from common.run_storage import RunStorage, is_uri

REJECTED = "REJECTED"  # marker file in a refused checkpoint on a URI root
Entries = dict[str, dict[str, int | str]]  # a manifest's files: {relative path: {"bytes", "sha256"}}


def name_of(directory: str | Path) -> str:
    """``checkpoint-<step>`` of a folder or URI."""
    return str(directory).rstrip("/").rsplit("/", 1)[-1]


def _split(directory: str | Path) -> tuple[str, str]:
    """(root, ``checkpoint-<step>``) of a checkpoint folder or URI."""
    root, name = str(directory).rstrip("/").rsplit("/", 1)
    return root, name


def committed(root: str | Path) -> list[str]:
    """Committed checkpoints under ``root`` (folder or URI), newest first; unverified (loading verifies)."""
    root = str(root)
    if not is_uri(root):
        return [str(p) for p in checkpoint_files.committed(root)]
    storage = RunStorage(root)
    found = [(int(m.group(1)), n) for n in storage.subfolders() if (m := checkpoint_files.NAME.match(n))]
    listed = [n for _, n in sorted(found, reverse=True)]
    return [storage.uri(n) for n in listed if _is_committed(storage, n)]


def _is_committed(storage: RunStorage, name: str) -> bool:
    return storage.exists(f"{name}/{checkpoint_files.MANIFEST}") and not storage.exists(f"{name}/{REJECTED}")


def reject(directory: str | Path, why: str) -> str:
    """Take a refused checkpoint out of the running: ``*.rejected`` (folder) or a ``REJECTED`` marker (URI)."""
    directory = str(directory)
    if not is_uri(directory):
        return str(checkpoint_files.reject(directory))
    root, name = _split(directory)
    RunStorage(root).write_bytes(f"{name}/{REJECTED}", why.encode())
    return directory


@contextmanager
def local_copy(directory: str | Path) -> Iterator[Path]:
    """The checkpoint as a folder on this process's disk: itself, or a download removed afterwards.

    The copy is not verified here; the loader calls :func:`common.checkpoint_files.verify` on it.
    """
    directory = str(directory)
    if not is_uri(directory):
        yield Path(directory)
        return
    root, name = _split(directory)
    scratch = Path(tempfile.mkdtemp(prefix="gdpo-sr-load-"))
    try:
        RunStorage(root).download_tree(name, scratch / name)
        yield scratch / name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def upload(root: str, staging: Path) -> Entries:
    """One rank's part of a checkpoint on a URI: upload its files, return their manifest entries."""
    entries = checkpoint_files.describe(staging)
    RunStorage(root).upload_tree(staging, name_of(staging))
    return entries


def merge(parts: Sequence[Entries]) -> Entries:
    """The ranks' entries as one manifest; two ranks writing one name with different bytes is an error."""
    merged: Entries = {}
    for part in parts:
        for name, entry in part.items():
            if merged.setdefault(name, entry) != entry:
                raise RuntimeError(f"two learner ranks wrote different contents to checkpoint file {name}")
    return merged


def publish(root: str, name: str, entries: Entries, *, keep: int) -> str:
    """Commit an uploaded checkpoint on a URI: manifest, then ``latest``, then retention; returns its URI.

    ``keep`` > 0 removes every ``checkpoint-<step>`` folder (committed, torn or rejected) older
    than the ``keep`` newest committed ones; 0 keeps all.
    """
    storage = RunStorage(root)
    storage.write_bytes(f"{name}/{checkpoint_files.MANIFEST}", checkpoint_files.manifest_text(entries).encode())
    storage.write_bytes(checkpoint_files.LATEST, (name + "\n").encode())
    if keep > 0:
        kept = [name_of(uri) for uri in committed(root)][:keep]
        oldest = min(checkpoint_files.step_of(n) for n in kept)
        for folder in storage.subfolders():
            if (m := checkpoint_files.NAME.match(folder)) and int(m.group(1)) < oldest:
                storage.delete(folder)
    return storage.uri(name)


"""One checkpoint folder written by every learner rank together (GDPO and pre-training ranks alike).

The folder layout, the manifest and retention are :mod:`common.checkpoint_files` (a plain
folder every rank sees) and :mod:`common.checkpoint_store` (a run-storage URI); this is the
collective around them, free of DeepSpeed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from common import checkpoint_files, checkpoint_store
from common.run_storage import is_uri


def save_atomically(root: str | Path, step: int, rank: int, write: Callable[[Path], None], *, keep: int) -> str:
    """``<root>/checkpoint-<step>/`` from every rank's ``write(staging_folder)``; a collective; returns its location.

    A plain folder ``root`` must be shared by all ranks: rank 0 prepares ``checkpoint-<step>.tmp``,
    every rank writes into it, and once all are done rank 0 seals it
    (:func:`common.checkpoint_files.commit`: manifest last, rename, ``latest``, keep the newest
    ``keep``).  A URI ``root`` needs nothing shared: see :func:`_save_to_storage`.
    """
    if is_uri(str(root)):
        return _save_to_storage(str(root), step, rank, write, keep=keep)
    staging = checkpoint_files.staging_path(root, step)
    if rank == 0:
        checkpoint_files.staging_dir(root, step)
    dist.barrier()
    write(staging)
    dist.barrier()  # every rank's files are in place
    if rank == 0:
        checkpoint_files.commit(staging, keep=keep)
    dist.barrier()  # nobody returns before the checkpoint exists
    return str(checkpoint_files.checkpoint_dir(root, step))


def _save_to_storage(root: str, step: int, rank: int, write: Callable[[Path], None], *, keep: int) -> str:
    """Each rank writes on its own disk and uploads its files; rank 0 then publishes the merged manifest.

    Ranks may be on different nodes with nothing shared but the storage.  Until the manifest is
    uploaded the folder is not a checkpoint (:mod:`common.checkpoint_store`), so a crash at any
    point leaves the older checkpoints the newest committed ones.
    """
    scratch = Path(tempfile.mkdtemp(prefix=f"gdpo-sr-save-r{rank}-"))
    try:
        staging = scratch / f"checkpoint-{step}"
        staging.mkdir()
        write(staging)
        entries = checkpoint_store.upload(root, staging)
        parts: list[checkpoint_store.Entries | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, entries)  # every rank's files are uploaded
        if rank == 0:
            checkpoint_store.publish(root, staging.name, checkpoint_store.merge(parts), keep=keep)
        dist.barrier()  # nobody returns before the checkpoint is committed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return f"{root.rstrip('/')}/{staging.name}"

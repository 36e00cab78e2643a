"""One checkpoint folder written by every learner rank together (GDPO and pre-training ranks alike).

The folder layout, the manifest and retention are :mod:`common.checkpoint_files`; this is the
collective around them, free of DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from common import checkpoint_files


def save_atomically(root: str | Path, step: int, rank: int, write: Callable[[Path], None], *, keep: int) -> Path:
    """``<root>/checkpoint-<step>/`` from every rank's ``write(staging_folder)``; a collective; returns the folder.

    Rank 0 prepares ``checkpoint-<step>.tmp``, every rank writes into it, and once all are done
    rank 0 seals it (:func:`common.checkpoint_files.commit`: manifest last, rename, ``latest``,
    keep the newest ``keep``).  ``root`` must be shared by all ranks.
    """
    staging = checkpoint_files.staging_path(root, step)
    if rank == 0:
        checkpoint_files.staging_dir(root, step)
    dist.barrier()
    write(staging)
    dist.barrier()  # every rank's files are in place
    if rank == 0:
        checkpoint_files.commit(staging, keep=keep)
    dist.barrier()  # nobody returns before the checkpoint exists
    return checkpoint_files.checkpoint_dir(root, step)

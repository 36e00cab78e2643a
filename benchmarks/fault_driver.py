"""The training CLI with a record of what the learner trained on: the driver that bench_faults.py starts.

    python -m benchmarks.fault_driver --record FILE [--nan-index K] -- --dry-run KEY=VALUE ...

The product records no per-step list of the groups it trained on (the checkpoint's data
position holds only the next index and the ones still pending), so this process wraps, in
itself only, ``LearnerGroup.start_step``/``finish_step``: after each step the learner
completed, one JSON line ``{"step": s, "indices": [data indices], "image_ids": [...]}`` is appended to
FILE and fsynced (a SIGKILL right after loses at most a step the resumed run redoes anyway).
``--nan-index K`` sets one pixel of the first SR sample of data index K's group to NaN as the
driver collects it from the rollout worker, before the reward pool sees it.  Everything
else is ``python -m rollout`` unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np


def record_trained_groups(path: Path) -> None:
    from common.records import decode_rollout
    from learner.group import LearnerGroup

    start_step, finish_step = LearnerGroup.start_step, LearnerGroup.finish_step

    def start(self, batch):
        groups = decode_rollout(batch)
        self._bench_groups = groups.data_index.tolist(), list(groups.image_id)
        return start_step(self, batch)

    def finish(self, pending):
        stats = finish_step(self, pending)  # raises when a rank died: nothing trained, nothing recorded
        indices, image_ids = self._bench_groups
        line = {"step": int(stats["step"]), "indices": indices, "image_ids": image_ids,
                "nonfinite": float(stats["nonfinite"])}  # fmt: skip
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return stats

    LearnerGroup.start_step, LearnerGroup.finish_step = start, finish


def plant_nan(index: int) -> None:
    from common.records import decode_rollout, encode_rollout
    from rollout.pool import RolloutPool

    collect = RolloutPool.collect

    def collect_with_nan(self, slot, call):
        batch = collect(self, slot, call)
        groups = decode_rollout(batch)
        hit = np.flatnonzero(groups.data_index == index)
        if not hit.size:
            return batch
        sr = groups.sr.copy()
        sr[hit[0], 0, 0, 0, 0] = np.nan  # one pixel of one sample of that group
        print(f"bench: planted a NaN pixel in the group of data index {index}", flush=True)
        return encode_rollout(dataclasses.replace(groups, sr=sr))

    RolloutPool.collect = collect_with_nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--nan-index", type=int, default=None)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="after --: the arguments of python -m rollout")
    args = parser.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    record_trained_groups(args.record)
    if args.nan_index is not None:
        plant_nan(args.nan_index)
    from rollout.cli import main as cli_main

    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main())

"""The fault benchmark's harness: a training run as a process, its record of trained groups, the counts.

Used by ``benchmarks/bench_faults.py`` (the schedule of faults and the table); each run is
``benchmarks/fault_driver.py`` (the training CLI plus a per-step record of the data indices trained on).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STEPS = 12
GROUPS_PER_STEP = 2  # the tiny config's run.groups_per_step
COMMON = (f"run.steps={STEPS}", "learner.checkpoint_every=3", "run.validate_every=0", "run.sample_grid=false")


class Driver:
    """One training process (own session, so a group signal reaches only it and its Ray), its output and tree."""

    def __init__(self, out: Path, *overrides: str, log: Path, nan_index: int | None = None) -> None:
        self.out, self.record = out, out.parent / f"{out.name}.trained.jsonl"
        nan = ["--nan-index", str(nan_index)] if nan_index is not None else []
        cmd = [sys.executable, "-m", "benchmarks.fault_driver", "--record", str(self.record), *nan, "--",
               "--dry-run", f"run.output_dir={out}", *COMMON, *overrides]  # fmt: skip
        self.log = log.open("a", buffering=1)  # line-buffered: readable while the run goes on
        self.log.write(f"$ {' '.join(cmd)}\n")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.step = 0
        self.tree: dict[int, psutil.Process] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.write(line + "\n")
            self.lines.append(line)
            if match := re.match(r"step (\d+) \|", line):
                self.step = int(match.group(1))

    def track(self) -> None:
        """Remember every descendant now: after a SIGKILL of the driver its Ray processes are orphans."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.tree.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def wait_step(self, step: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.step < step:
            self.track()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run never reached step {step} (exit {self.proc.poll()})")
            time.sleep(0.2)

    def actors(self, title: str) -> list[psutil.Process]:
        self.track()
        found = []
        for proc in self.tree.values():
            try:
                if proc.is_running() and proc.cmdline()[:1] and proc.cmdline()[0].startswith(title):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def wait(self, timeout: float = 420) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.track()
            if time.monotonic() > deadline:
                self.proc.kill()
            time.sleep(0.5)
        self.cleanup()
        self.reader.join(timeout=30)
        self.seconds = time.perf_counter() - self.started
        self.log.write(f"[exit {self.proc.returncode} after {self.seconds:.1f} s]\n")
        self.log.flush()
        return self.proc.returncode

    def cleanup(self) -> None:
        """SIGKILL what is left of this run's process tree (psutil refuses a reused PID)."""
        for proc in self.tree.values():
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                pass

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Row:
    survived: bool
    lost: int | None = None
    duplicated: int | None = None
    equal: str = "n/a"
    note: str = ""
    seconds: float = 0.0


def lineage(record: Path) -> dict[int, dict]:
    """Step -> its last record: a step redone after a resume replaces the earlier one."""
    steps: dict[int, dict] = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] = entry
    return steps


def count(record: Path, dropped: frozenset[int] = frozenset()) -> tuple[int, int, str]:
    steps = lineage(record)
    missing = [s for s in range(1, STEPS + 1) if s not in steps]
    trained = [i for s in range(1, STEPS + 1) if s in steps for i in steps[s]["indices"]]
    top = max(trained, default=-1)
    lost = set(range(top + 1)) - set(trained) - dropped
    lost_count = len(lost) + GROUPS_PER_STEP * len(missing)
    note = f"trained {len(trained)} groups, indices 0-{top}"
    if missing:
        note += f"; no record of steps {missing}"
    if lost:
        note += f"; never trained {sorted(lost)}"
    return lost_count, len(trained) - len(set(trained)), note


def adapter(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "adapter" / "adapter_model.safetensors"))


def latest_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().rsplit("-", 1)[1]) if pointer.is_file() else -1


class Bench:
    def __init__(self, work: Path) -> None:
        self.work, self.log = work, work / "runs.log"
        self.base: dict[str, np.ndarray] | None = None
        self.prefix: Path | None = None

    def launch(self, name: str, *overrides: str, **kwargs) -> Driver:
        return Driver(self.work / name, *overrides, log=self.log, **kwargs)

    def finish(self, driver: Driver, *, same_data: bool = True, dropped: frozenset[int] = frozenset(),
               expect: str = "", note: str = "") -> Row:  # fmt: skip
        rc = driver.proc.returncode if driver.proc.returncode is not None else driver.wait()
        reached = latest_step(driver.out)
        survived = rc == 0 and reached == STEPS and (not expect or re.search(expect, driver.text) is not None)
        lost, duplicated, counted = count(driver.record, dropped)
        equal = "n" if same_data and self.base is not None else "n/a"
        if same_data and reached == STEPS and self.base is not None:
            ours = adapter(driver.out)
            same_keys = ours.keys() == self.base.keys()
            diff = max(float(np.abs(ours[k] - self.base[k]).max()) for k in self.base) if same_keys else np.inf
            equal = "y" if diff <= 1e-6 else "n"
            counted += f"; adapter max |diff| {diff:.1e}"
        if expect and not re.search(expect, driver.text):
            counted += f"; expected output /{expect}/ missing"
        note = "; ".join(n for n in (note, f"exit {rc}, step {reached}", counted) if n)
        return Row(survived, lost, duplicated, equal, note)

    def run_plain(self, name: str, *overrides: str, **kwargs) -> Driver:
        driver = self.launch(name, *overrides, **kwargs)
        driver.wait()
        return driver

    def prefix_copy(self, name: str) -> Path:
        """A copy of a 6-step run (checkpoints 3 and 6) to tamper with and resume; the run is made once."""
        if self.prefix is None:
            self.prefix = self.work / "prefix6"
            if latest_step(self.prefix) != 6:
                shutil.rmtree(self.prefix, ignore_errors=True)
                self.prefix.with_name("prefix6.trained.jsonl").unlink(missing_ok=True)
                driver = self.run_plain("prefix6", "run.steps=6")
                if latest_step(self.prefix) != 6:
                    raise RuntimeError(f"the 6-step prefix run failed (exit {driver.proc.returncode}): see {self.log}")
        out = self.work / name
        shutil.copytree(self.prefix, out)
        shutil.copy(self.prefix.with_name("prefix6.trained.jsonl"), out.with_name(f"{name}.trained.jsonl"))
        return out


class Finished:
    """A finished run found on disk (``--only`` reuses the baseline of an earlier call with the same --work)."""

    def __init__(self, out: Path) -> None:
        self.out, self.record, self.text = out, out.with_name(f"{out.name}.trained.jsonl"), ""
        self.proc = argparse.Namespace(returncode=0)

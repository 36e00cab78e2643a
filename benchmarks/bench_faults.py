"""Fault injection (issue 10): the 12-step tiny job under faults and bad inputs, one table row per fault.

    python benchmarks/bench_faults.py [--only NAME] [--work DIR] [--keep]

Each run is ``python -m rollout --dry-run`` in its own process (``benchmarks/fault_driver.py``:
the CLI plus a record of the data indices each completed learner step trained on), with
``run.steps=12 learner.checkpoint_every=3`` (validation and the sample grid off, to save
time).  Faults come from outside: SIGKILL to actor processes found among the driver's
descendants (psutil), SIGKILL or SIGINT to the driver, files planted or swapped in the
output folder, config overrides, hostile data folders.  Only the NaN pixel is planted in the
driver process (fault_driver.py --nan-index), as the driver collects the rollout batch.

Columns: survived (the run reached step 12 with exit 0, or a refusal row refused cleanly
with exit 2 before Ray); groups lost (data indices below the highest trained one that the
final lineage of steps 1-12 never trained, less the group the benchmark itself made
non-finite); groups duplicated (trained more than once in that lineage); equal (the newest
checkpoint's adapter within 1e-6 of the fault-free run's; n/a where the fault changes the
data).  The lineage is the last record of each step: a step redone after a resume replaces
the earlier one, as the resumed learner state does.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository on the path

from benchmarks.fault_harness import STEPS, Bench, Finished, Row, adapter, latest_step, lineage

NAN_INDEX = 5
REWARD, ROLLOUT, LEARNER = "ray::RewardActor", "ray::RolloutWorker", "ray::_RankHost"  # actor process titles


# --- the rows ------------------------------------------------------------------------------------


def kill_actors(title: str, at_step: int) -> Callable[[Bench, str], Row]:
    def row(bench: Bench, name: str) -> Row:
        driver = bench.launch(name)
        driver.wait_step(at_step)
        victims = driver.actors(title)
        for proc in victims:
            proc.kill()
        driver.wait()
        return bench.finish(driver, note=f"SIGKILLed {len(victims)} {title} after step {at_step}")

    return row


def driver_sigkill(bench: Bench, name: str) -> Row:
    first = bench.launch(name)
    first.wait_step(7)  # checkpoint-6 is written right after step 6's progress line
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    resumed = bench.run_plain(name, "run.resume=true")
    return bench.finish(resumed, expect=r"resumed from checkpoint-\d+", note=f"driver SIGKILLed at step {first.step}")


def learner_sigkill(bench: Bench, name: str) -> Row:
    driver = bench.launch(name)
    driver.wait_step(7)
    victims = driver.actors(LEARNER)
    for proc in victims:
        proc.kill()
    driver.wait()
    return bench.finish(driver, expect="restarting the learner group",
                        note=f"SIGKILLed {len(victims)} learner rank(s) after step 7")  # fmt: skip


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def pickle_payload(bench: Bench, name: str) -> Row:
    import torch

    from common import checkpoint_files

    out = bench.prefix_copy(name)
    newest = out / "checkpoints" / "checkpoint-6"
    marker = bench.work / f"{name}.payload-ran"
    for states in newest.glob("deepspeed/*/mp_rank_*_model_states.pt"):
        torch.save({"module": _Payload(marker)}, states)
    # The attacker also rewrites the manifest: only weights_only stands between the file and the code.
    staged = newest.with_name(newest.name + ".tmp")
    newest.rename(staged)
    checkpoint_files.commit(staged)
    row = bench.finish(bench.run_plain(name, "run.resume=true"), expect=r"checkpoint-6 refused")
    if marker.exists():
        row.survived, row.note = False, "THE PAYLOAD RAN; " + row.note
    else:
        row.note = "payload in checkpoint-6 (manifest resealed) did not run; " + row.note
    return row


def torn_checkpoint(bench: Bench, name: str) -> Row:
    out = bench.prefix_copy(name)
    root = out / "checkpoints"
    shutil.rmtree(root / "checkpoint-6" / "adapter")  # adapter of step 3 beside the DeepSpeed state of step 6
    shutil.copytree(root / "checkpoint-3" / "adapter", root / "checkpoint-6" / "adapter")
    fallback = r"(?s)checkpoint-6 refused.*resumed from checkpoint-3"
    return bench.finish(bench.run_plain(name, "run.resume=true"), expect=fallback)


def nan_pixel(bench: Bench, name: str) -> Row:
    driver = bench.run_plain(name, nan_index=NAN_INDEX)
    row = bench.finish(driver, same_data=False, dropped=frozenset({NAN_INDEX}), expect="planted a NaN pixel")
    trained = {i for entry in lineage(driver.record).values() for i in entry["indices"]}
    row.note = f"index {NAN_INDEX} {'TRAINED' if NAN_INDEX in trained else 'dropped, not trained'}; " + row.note
    return row


def config_error(override: str, expect: str) -> Callable[[Bench, str], Row]:
    def row(bench: Bench, name: str) -> Row:
        driver = bench.run_plain(name, override)
        clean = "Traceback" not in driver.text and "Started a local Ray" not in driver.text
        found = re.search(expect, driver.text) is not None
        return Row(driver.proc.returncode == 2 and clean and found,
                   note=f"exit {driver.proc.returncode} in {driver.seconds:.0f} s, before Ray: {clean}, "
                        f"message /{expect}/: {found}")  # fmt: skip

    return row


def photo_folder(root: Path, names: dict[str, bytes]) -> Path:
    """Some of the embedded training photos as PNG files, under the given (bytes) file names."""
    import skimage.data
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for photo, filename in names.items():
        Image.fromarray(getattr(skimage.data, photo)()).save(os.fsdecode(root.__bytes__() + b"/" + filename))
    return root


PHOTOS = {"astronaut": b"astronaut.png", "chelsea": b"chelsea.png", "rocket": b"rocket.png",
          "camera": b"camera.png", "brick": b"brick.png", "grass": b"grass.png"}  # fmt: skip


def non_utf8_name(bench: Bench, name: str) -> Row:
    folder = photo_folder(bench.work / f"{name}.hr", {**PHOTOS, "chelsea": b"chels\xffea.png"})
    driver = bench.run_plain(name, f"data.hr_dir={folder}")
    trained = sum(i.startswith("chels") for entry in lineage(driver.record).values() for i in entry["image_ids"])
    return bench.finish(driver, same_data=False, expect=r"not valid UTF-8",
                        note=f"one file named b'chels\\xffea.png', trained in {trained} group(s)")  # fmt: skip


def truncated_files(bench: Bench, name: str) -> Row:
    folder = photo_folder(bench.work / f"{name}.hr", PHOTOS)
    for photo in ("rocket", "brick", "grass"):
        path = folder / f"{photo}.png"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    driver = bench.run_plain(name, f"data.hr_dir={folder}")
    skips = len(set(re.findall(r"data: skipped (\S+) \(unreadable", driver.text)))
    return bench.finish(driver, same_data=False, note=f"3 of 6 files truncated; {skips} logged as unreadable")


def sigint(bench: Bench, name: str) -> Row:
    first = bench.launch(name)
    first.wait_step(4)
    os.killpg(first.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    rc = first.wait()
    stopped_at = latest_step(first.out)
    resumed = bench.run_plain(name, "run.resume=true")
    return bench.finish(resumed, expect=r"resumed from checkpoint-\d+",
                        note=f"SIGINT to the driver's group after step 4: exit {rc}, checkpoint-{stopped_at}, "
                             f"'stopped by SIGINT' printed: {'stopped by SIGINT' in first.text}")  # fmt: skip


def changed_hr_dir(bench: Bench, name: str) -> Row:
    out = bench.prefix_copy(name)
    folder = photo_folder(bench.work / f"{name}.hr", PHOTOS)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    refused = bench.run_plain(name, "run.resume=true", f"data.hr_dir={folder}")
    clean = refused.proc.returncode == 2 and "Traceback" not in refused.text and "would change" in refused.text
    untouched = before == sorted(p.name for p in (out / "checkpoints").iterdir())
    row = bench.finish(bench.run_plain(name, "run.resume=true"))  # the unchanged resume then goes on
    row.survived = row.survived and clean and untouched
    row.note = (f"changed resume: exit {refused.proc.returncode}, refused cleanly {clean}, checkpoints untouched "
                f"{untouched}; then the unchanged resume: {row.note}")  # fmt: skip
    return row


ROWS: dict[str, tuple[str, Callable[[Bench, str], Row]]] = {
    "reward_killed": ("reward actor SIGKILLed at step 4", kill_actors(REWARD, 4)),
    "rollout_killed": ("rollout actor SIGKILLed at step 4", kill_actors(ROLLOUT, 4)),
    "driver_sigkill": ("driver SIGKILLed at step 7, run.resume=true", driver_sigkill),
    "learner_sigkill": ("learner rank SIGKILLed at step 7 (auto recovery)", learner_sigkill),
    "pickle_payload": ("pickle payload in newest checkpoint, resume", pickle_payload),
    "torn_checkpoint": ("torn newest checkpoint (adapter of step 3), resume", torn_checkpoint),
    "nan_pixel": (f"one NaN pixel in group of data index {NAN_INDEX}", nan_pixel),
    "omega_inf": ("learner.loss.omega=.inf", config_error("learner.loss.omega=.inf", r"config error.*omega")),
    "non_utf8_name": ("image with a non-UTF-8 file name", non_utf8_name),
    "truncated_files": ("3 truncated files among 6 good ones", truncated_files),
    "sigint": ("Ctrl-C (SIGINT) at step 4, then resume", sigint),
    "changed_hr_dir": ("resume with a changed data.hr_dir", changed_hr_dir),
}


def baseline(bench: Bench) -> Row:
    out = bench.work / "baseline"
    if latest_step(out) == STEPS:
        print(f"reusing the fault-free run in {out}", flush=True)
        row = bench.finish(Finished(out))
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.with_name("baseline.trained.jsonl").unlink(missing_ok=True)
        driver = bench.run_plain("baseline")
        row = bench.finish(driver)
        row.seconds = driver.seconds
    if latest_step(out) == STEPS:
        bench.base = adapter(out)
        row.equal = "(reference)"
    return row


def print_table(rows: list[tuple[str, Row]]) -> None:
    def cell(value: int | None) -> str:
        return "n/a" if value is None else str(value)

    print("\n| fault | survived | groups lost | groups duplicated | adapter equal to fault-free | s | notes |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {'y' if r.survived else 'n'} | {cell(r.lost)} | {cell(r.duplicated)} | {r.equal} "
              f"| {r.seconds:.0f} | {r.note} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(ROWS), action="append", help="run only this row (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_faults-"))
    work.mkdir(parents=True, exist_ok=True)
    bench, started = Bench(work), time.perf_counter()
    print(f"runs and their logs in {work} ({bench.log})", flush=True)
    rows = [("none (fault-free baseline)", baseline(bench))]
    print_table(rows)
    for key in args.only or ROWS:
        label, run = ROWS[key]
        for stale in work.glob(f"{key}*"):  # a fresh row every call
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        row_start = time.perf_counter()
        try:
            row = run(bench, key)
        except Exception as err:  # a row that crashes the harness is a row that did not survive
            row = Row(False, note=f"{type(err).__name__}: {err}")
        row.seconds = time.perf_counter() - row_start
        rows.append((label, row))
        print(f"[{key}] survived={row.survived} lost={row.lost} duplicated={row.duplicated} equal={row.equal} "
              f"({row.seconds:.0f} s) {row.note}", flush=True)  # fmt: skip
    print_table(rows)
    print(f"\nwall time {time.perf_counter() - started:.0f} s", flush=True)
    if not (args.keep or args.work):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.survived for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

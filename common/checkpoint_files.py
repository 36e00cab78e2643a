"""Checkpoint folders on disk: atomic commit, a sha256 manifest, retention and a ``latest`` pointer.

Layout under a checkpoint root (``<output_dir>/checkpoints``)::

    checkpoint-<step>/        committed: every file listed in MANIFEST, written last
    checkpoint-<step>.tmp/    being written (or torn by a crash): never resumed from
    checkpoint-<step>.rejected/  refused on resume (torn, tampered): kept for a look, never resumed from
    latest                    the name of the newest committed checkpoint (a text file)

Writers fill :func:`staging_dir`, then :func:`commit` writes the manifest, renames the folder
into place (one ``rename``: a reader sees all of it or none of it), points ``latest`` at it and
removes all but the newest ``keep``.  Readers call :func:`verify` before they open anything
else in the folder: a missing, extra, resized or changed file, or a symlink, is a
:class:`CheckpointError`, so a file planted or swapped after the commit is never loaded.
No heavy imports: the driver and every learner rank use this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "MANIFEST.json"
LATEST = "latest"
_FORMAT = "gdpo-sr-checkpoint/1"
NAME = re.compile(r"^checkpoint-(\d+)$")  # a committed folder's name
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint folder that must not be loaded: incomplete, changed after its commit, or unsafe."""


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}"


def staging_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}.tmp"


def staging_dir(root: str | Path, step: int) -> Path:
    """An empty :func:`staging_path` folder (a leftover from a crashed write is removed first)."""
    staging = staging_path(root, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(staging: str | Path, *, keep: int = 0) -> Path:
    """Seal a filled staging folder: manifest, rename into place, ``latest``, retention; returns the folder.

    ``keep`` > 0 removes all but the ``keep`` newest committed checkpoints (by step); 0 keeps all.
    Re-committing a step that exists replaces it (the old one is moved aside first, so a crash
    in between leaves the older checkpoints intact).
    """
    staging = Path(staging)
    assert staging.name.endswith(".tmp"), staging
    final = staging.with_name(staging.name.removesuffix(".tmp"))
    _write_manifest(staging)
    if final.exists():
        aside = _free_name(final, ".replaced")
        final.rename(aside)
        staging.rename(final)
        shutil.rmtree(aside)
    else:
        staging.rename(final)
    _write_atomic(final.parent / LATEST, final.name + "\n")
    _fsync_dir(final.parent)
    if keep > 0:
        for old in committed(final.parent)[keep:]:
            shutil.rmtree(old)
    return final


def committed(root: str | Path) -> list[Path]:
    """Committed checkpoint folders under ``root``, newest (highest step) first; unverified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def step_of(directory: str | Path) -> int:
    match = NAME.match(Path(directory).name)
    if not match:
        raise CheckpointError(f"{directory} is not named checkpoint-<step>")
    return int(match.group(1))


def verify(directory: str | Path) -> None:
    """CheckpointError unless ``directory`` holds exactly the files of its manifest, byte for byte."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise CheckpointError(f"{directory}: no {MANIFEST} (an incomplete or foreign checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in manifest["files"].items()}
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST}: {err}") from None
    if fmt != _FORMAT:
        raise CheckpointError(f"{directory}: {MANIFEST} format {fmt!r} is not {_FORMAT!r}")
    present = _files(directory)
    if extra := sorted(set(present) - set(listed)):
        raise CheckpointError(f"{directory}: file(s) not in the manifest: {extra}")
    if missing := sorted(set(listed) - set(present)):
        raise CheckpointError(f"{directory}: file(s) missing: {missing}")
    for name, (size, sha) in sorted(listed.items()):
        path = directory / name
        if path.stat().st_size != size:
            raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, the manifest says {size}")
        if _sha256(path) != sha:
            raise CheckpointError(f"{directory}: {name} changed after the checkpoint was written (sha256 differs)")


def reject(directory: str | Path) -> Path:
    """Move a refused checkpoint out of the way (``<name>.rejected``), so nothing resumes from it again."""
    directory = Path(directory)
    target = _free_name(directory, ".rejected")
    directory.rename(target)
    return target


def _files(directory: Path) -> list[str]:
    """Relative paths of every file below ``directory`` except the manifest; symlinks are refused."""
    names = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise CheckpointError(f"{directory}: {path.relative_to(directory)} is a symlink")
        if path.is_file():
            names.append(path.relative_to(directory).as_posix())
        elif not path.is_dir():
            raise CheckpointError(f"{directory}: {path.relative_to(directory)} is not a regular file")
    return [n for n in names if n != MANIFEST]


def describe(directory: str | Path) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file below ``directory``: a manifest's entries."""
    directory = Path(directory)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in _files(directory)}  # fmt: skip


def manifest_text(files: dict[str, dict[str, int | str]]) -> str:
    """The MANIFEST.json listing ``files`` (entries as :func:`describe` makes them)."""
    return json.dumps({"format": _FORMAT, "files": dict(sorted(files.items()))}, indent=1)


def _write_manifest(directory: Path) -> None:
    _write_atomic(directory / MANIFEST, manifest_text(describe(directory)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_name(directory: Path, suffix: str) -> Path:
    target, n = directory.with_name(directory.name + suffix), 1
    while target.exists():
        target, n = directory.with_name(f"{directory.name}{suffix}.{n}"), n + 1
    return target

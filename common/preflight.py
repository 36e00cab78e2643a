"""What a command line checks before Ray starts: a config that parses, local paths that exist.

A user error found here is one line on stderr, ``config error: ...``, and exit code 2: no
traceback, no actor started, no waiting.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn, TypeVar

import yaml

T = TypeVar("T")

CONFIG_ERROR_EXIT = 2
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # a diffusers SD 2.1-base folder


def load_or_exit(load: Callable[[], T]) -> T:
    """``load()`` a job config; a bad key, value or file (YAML/TOML syntax, unsafe tags) exits with one line."""
    try:
        return load()
    except (ValueError, yaml.YAMLError) as err:  # tomllib's errors are ValueErrors
        config_error(err)


def config_error(err: BaseException | str) -> NoReturn:
    message = " ".join(str(err).split())  # YAML's errors span lines; one line reads better in a log
    if isinstance(err, yaml.YAMLError):
        message = f"not valid YAML (only plain YAML is read, no !!python tags): {message}"
    print(f"config error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_ERROR_EXIT)


def missing_paths(
    *, dirs: Mapping[str, str] | None = None, paths: Mapping[str, str] | None = None,
    sd_dirs: Mapping[str, str] | None = None, files: Mapping[str, str] | None = None,
) -> list[str]:  # fmt: skip
    """Problems with the non-empty ``{config key: path}`` entries: folders, files or folders, SD folders, files."""
    problems = []
    for key, value in (dirs or {}).items():
        if value and not Path(value).is_dir():
            problems.append(f"{key}={value}: no such folder")
    for key, value in (files or {}).items():
        if value and not Path(value).is_file():
            problems.append(f"{key}={value}: no such file")
    for key, value in (paths or {}).items():
        if value and not Path(value).exists():
            problems.append(f"{key}={value}: no such file or folder")
    for key, value in (sd_dirs or {}).items():
        if not value:
            continue
        if not Path(value).is_dir():
            problems.append(f"{key}={value}: no such folder")
        elif lacking := [name for name in SD_SUBFOLDERS if not (Path(value) / name).is_dir()]:
            problems.append(f"{key}={value}: not a diffusers SD folder (no {', '.join(lacking)})")
    return problems


def require_paths(**kinds: Mapping[str, str]) -> None:
    """Exit with a config error naming every missing path (see :func:`missing_paths`)."""
    if problems := missing_paths(**kinds):
        config_error("; ".join(problems))

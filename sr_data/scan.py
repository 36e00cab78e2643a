"""Which HR image files a data source can train on, and why the others are skipped.

Indexing (:func:`scan_folder`, :func:`scan_embedded`) and the per-image checks
that :class:`sr_data.source.PairSource` also runs when it decodes a file.  A
file that fails a check is skipped, never fatal, and recorded once as a
:class:`SkippedFile` with one of :data:`SKIP_REASONS`:

- ``unreadable``: PIL cannot identify or decode it (not an image, truncated);
- ``too_small``: its shorter side is below ``data.min_side``, or below
  ``data.crop_size`` unless ``data.upscale_small`` allows upscaling it;
- ``transparent``: it has an alpha channel (or a palette / colour-key
  transparency) with any non-opaque pixel and ``data.skip_transparent`` is on:
  the colour under a transparent pixel is undefined, so training on it would
  train on invented pixels (the inference loader refuses such files too);
- ``unlistable``: a folder that cannot be listed;
- ``duplicate_id``: two files whose ids (below) coincide.

File ids.  A file's id is its path relative to ``hr_dir`` (posix separators).
POSIX file names are bytes; ``os.walk`` hands undecodable bytes back as lone
surrogates (``os.fsdecode``'s ``surrogateescape``), which are not valid UTF-8,
so they can enter neither an Arrow string column nor a UTF-8 log.  Ids are
therefore :func:`printable`: valid names unchanged, each undecodable byte
written ``\\xNN`` (``bad\\xff.png``).  The real path stays inside the process
that opens the file; only ids cross process boundaries.  A valid name that
literally spells another file's escape (vanishingly rare) is skipped as
``duplicate_id``.

A source with no usable image at all raises :class:`NoUsableImages`: a
systematic error that no retry or worker restart can mend.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from PIL import Image

from sr_data.embedded_images import EMBEDDED_IMAGES, embedded_where, load_embedded
from sr_data.images import has_transparent_pixels

if TYPE_CHECKING:
    from sr_data.source import DataConfig

SkipReason = Literal["unreadable", "too_small", "transparent", "unlistable", "duplicate_id"]
SKIP_REASONS: tuple[str, ...] = get_args(SkipReason)


class UnusableImage(ValueError):
    """One file that cannot be trained on; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self) -> tuple:
        return type(self), (self.reason, self.detail)


class NoUsableImages(ValueError):
    """The data holds nothing to train on: a systematic error, never a reason to retry."""


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of training; every field is valid UTF-8 (it crosses processes and enters logs)."""

    file_id: str  # path relative to hr_dir (printable), or ``skimage.data.<name>()``
    reason: SkipReason
    detail: str  # what was wrong, e.g. "OSError: image file is truncated"


@dataclass(frozen=True)
class DataSummary:
    """What indexing found: one log line at the start of a run, and the skip counters' first values."""

    root: str
    found: int  # candidate files (matching data.extensions) or embedded photos
    usable: int
    skipped: tuple[SkippedFile, ...]
    upscaled: int  # usable images smaller than crop_size, upscaled to it
    escaped_names: int  # usable images whose name is not valid UTF-8 (id escaped)
    index_check: str

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.by_reason().items()))
        text = (
            f"data: {self.found} image file(s) found in {self.root}: {self.usable} usable, "
            f"{len(self.skipped)} skipped" + (f" ({reasons})" if reasons else "") + f", {self.upscaled} upscaled"
        )
        if self.escaped_names:
            text += f", {self.escaped_names} with a name that is not valid UTF-8 (id escaped as \\xNN)"
        if self.index_check == "header":
            text += "; damage past a file's header is found, and skipped, when it is first read"
        return text


@dataclass
class Scan:
    """The usable entries of a data source and what was left out (mutable: read-time skips add to it)."""

    root: str
    entries: list[Entry] = field(default_factory=list)
    skipped: dict[str, SkippedFile] = field(default_factory=dict)  # file id -> why, in the order met
    upscaled: dict[str, tuple[int, int]] = field(default_factory=dict)  # image id -> original (height, width)
    found: int = 0
    escaped_names: int = 0

    def skip(self, file_id: str, err: BaseException) -> SkippedFile:
        if isinstance(err, UnusableImage):
            skipped = SkippedFile(file_id, err.reason, printable(err.detail))
        else:  # PIL raises many types for a damaged file
            skipped = SkippedFile(file_id, "unreadable", printable(f"{type(err).__name__}: {err}"))
        self.skipped.setdefault(file_id, skipped)
        return skipped


@dataclass(frozen=True)
class Entry:
    image_id: str  # printable; what records and prompts see
    ref: str  # the file path as the OS knows it, or the key of EMBEDDED_IMAGES; never leaves the process
    embedded: bool


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes that ``os.fsdecode`` escaped become ``\\xNN``; valid text is unchanged."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def check_size(config: DataConfig, height: int, width: int) -> bool:
    """Raise :class:`UnusableImage` for an image too small to train on; True when it must be upscaled."""
    short = min(height, width)
    if short < config.min_side:
        raise UnusableImage("too_small", f"{width}x{height}: shorter side below data.min_side={config.min_side}")
    if short >= config.crop_size:
        return False
    if not config.upscale_small:
        raise UnusableImage(
            "too_small",
            f"{width}x{height}: shorter side below data.crop_size={config.crop_size} (data.upscale_small is off)",
        )
    return True


def check_pixels(config: DataConfig, im: Image.Image) -> None:
    """Raise :class:`UnusableImage` for an image with transparent pixels (decodes it) when those are skipped."""
    if config.skip_transparent and has_transparent_pixels(im):
        raise UnusableImage("transparent", f"{im.mode} image with transparent pixels (data.skip_transparent is on)")


def scan_folder(root: Path, config: DataConfig) -> Scan:
    """Index the image files under ``root`` (recursively, in id order); header or full decode per config."""
    scan = Scan(root=printable(str(root)))
    suffixes = {e.lower() for e in config.extensions}

    def on_error(err: OSError) -> None:
        where = printable(os.path.relpath(err.filename, root)) if err.filename else scan.root
        scan.skip(where, UnusableImage("unlistable", f"cannot list the folder: {err.strerror or err}"))

    paths = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames.sort()
        paths.extend(Path(dirpath, n) for n in filenames if os.path.splitext(n)[1].lower() in suffixes)
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    scan.found = len(paths)
    ids: set[str] = set()
    for path in paths:
        name = path.relative_to(root).as_posix()
        image_id = printable(name)
        try:
            if image_id in ids:
                raise UnusableImage("duplicate_id", f"another file has the id {image_id!r}")
            with Image.open(path) as im:
                if config.index_check == "decode":
                    im.load()
                    check_pixels(config, im)
                upscale = check_size(config, im.height, im.width)
        except Exception as err:  # a damaged file never crashes indexing
            scan.skip(image_id, err)
            continue
        ids.add(image_id)
        if upscale:
            scan.upscaled[image_id] = (im.height, im.width)
        scan.escaped_names += image_id != name
        scan.entries.append(Entry(image_id, str(path), embedded=False))
    return scan


def scan_embedded(config: DataConfig, root: str) -> tuple[Scan, dict[str, np.ndarray]]:
    """Index the embedded photos; also returns their arrays (``[H, W, 3]`` uint8, as loaded)."""
    scan, arrays = Scan(root=root, found=len(EMBEDDED_IMAGES)), {}
    for image_id in EMBEDDED_IMAGES:
        try:
            array = load_embedded(image_id)  # e.g. a future scikit-image that needs pooch for this file
            upscale = check_size(config, *array.shape[:2])
        except Exception as err:
            scan.skip(embedded_where(image_id), err)
            continue
        if upscale:
            scan.upscaled[image_id] = array.shape[:2]
        arrays[image_id] = array
        scan.entries.append(Entry(image_id, image_id, embedded=True))
    return scan, arrays


def describe_skips(skipped: Iterable[SkippedFile], limit: int = 5) -> str:
    """Indented lines naming the first ``limit`` skipped files and why (for error messages)."""
    skipped = list(skipped)
    lines = [f"\n  {s.file_id}: {s.reason} ({s.detail})" for s in skipped[:limit]]
    more = f"\n  ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return "".join(lines) + more

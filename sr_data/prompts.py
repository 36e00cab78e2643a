"""Prompt sources: what text conditions NAOSD for a training pair.

A prompt source is any callable ``(image_id, hr) -> str`` (:class:`PromptSource`);
``hr`` is the HR crop, ``[3, H, W]`` uint8.  Two are shipped:

* :class:`EmptyPrompt` (the default): ``""`` for every image.  It works
  everywhere and is what the tiny config uses.
* :class:`CaptionFile`: a JSON, JSONL or CSV file mapping image file names to
  captions (see :func:`load_captions` for the accepted layouts and
  :meth:`CaptionFile.lookup` for how an image id is matched to a key).  A missing
  entry gives ``""`` and is counted in :attr:`CaptionFile.missing`, or raises
  ``ValueError`` in strict mode.

The reference implementation tags the HR image with a RAM tagger during
training and uses the string ``"tag1, tag2, ..., "`` (SPEC section 2).  Tagger
weights are not on PyPI and cannot be downloaded here, so no tagger ships with
this module, and there is deliberately no stand-in that would produce fake tags.
A RAM tagger plugs in behind the same :class:`PromptSource` protocol when a user
provides its weights: wrap the model in a callable that turns ``hr`` into the
tag string and pass it to ``sr_data.source.PairSource(config, prompt_source=...)``.
It must be deterministic for a given image, like the sources here, so that a
pair is reproducible from ``(seed, index)``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable

import numpy as np

# Column / field names accepted in CSV headers and JSON records (HF "imagefolder" uses file_name + text).
NAME_FIELDS = ("file_name", "filename", "file", "image", "image_id", "name", "path")
CAPTION_FIELDS = ("caption", "text", "prompt", "tags")


@runtime_checkable
class PromptSource(Protocol):
    """Returns the prompt for one training image; must be deterministic and picklable."""

    def __call__(self, image_id: str, hr: np.ndarray) -> str: ...


class EmptyPrompt:
    """The empty prompt for every image (the default, and what the reference falls back to)."""

    def __call__(self, image_id: str, hr: np.ndarray) -> str:
        return ""

    def __repr__(self) -> str:
        return "EmptyPrompt()"


class CaptionFile:
    """Captions read once from a JSON/JSONL/CSV file (:func:`load_captions`).

    ``missing`` counts, per image id, the calls that found no caption (each got
    ``""``); with ``strict=True`` such a call raises ``ValueError`` instead.
    """

    def __init__(self, path: str | Path, *, strict: bool = False) -> None:
        self.path = Path(path)
        self.strict = strict
        self.captions: dict[str, str] = load_captions(self.path)
        self.missing: dict[str, int] = {}
        # Secondary indices: a key's file name and stem, kept only where unambiguous.
        self._by_name = _unique_index(self.captions, lambda k: PurePosixPath(k).name)
        self._by_stem = _unique_index(self.captions, lambda k: PurePosixPath(k).stem)

    def lookup(self, image_id: str) -> str | None:
        """The caption of ``image_id``, or None.

        Tried in order: the id itself (a path relative to the HR folder, e.g.
        ``sub/0001.png``); its file name (``0001.png``); its stem (``0001``); then
        the file name and the stem of the caption file's keys, when only one key
        has that name or stem (so ``HR/0001.png`` in the file matches ``0001.png``).
        """
        path = PurePosixPath(_normalise_key(image_id))
        for key in (str(path), path.name, path.stem):
            if key in self.captions:
                return self.captions[key]
        for index, key in ((self._by_name, path.name), (self._by_stem, path.stem)):
            if key in index:
                return index[key]
        return None

    def check(self, image_ids: Iterable[str]) -> list[str]:
        """The ids in ``image_ids`` that have no caption (in input order)."""
        return [i for i in image_ids if self.lookup(i) is None]

    def __call__(self, image_id: str, hr: np.ndarray) -> str:
        caption = self.lookup(image_id)
        if caption is not None:
            return caption
        if self.strict:
            raise ValueError(f"no caption for image {image_id!r} in captions file {self.path}")
        self.missing[image_id] = self.missing.get(image_id, 0) + 1
        return ""

    def __repr__(self) -> str:
        return f"CaptionFile({str(self.path)!r}, strict={self.strict}, {len(self.captions)} captions)"


def load_captions(path: str | Path) -> dict[str, str]:
    """Read ``{image file name: caption}`` from a ``.json``, ``.jsonl`` or ``.csv`` file.

    Layouts (keys are file names or paths relative to the HR folder; ``\\`` is
    read as ``/`` and a leading ``./`` is dropped):

    * ``.json``: an object ``{"0001.png": "a cat, grass, ", ...}``, or a list of
      records ``[{"file_name": "0001.png", "text": "..."}, ...]``.
    * ``.jsonl``: one such record per line (Hugging Face ``metadata.jsonl``).
    * ``.csv``: a header naming one file column (any of :data:`NAME_FIELDS`) and
      one caption column (any of :data:`CAPTION_FIELDS`), or no header and
      exactly two columns ``name,caption`` on every row.

    Raises ``ValueError`` (naming the file) for a missing file, an unknown
    suffix, a malformed layout, a non-string caption, an empty mapping or one
    name given two different captions.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"captions file {path} cannot be read as UTF-8 text: {err}") from None
    if suffix == ".json":
        pairs = _json_pairs(text, path)
    elif suffix == ".jsonl":
        pairs = _jsonl_pairs(text, path)
    elif suffix == ".csv":
        pairs = _csv_pairs(text, path)
    else:
        raise ValueError(f"captions file {path} must end in .json, .jsonl or .csv")
    captions: dict[str, str] = {}
    for name, caption in pairs:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"captions file {path}: image name {name!r} is not a non-empty string")
        if not isinstance(caption, str):
            raise ValueError(f"captions file {path}: caption of {name!r} is {caption!r}, not a string")
        key = _normalise_key(name)
        if key in captions and captions[key] != caption:
            raise ValueError(f"captions file {path}: {key!r} has two different captions")
        captions[key] = caption
    if not captions:
        raise ValueError(f"captions file {path} holds no captions")
    return captions


def _normalise_key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _unique_index(captions: Mapping[str, str], derive) -> dict[str, str]:
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    for key, caption in captions.items():
        short = derive(key)
        if short in index and index[short] != caption:
            ambiguous.add(short)
        index[short] = caption
    for short in ambiguous:
        del index[short]
    return index


def _record_pair(record: object, where: str) -> tuple[object, object]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object with a file name and a caption, got {record!r}")
    name_keys = [k for k in NAME_FIELDS if k in record]
    caption_keys = [k for k in CAPTION_FIELDS if k in record]
    if not name_keys or not caption_keys:
        raise ValueError(
            f"{where}: record {dict(record)!r} needs a file field (one of {', '.join(NAME_FIELDS)}) "
            f"and a caption field (one of {', '.join(CAPTION_FIELDS)})"
        )
    return record[name_keys[0]], record[caption_keys[0]]


def _json_pairs(text: str, path: Path) -> list[tuple[object, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"captions file {path} is not valid JSON: {err}") from None
    if isinstance(data, Mapping):
        return list(data.items())
    if isinstance(data, list):
        return [_record_pair(r, f"captions file {path}, item {i}") for i, r in enumerate(data)]
    raise ValueError(f"captions file {path}: expected a JSON object or a list of records, got {type(data).__name__}")


def _jsonl_pairs(text: str, path: Path) -> list[tuple[object, object]]:
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"captions file {path}, line {lineno}: not valid JSON: {err}") from None
        pairs.append(_record_pair(record, f"captions file {path}, line {lineno}"))
    return pairs


def _csv_pairs(text: str, path: Path) -> list[tuple[object, object]]:
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    name_cols = [header.index(k) for k in NAME_FIELDS if k in header]
    caption_cols = [header.index(k) for k in CAPTION_FIELDS if k in header]
    if name_cols and caption_cols:
        name_col, caption_col = name_cols[0], caption_cols[0]
        body, first = rows[1:], 2
    elif all(len(row) == 2 for row in rows):
        name_col, caption_col = 0, 1
        body, first = rows, 1
    else:
        raise ValueError(
            f"captions file {path}: expected a header with a file column (one of {', '.join(NAME_FIELDS)}) "
            f"and a caption column (one of {', '.join(CAPTION_FIELDS)}), or two columns name,caption without header"
        )
    pairs = []
    for i, row in enumerate(body):
        if max(name_col, caption_col) >= len(row):
            raise ValueError(f"captions file {path}, record {first + i}: too few columns: {row!r}")
        pairs.append((row[name_col], row[caption_col]))
    return pairs

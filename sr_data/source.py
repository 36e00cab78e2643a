"""Training pairs: HR crops and their degraded LR (SPEC section 6).

:class:`PairSource` indexes a folder of HR images (or the embedded default set)
once, then turns an integer ``index`` into a :class:`TrainingPair`:

1. ``epoch, pos = divmod(index, len(source))``; the image is
   ``images[perm_epoch[pos]]`` where ``perm_epoch`` is a permutation seeded by
   ``(config.seed, epoch)``, so every epoch visits every image once.
2. A random ``crop_size`` square crop and (``hflip``) a horizontal flip with
   probability 1/2, drawn from a generator seeded by ``(config.seed, index)``.
   The crop position, the flip coin and the degradation seed are always drawn in
   that order, whatever the options, so ``hflip=False`` gives the same crops.
3. The degradation: ``bicubic`` = antialiased bicubic x``scale`` down, quantised
   to 8 bits (the LR image as it would be stored), bicubic back up to
   ``crop_size``, clamped and quantised to 8 bits; ``realesrgan`` = the
   Real-ESRGAN second-order degradation ``sr_data.degradation.degrade`` (which
   also resizes back and quantises), with a ``torch.Generator`` seeded from the
   per-index draw and ``DegradationConfig(scale=config.scale)`` unless a
   degradation config is handed to :class:`PairSource`.
4. The prompt from a :class:`sr_data.prompts.PromptSource` (empty by default).

``sample(index)`` is a pure function of ``(config, image files, index)``: no
state carries from one call to the next, so workers can split the index space
any way they like.  **The data position to checkpoint is just the next index to
sample** (an int): after ``batch(start, count)`` it is ``start + count``, and a
resumed run that restarts from it with the same config and files sees exactly
the pairs it would have seen.

Unreadable files.  Indexing a folder opens every candidate's header (cheap:
a few KB per file) and skips what PIL cannot identify, e.g. a text file named
``.png``.  Damage past the header (a truncated JPEG) only shows when pixels are
decoded, so by default (``index_check='header'``) it is found at read time: the
file is then recorded as skipped and the draw moves on to the next image of the
same epoch permutation.  That replacement is still deterministic (it depends
only on which files are broken, not on what was sampled before), but
:attr:`PairSource.skipped` grows as damage is met.  ``index_check='decode'``
decodes every image while indexing instead (exact counts up front; slow for a
large folder).  If PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` has been set
by some other library, truncated files decode with grey fill and are not caught.

Small images.  Images whose shorter side is below ``min_side`` are skipped
(reason recorded).  Images between ``min_side`` and ``crop_size`` are upscaled
(PIL bicubic) so their shorter side equals ``crop_size`` before cropping, and
counted in :attr:`PairSource.upscaled`; their HR is then softer than a true HR
crop.  Set ``min_side = crop_size`` to skip them instead.

The embedded default set (``hr_dir = ""``) is the training photographs that
ship inside the scikit-image wheel and load without a download (pyiqa ships no
example images), see :data:`EMBEDDED_IMAGES`; the held-out photographs of
:data:`sr_data.embedded_images.EMBEDDED_HELDOUT` are never part of it.  It is
a smoke-test set: ten images, two of them smaller than 512 on their short side
(upscaled at the default crop size).  Train on a real folder (the paper: LSDIR).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from sr_data.degradation import DegradationConfig
from sr_data.embedded_images import EMBEDDED_IMAGES, EMBEDDED_ROOT, _embedded_where, _load_embedded
from sr_data.images import fit_crop, rgb_array
from sr_data.lr_synthesis import bicubic_degrade, realesrgan_degrade
from sr_data.prompts import CaptionFile, EmptyPrompt, PromptSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# Stream tags so the permutation and the per-index draws never share a seed sequence.
_PERMUTATION_STREAM = 0x5045524D
_SAMPLE_STREAM = 0x53414D50


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the HR images come from and how a training pair is made from one."""

    hr_dir: str = ""  # folder of HR images, searched recursively; "" = the embedded default set
    crop_size: int = 512  # HR (and LR, after resizing back) side in pixels
    scale: int = 4  # super-resolution factor: LR is crop_size // scale before resizing back
    hflip: bool = True  # random horizontal flip
    degradation: Literal["bicubic", "realesrgan"] = "bicubic"
    prompt: Literal["empty", "captions"] = "empty"
    captions_file: str = ""  # .json / .jsonl / .csv, image file name -> caption (prompt="captions")
    captions_strict: bool = False  # an image without caption: ValueError instead of "" (checked at start)
    seed: int = 0  # seeds the per-epoch permutation and the per-index crop/flip/degradation draws
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # file suffixes indexed, case-insensitive
    min_side: int = 0  # images with a shorter side below this are skipped; others below crop_size upscaled
    index_check: Literal["header", "decode"] = "header"  # what indexing reads of each file (module doc)

    def __post_init__(self) -> None:
        _check_choice("degradation", self.degradation, ("bicubic", "realesrgan"))
        _check_choice("prompt", self.prompt, ("empty", "captions"))
        _check_choice("index_check", self.index_check, ("header", "decode"))
        if self.scale < 2:
            raise ValueError(f"scale must be >= 2, got {self.scale}")
        if self.crop_size < 8 or self.crop_size % 8 or self.crop_size % self.scale:
            raise ValueError(
                f"crop_size must be a positive multiple of 8 (the VAE's downsampling) and of scale={self.scale}, "
                f"got {self.crop_size}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.min_side < 0:
            raise ValueError(f"min_side must be >= 0, got {self.min_side}")
        if not self.extensions:
            raise ValueError("extensions must list at least one file suffix, e.g. ['.png', '.jpg']")
        bad = [e for e in self.extensions if not isinstance(e, str) or not e.startswith(".") or len(e) < 2]
        if bad:
            raise ValueError(f"extensions must be suffixes starting with a dot, like '.png'; got {bad}")
        if self.prompt == "captions" and not self.captions_file:
            raise ValueError("prompt='captions' needs captions_file (a .json, .jsonl or .csv file)")
        if self.prompt != "captions" and self.captions_file:
            raise ValueError(
                f"captions_file is set ({self.captions_file!r}) but prompt={self.prompt!r}; "
                "set prompt='captions' to use it"
            )


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainingPair:
    """One HR crop and its degraded LR, both ``[3, H, W]`` uint8 RGB at the HR size.

    ``eq=False``: ``==`` is identity (comparing the arrays field-wise would be ambiguous).
    """

    image_id: str  # path relative to hr_dir (posix), or the embedded image's name
    index: int  # the data index it was sampled for
    hr: np.ndarray  # [3, H, W] uint8
    lr: np.ndarray  # [3, H, W] uint8, already resized back to the HR size
    prompt: str

    def __post_init__(self) -> None:
        assert self.hr.dtype == np.uint8 and self.hr.ndim == 3 and self.hr.shape[0] == 3, self.hr.shape
        assert self.lr.dtype == np.uint8 and self.lr.shape == self.hr.shape, (self.lr.shape, self.hr.shape)


@dataclass(frozen=True)
class _Entry:
    image_id: str
    ref: str  # a file path, or the key of EMBEDDED_IMAGES
    embedded: bool


class PairSource:
    """Deterministic source of :class:`TrainingPair` s; picklable, holds no open files.

    ``skipped`` maps each rejected file (path, or ``skimage.data.<name>()``) to the
    reason; ``upscaled`` maps the ids of images smaller than ``crop_size`` to
    their original ``(height, width)``.  ``prompt_source`` replaces the one
    ``config.prompt`` selects (e.g. a RAM tagger, see :mod:`sr_data.prompts`); it
    must be picklable to travel to a worker.  ``degradation_config`` (a
    ``sr_data.degradation.DegradationConfig``, only with ``degradation='realesrgan'``)
    replaces the default GDPO parameter set; its ``scale`` must equal ``config.scale``.
    """

    def __init__(
        self,
        config: DataConfig,
        *,
        prompt_source: PromptSource | None = None,
        degradation_config: DegradationConfig | None = None,
    ) -> None:
        self.config = config
        self.skipped: dict[str, str] = {}
        self.upscaled: dict[str, tuple[int, int]] = {}
        self._bad: set[int] = set()  # entries that failed to decode at read time
        self._cache: dict[str, np.ndarray] = {}  # embedded images only (a few MB); not pickled
        self._perm: tuple[int, np.ndarray] | None = None
        if config.hr_dir:
            self.root = str(Path(config.hr_dir).expanduser())
            entries = self._index_folder(Path(self.root))
            if not entries:
                raise ValueError(
                    f"data.hr_dir {self.root} holds no usable image (searched recursively for "
                    f"{', '.join(config.extensions)}; {len(self.skipped)} file(s) skipped){_skip_summary(self.skipped)}"
                )
        else:
            self.root = EMBEDDED_ROOT
            entries = self._index_embedded()
            if not entries:
                raise ValueError(
                    "none of the embedded scikit-image photos could be loaded; set data.hr_dir to a folder "
                    f"of HR images{_skip_summary(self.skipped)}"
                )
        self._entries: tuple[_Entry, ...] = tuple(entries)
        self.prompt_source: PromptSource = prompt_source if prompt_source is not None else self._make_prompt_source()
        self.degradation_config = None
        if config.degradation == "realesrgan":  # fail at start-up, not at the first sample
            self.degradation_config = (
                degradation_config if degradation_config is not None else DegradationConfig(scale=config.scale)
            )
            if self.degradation_config.scale != config.scale:
                raise ValueError(
                    f"the degradation config's scale={self.degradation_config.scale} differs from the data "
                    f"config's scale={config.scale}"
                )
        elif degradation_config is not None:
            raise ValueError(f"a degradation config was given but degradation={config.degradation!r}")

    # --- public API ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def image_ids(self) -> tuple[str, ...]:
        """Ids of the indexed images, in index order (before any read-time skip)."""
        return tuple(e.image_id for e in self._entries)

    def summary(self) -> str:
        """One line for the logs: where the images come from and what was skipped or upscaled."""
        return (
            f"{len(self)} HR images from {self.root} ({len(self.skipped)} skipped, {len(self.upscaled)} upscaled "
            f"to crop_size={self.config.crop_size}), degradation={self.config.degradation}, "
            f"prompt={self.config.prompt}"
        )

    def sample(self, index: int) -> TrainingPair:
        """The training pair for data index ``index`` (>= 0): same config and files, same pair."""
        try:
            index = operator.index(index)
        except TypeError:
            raise ValueError(f"data index must be an integer, got {index!r}") from None
        if index < 0:
            raise ValueError(f"data index must be >= 0, got {index}")
        entry, image = self._pick(index)
        rng = np.random.default_rng([self.config.seed, _SAMPLE_STREAM, index])
        crop = self.config.crop_size
        height, width = image.shape[:2]
        top = int(rng.integers(0, height - crop + 1))
        left = int(rng.integers(0, width - crop + 1))
        flip = bool(rng.random() < 0.5)
        degradation_seed = int(rng.integers(0, 2**63 - 1))
        hr = image[top : top + crop, left : left + crop]
        if self.config.hflip and flip:
            hr = hr[:, ::-1]
        hr = np.ascontiguousarray(hr.transpose(2, 0, 1))
        lr = self._degrade(hr, degradation_seed)
        prompt = self.prompt_source(entry.image_id, hr)
        return TrainingPair(image_id=entry.image_id, index=index, hr=hr, lr=lr, prompt=prompt)

    def batch(self, start: int, count: int) -> list[TrainingPair]:
        """``[sample(start), ..., sample(start + count - 1)]``; the next position is ``start + count``."""
        if count < 0:
            raise ValueError(f"batch count must be >= 0, got {count}")
        return [self.sample(start + i) for i in range(count)]

    # --- pickling: drop the caches ---------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["_perm"] = None
        return state

    # --- indexing --------------------------------------------------------------------------------

    def _index_folder(self, root: Path) -> list[_Entry]:
        if not root.exists():
            raise ValueError(f"data.hr_dir {root} does not exist")
        if not root.is_dir():
            raise ValueError(f"data.hr_dir {root} is not a directory")
        suffixes = {e.lower() for e in self.config.extensions}

        def on_error(err: OSError) -> None:
            self.skipped[str(err.filename)] = f"cannot list directory: {err.strerror or err}"

        paths = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
            dirnames.sort()
            paths.extend(Path(dirpath, n) for n in filenames if os.path.splitext(n)[1].lower() in suffixes)
        paths.sort(key=lambda p: p.relative_to(root).as_posix())
        entries = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    if self.config.index_check == "decode":
                        im.load()
                    height, width = im.height, im.width
            except Exception as err:  # PIL raises many types for a damaged file; never crash indexing
                self.skipped[str(path)] = _reason(err)
                continue
            image_id = path.relative_to(root).as_posix()
            if self._size_ok(str(path), image_id, height, width):
                entries.append(_Entry(image_id, str(path), embedded=False))
        return entries

    def _index_embedded(self) -> list[_Entry]:
        entries = []
        for image_id in EMBEDDED_IMAGES:
            try:
                array = _load_embedded(image_id)
            except Exception as err:  # e.g. a future scikit-image that needs pooch for this file
                self.skipped[_embedded_where(image_id)] = _reason(err)
                continue
            if self._size_ok(_embedded_where(image_id), image_id, *array.shape[:2]):
                self._cache[image_id] = _read_only(fit_crop(array, self.config.crop_size))
                entries.append(_Entry(image_id, image_id, embedded=True))
        return entries

    def _size_ok(self, where: str, image_id: str, height: int, width: int) -> bool:
        if min(height, width) < max(self.config.min_side, 1):
            self.skipped[where] = f"smaller than min_side={self.config.min_side}: {width}x{height}"
            return False
        if min(height, width) < self.config.crop_size:
            self.upscaled[image_id] = (height, width)
        return True

    # --- reading ---------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.config.seed, _PERMUTATION_STREAM, epoch])
            self._perm = (epoch, rng.permutation(len(self._entries)))
        return self._perm[1]

    def _pick(self, index: int) -> tuple[_Entry, np.ndarray]:
        """The entry at ``index`` in its epoch's permutation, or the next readable one after it."""
        n = len(self._entries)
        epoch, pos = divmod(index, n)
        perm = self._permutation(epoch)
        for step in range(n):
            slot = int(perm[(pos + step) % n])
            if slot in self._bad:
                continue
            entry = self._entries[slot]
            try:
                return entry, self._read(entry)
            except Exception as err:  # damaged past the header: skip it from now on, draw the next one
                self._bad.add(slot)
                self.skipped[_embedded_where(entry.ref) if entry.embedded else entry.ref] = _reason(err)
        raise ValueError(
            f"no readable image left in {self.root}: all {n} indexed images failed to decode"
            f"{_skip_summary(self.skipped)}"
        )

    def _read(self, entry: _Entry) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB with a shorter side of at least ``crop_size``."""
        if entry.embedded:
            if entry.ref not in self._cache:
                self._cache[entry.ref] = _read_only(fit_crop(_load_embedded(entry.ref), self.config.crop_size))
            return self._cache[entry.ref]
        with Image.open(entry.ref) as im:
            array = rgb_array(ImageOps.exif_transpose(im))
        return fit_crop(array, self.config.crop_size)

    def _degrade(self, hr: np.ndarray, seed: int) -> np.ndarray:
        if self.config.degradation == "bicubic":
            return bicubic_degrade(hr, self.config.scale)
        return realesrgan_degrade(hr, seed, self.degradation_config)

    def _make_prompt_source(self) -> PromptSource:
        if self.config.prompt == "empty":
            return EmptyPrompt()
        source = CaptionFile(self.config.captions_file, strict=self.config.captions_strict)
        if self.config.captions_strict:
            missing = source.check(self.image_ids)
            if missing:
                shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise ValueError(
                    f"captions_strict: {len(missing)} of {len(self)} images in {self.root} have no caption in "
                    f"{self.config.captions_file}: {shown}"
                )
        return source


# --- image helpers -----------------------------------------------------------------------------


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.uint8)  # own copy: skimage may hand out a shared buffer
    array.setflags(write=False)
    return array


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _skip_summary(skipped: dict[str, str], limit: int = 5) -> str:
    if not skipped:
        return ""
    lines = [f"\n  {path}: {why}" for path, why in list(skipped.items())[:limit]]
    more = f"\n  ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return "".join(lines) + more


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

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

Skipped files (:mod:`sr_data.scan` has the checks, the reasons and the
bytes-safe file ids).  Indexing a folder opens every candidate's header (cheap:
a few KB per file) and skips what PIL cannot identify (e.g. a text file named
``.png``) and what is too small.  Damage past the header (a truncated JPEG) and
transparent pixels only show when pixels are decoded, so by default
(``index_check='header'``) they are found at read time: the file is then
recorded as skipped and the draw moves on to the next image of the same epoch
permutation.  That replacement is still deterministic (it depends only on which
files are unusable, not on what was sampled before), but
:attr:`PairSource.skipped` grows as they are met.  ``index_check='decode'``
decodes every image while indexing instead (exact counts up front; slow for a
large folder).  If PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` has been set
by some other library, truncated files decode with grey fill and are not caught.

Small images.  Images whose shorter side is below ``min_side`` (default 64) are
skipped, and so are those below ``crop_size`` unless ``upscale_small`` is on:
then they are upscaled (PIL bicubic) so their shorter side equals
``crop_size`` before cropping, and counted in :attr:`PairSource.upscaled`;
their HR is softer than a true HR crop.

Transparency.  An image with any non-opaque pixel is skipped
(``skip_transparent``, default on): the colour under a transparent pixel is
undefined.  With it off the alpha is dropped and the hidden colours trained on.

The embedded default set (``hr_dir = ""``) is the training photographs that
ship inside the scikit-image wheel and load without a download (pyiqa ships no
example images), see :data:`EMBEDDED_IMAGES`; the held-out photographs of
:data:`sr_data.embedded_images.EMBEDDED_HELDOUT` are never part of it.  It is
a smoke-test set: ten images, two of them smaller than 512 on their short side
(skipped at the default crop size unless ``upscale_small`` is on).  Train on a real folder (the paper: LSDIR).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from sr_data.degradation import DegradationConfig
from sr_data.embedded_images import (
    EMBEDDED_IMAGES,  # noqa: F401 (re-exported: the embedded default set)
    EMBEDDED_ROOT,
    embedded_where,
    load_embedded,
)
from sr_data.images import fit_crop, rgb_array
from sr_data.lr_synthesis import bicubic_degrade, realesrgan_degrade
from sr_data.prompts import CaptionFile, EmptyPrompt, PromptSource
from sr_data.scan import (
    DataSummary,
    Entry,
    NoUsableImages,
    SkippedFile,
    check_pixels,
    describe_skips,
    scan_embedded,
    scan_folder,
)

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
    min_side: int = 64  # images with a shorter side below this are skipped, whatever the options
    upscale_small: bool = False  # images between min_side and crop_size: upscaled to crop_size, else skipped
    skip_transparent: bool = True  # images with any non-opaque pixel: skipped, else the alpha is dropped
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
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1 (pixels), got {self.min_side}")
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


class PairSource:
    """Deterministic source of :class:`TrainingPair` s; picklable, holds no open files.

    ``skipped`` maps each rejected file's id (path relative to ``hr_dir``, or
    ``skimage.data.<name>()``) to a :class:`sr_data.scan.SkippedFile` (reason and
    detail), in the order met; ``upscaled`` maps the ids of images smaller than
    ``crop_size`` to their original ``(height, width)``; :meth:`summary` counts
    both.  ``prompt_source`` replaces the one ``config.prompt`` selects (e.g. a
    RAM tagger, see :mod:`sr_data.prompts`); it must be picklable to travel to a
    worker.  ``degradation_config`` (a
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
        self._bad: set[int] = set()  # entries that failed to decode at read time
        self._cache: dict[str, np.ndarray] = {}  # embedded images only (a few MB); not pickled
        self._perm: tuple[int, np.ndarray] | None = None
        if config.hr_dir:
            root = Path(config.hr_dir).expanduser()
            if not root.exists():
                raise ValueError(f"data.hr_dir {root} does not exist")
            if not root.is_dir():
                raise ValueError(f"data.hr_dir {root} is not a directory")
            self._scan = scan_folder(root, config)
            if not self._scan.entries:
                raise NoUsableImages(
                    f"data.hr_dir {self._scan.root} holds no usable image (searched recursively for "
                    f"{', '.join(config.extensions)}; {len(self.skipped)} file(s) skipped)"
                    f"{describe_skips(self.skipped.values())}"
                )
        else:
            self._scan, arrays = scan_embedded(config, EMBEDDED_ROOT)
            self._cache = {k: _read_only(fit_crop(a, config.crop_size)) for k, a in arrays.items()}
            if not self._scan.entries:
                raise NoUsableImages(
                    "none of the embedded scikit-image photos could be used; set data.hr_dir to a folder "
                    f"of HR images{describe_skips(self.skipped.values())}"
                )
        self.root = self._scan.root
        self._entries: tuple[Entry, ...] = tuple(self._scan.entries)
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

    @property
    def skipped(self) -> dict[str, SkippedFile]:
        return self._scan.skipped

    @property
    def upscaled(self) -> dict[str, tuple[int, int]]:
        return self._scan.upscaled

    def summary(self) -> DataSummary:
        """What indexing and reading have found so far (``str()`` of it is one log line)."""
        scan = self._scan
        return DataSummary(
            root=scan.root, found=scan.found, usable=len(self) - len(self._bad), skipped=tuple(scan.skipped.values()),
            upscaled=len(scan.upscaled), escaped_names=scan.escaped_names,
            index_check=self.config.index_check if self.config.hr_dir else "decode",  # embedded: decoded to index
        )  # fmt: skip

    def probe(self) -> None:
        """Decode images until one is usable: raises :class:`NoUsableImages` now, not at the first sample."""
        self._pick(0)

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

    # --- reading ---------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.config.seed, _PERMUTATION_STREAM, epoch])
            self._perm = (epoch, rng.permutation(len(self._entries)))
        return self._perm[1]

    def _pick(self, index: int) -> tuple[Entry, np.ndarray]:
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
            except Exception as err:  # damaged past the header, transparent: skip it from now on, draw the next
                self._bad.add(slot)
                self._scan.skip(embedded_where(entry.ref) if entry.embedded else entry.image_id, err)
        raise NoUsableImages(
            f"no readable image left in {self.root}: all {n} indexed images failed to decode or were unusable"
            f"{describe_skips(self.skipped.values())}"
        )

    def _read(self, entry: Entry) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB with a shorter side of at least ``crop_size``."""
        if entry.embedded:
            if entry.ref not in self._cache:
                self._cache[entry.ref] = _read_only(fit_crop(load_embedded(entry.ref), self.config.crop_size))
            return self._cache[entry.ref]
        with Image.open(entry.ref) as im:
            check_pixels(self.config, im)
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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

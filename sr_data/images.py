"""Image files <-> tensors for the inference and evaluation CLIs (PIL based).

Tensors are float32 ``[3, H, W]`` in [0, 1] (one image) or ``[B, 3, H, W]``.
What :func:`load_rgb` accepts, and why:

- RGB: as is.
- Greyscale (``L``, ``1``) and palette (``P``) images: converted to RGB by
  replicating the grey level / looking up the palette.  The Y channel that PSNR
  and SSIM read is then exactly the grey image, and SR models take RGB anyway,
  so nothing is lost; the conversion is reported in ``LoadedImage.note``.
- ``RGBA``/``LA``/palette with transparency: the alpha is dropped when every
  pixel is opaque (it carries nothing); with any transparent pixel the file is
  rejected, because the colour under a transparent pixel is undefined and any
  composite (over black, over white) would invent pixels.
- Anything else (16-bit, CMYK, float modes): rejected, as the 8-bit pipeline
  would have to guess a tone mapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_GREY_MODES = ("L", "1")
_ALPHA_MODES = ("RGBA", "LA", "PA")


class ImageError(ValueError):
    """A file that cannot be used as an 8-bit RGB image; the message says why."""


@dataclass(frozen=True)
class LoadedImage:
    tensor: Tensor  # [3, H, W] float32 in [0, 1]
    note: str | None = None  # a conversion that was applied, e.g. "greyscale converted to RGB"


def list_images(path: str | Path) -> list[Path]:
    """One image file, or the image files directly inside a folder, sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path} is neither an image file nor a folder")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def index_by_stem(paths: Iterable[Path]) -> dict[str, Path]:
    """``{stem: path}``; a stem present twice (``a.png`` and ``a.jpg``) is ambiguous and raises."""
    index: dict[str, Path] = {}
    for p in paths:
        if p.stem in index:
            raise ValueError(f"two images share the name {p.stem!r}: {index[p.stem].name} and {p.name}")
        index[p.stem] = p
    return index


def load_rgb(path: str | Path) -> LoadedImage:
    """Read an image as ``[3, H, W]`` float32 in [0, 1]; raises :class:`ImageError` with the reason."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            rgb, note = _to_rgb(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot decode {Path(path).name}: {err}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    return LoadedImage(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0, note)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "PA"
    if mode in _ALPHA_MODES:
        if has_transparent_pixels(img):
            raise ImageError(f"{mode} image has transparent pixels; the colour under them is undefined")
        return img.convert("RGB"), f"opaque {mode} image: alpha dropped"
    if mode in _GREY_MODES:
        return img.convert("RGB"), "greyscale converted to RGB"
    if mode == "P":
        return img.convert("RGB"), "palette image converted to RGB"
    raise ImageError(f"unsupported image mode {mode!r} (need 8-bit RGB, greyscale or palette)")


def has_transparent_pixels(img: Image.Image) -> bool:
    """Whether any pixel is less than fully opaque: an alpha channel, or a palette / colour-key transparency.

    Decodes the image.  The one check behind both the inference loader and the training data.
    """
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # PIL applies the palette's or the colour key's transparency
    if img.mode not in _ALPHA_MODES and img.mode not in ("RGBa", "La"):
        return False
    return bool(np.asarray(img.getchannel("A")).min() < 255)


def to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8 (rounded, clamped)."""
    return (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_image(image: Tensor, path: str | Path) -> Path:
    """Write ``[3, H, W]`` in [0, 1] as an 8-bit image (format from the suffix; PNG is lossless)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path


def quantize_8bit(images: Tensor) -> Tensor:
    """What saving and re-loading would give: round to the 8-bit grid of [0, 1]."""
    return (images.clamp(0, 1) * 255.0).round() / 255.0


# --- training data: any readable image becomes RGB (16-bit; alpha as sr_data.scan allows) ----


def rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL image -> ``[H, W, 3]`` uint8 RGB (alpha dropped, 16-bit scaled down)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PIL reads it as I;16 or I)
        grey = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def fit_crop(array: np.ndarray, crop: int) -> np.ndarray:
    """Upscale (PIL bicubic) so the shorter side is at least ``crop``; unchanged when already large enough."""
    height, width = array.shape[:2]
    short = min(height, width)
    if short >= crop:
        return array
    factor = crop / short
    size = (max(crop, round(width * factor)), max(crop, round(height * factor)))
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)

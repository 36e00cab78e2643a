"""The embedded photos: shipped inside scikit-image, loaded without a download.

Two fixed, disjoint sets:

- :data:`EMBEDDED_IMAGES`, the default *training* set (``data.hr_dir = ""``):
  every stage that trains (the tiny model's pre-training, GDPO's dry run) reads
  these and only these;
- :data:`EMBEDDED_HELDOUT`, two everyday RGB photos that nothing ever trains
  on: the learning benchmark and the tests evaluate on them.

Grey-level photographs (camera, brick, grass, gravel) are in the training set
as RGB with three equal channels: they add texture the few colour photos lack.
Left out on purpose: `cat` (the same file as `chelsea`), `stereo_motorcycle`'s
right view (a near duplicate of the left one, which is held out), graphics
(logo, colorwheel, text, page), binary or synthetic images, and everything
that needs a download (eagle, lily, skin, ...).
"""

from __future__ import annotations

import numpy as np

# image_id -> (skimage.data function, item of its returned tuple or None).
EMBEDDED_IMAGES: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),  # 512 x 512, portrait of Eileen Collins
    "chelsea": ("chelsea", None),  # 300 x 451, Chelsea the cat
    "rocket": ("rocket", None),  # 427 x 640, a rocket launch
    "immunohistochemistry": ("immunohistochemistry", None),  # 512 x 512, stained tissue micrograph
    "hubble_deep_field": ("hubble_deep_field", None),  # 872 x 1000, Hubble deep field
    "retina": ("retina", None),  # 1411 x 1411, fundus photograph
    "camera": ("camera", None),  # 512 x 512 grey, a cameraman
    "brick": ("brick", None),  # 512 x 512 grey, a brick wall
    "grass": ("grass", None),  # 512 x 512 grey, grass
    "gravel": ("gravel", None),  # 512 x 512 grey, gravel
}
EMBEDDED_HELDOUT: dict[str, tuple[str, int | None]] = {
    "coffee": ("coffee", None),  # 400 x 600, a cup of coffee
    "motorcycle_left": ("stereo_motorcycle", 0),  # 500 x 741, left view of a stereo pair
}
EMBEDDED_ROOT = "<embedded scikit-image photos>"
_ALL = {**EMBEDDED_IMAGES, **EMBEDDED_HELDOUT}


def load_embedded(image_id: str) -> np.ndarray:
    """``[H, W, 3]`` uint8; grey photographs are repeated over three channels."""
    import skimage.data

    name, item = _ALL[image_id]
    data = getattr(skimage.data, name)()
    array = np.asarray(data if item is None else data[item])
    if array.dtype == np.uint8 and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB or grey uint8 image: {array.dtype} {array.shape}")
    return array


def load_heldout(image_id: str) -> np.ndarray:
    """A held-out photo ``[H, W, 3]`` uint8 (raises ``KeyError`` for a training image)."""
    if image_id not in EMBEDDED_HELDOUT:
        raise KeyError(f"{image_id!r} is not a held-out image; held out: {sorted(EMBEDDED_HELDOUT)}")
    return load_embedded(image_id)


def embedded_where(image_id: str) -> str:
    """Where an embedded photo comes from, e.g. ``skimage.data.astronaut()``: the key of a skipped image."""
    name, item = _ALL[image_id]
    return f"skimage.data.{name}()" + ("" if item is None else f"[{item}]")

"""The embedded default training set: RGB photographs shipped inside scikit-image (no download)."""

from __future__ import annotations

import numpy as np

# image_id -> (skimage.data function, item of its returned tuple or None).  RGB photographs
# only, all shipped inside the scikit-image package (no pooch download).  Left out on purpose:
# `cat` (the same file as `chelsea`), `stereo_motorcycle`'s right view (a near duplicate of the
# left one), grey-level images (camera, moon, coins, ...), graphics (logo, colorwheel) and the
# data that needs a download (eagle, lily, skin, ...).
EMBEDDED_IMAGES: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),  # 512 x 512, portrait of Eileen Collins
    "coffee": ("coffee", None),  # 400 x 600, a cup of coffee
    "chelsea": ("chelsea", None),  # 300 x 451, Chelsea the cat
    "rocket": ("rocket", None),  # 427 x 640, a rocket launch
    "immunohistochemistry": ("immunohistochemistry", None),  # 512 x 512, stained tissue micrograph
    "hubble_deep_field": ("hubble_deep_field", None),  # 872 x 1000, Hubble deep field
    "retina": ("retina", None),  # 1411 x 1411, fundus photograph
    "motorcycle_left": ("stereo_motorcycle", 0),  # 500 x 741, left view of a stereo pair
}
EMBEDDED_ROOT = "<embedded scikit-image photos>"


def _load_embedded(image_id: str) -> np.ndarray:
    import skimage.data

    name, item = EMBEDDED_IMAGES[image_id]
    data = getattr(skimage.data, name)()
    array = np.asarray(data if item is None else data[item])
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB uint8 image: {array.dtype} {array.shape}")
    return array


def _embedded_where(image_id: str) -> str:
    name, item = EMBEDDED_IMAGES[image_id]
    return f"skimage.data.{name}()" + ("" if item is None else f"[{item}]")

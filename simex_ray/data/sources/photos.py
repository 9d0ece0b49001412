"""Natural colour photos that ship inside installed wheels, the patches cut from them, and built-in ``photos``.

The photos: scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``, 427x640, located
without importing sklearn) and, when scikit-image is installed, the natural colour photos its wheel
bundles (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ``motorcycle_left``). Nothing is
downloaded. The ``bgimage:`` variant uses scikit-learn's two only (as it always has); ``mnistm:``
and ``photos`` use all of them.

``photos``: 2,000 RGB patches of 64x64 (native 3x64x64), each from a random photo at a random
scale (1, 1.5, 2, 3 or 4 times smaller) and position, near-flat patches (luminance std < 0.05)
rejected; a fixed internal seed makes it the same every time, on a given set of installed photos
(installing scikit-image changes it). Labelled by the photo it was cut from, classes are the photo
names (``photos#china``).
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
from functools import lru_cache
from typing import Sequence

import numpy as np

from ...formats import LUMA, luminance, resize
from ..dataset import Dataset
from ..spec import register_builtin
from .builtin import sklearn_file

__all__ = ["SCALES", "photo_pyramid", "random_patches", "sample_photos", "skimage_file"]

log = logging.getLogger("simex_ray.data")

SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)  # downscale factors of the photos: the "random scale" of a patch
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")

PHOTOS_N = 2000
PHOTOS_SIDE = 64
PHOTOS_MIN_STD = 0.05  # luminance std in [0, 1]: rejects sky and blur, keeps texture
_PHOTOS_SEED = 20151127  # fixed: the built-in is one dataset, not a seeded variant


def skimage_file(name: str) -> pathlib.Path | None:
    """A photo bundled in the scikit-image wheel (``skimage/data/NAME``), located without importing it."""
    spec = importlib.util.find_spec("skimage")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = pathlib.Path(loc, "data", name)
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=2)
def sample_photos(extra: bool = True) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 (H, W, 3)) of scikit-learn's two photos, then (``extra``) scikit-image's when installed."""
    from PIL import Image

    files = [sklearn_file("datasets", "images", n) for n in _SKLEARN_PHOTOS]
    if all(files):
        photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # type: ignore[arg-type]
    else:  # layout changed in some sklearn version: use the public API
        from sklearn.datasets import load_sample_images

        photos = list(load_sample_images().images)
    named = [(pathlib.Path(n).stem, p) for n, p in zip(_SKLEARN_PHOTOS, photos)]
    for n in _SKIMAGE_PHOTOS if extra else ():
        f = skimage_file(n)
        if f is not None:
            named.append((pathlib.Path(n).stem.replace("_", "-"), np.asarray(Image.open(f).convert("RGB"))))
    return tuple(named)


@lru_cache(maxsize=4)
def photo_pyramid(colour: bool, extra: bool, scales: tuple[float, ...] = SCALES) -> tuple[tuple[int, np.ndarray], ...]:
    """(photo index, float32 (C, h, w) in [0, 1]) of every photo at every scale, photo by photo.

    ``colour``: RGB (C=3), else luminance (C=1, ITU-R 601, taken before resizing); resized by the
    area rule of :func:`simex_ray.formats.resize`."""
    levels = []
    for i, (_, img) in enumerate(sample_photos(extra)):
        if colour:
            full = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        else:
            full = ((img[..., :3].astype(np.float32) @ LUMA) / 255.0)[None]
        for f in scales:
            h, w = int(full.shape[1] / f), int(full.shape[2] / f)
            level = resize(full, h, w)
            # area weights sum to 1 only up to rounding; the grey levels stay unclipped, as bgimage always had them
            levels.append((i, np.clip(level, 0.0, 1.0) if colour else level))
    return tuple(levels)


def _cover(level: np.ndarray, h: int, w: int) -> np.ndarray:
    """``level`` grown (bilinear) just enough to hold an h x w patch."""
    f = max(h / level.shape[-2], w / level.shape[-1])
    return resize(level, max(h, int(np.ceil(level.shape[-2] * f))), max(w, int(np.ceil(level.shape[-1] * f))))


def random_patches(levels: Sequence[np.ndarray], n: int, h: int, w: int, rng: np.random.Generator, *,
                   min_std: float = 0.0, stretch: bool = False, what: str = "patches",
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random (C, h, w) patches of ``levels`` (each (C, H, W)): random level and position.

    A patch whose std (over all its values) is below ``min_std`` is drawn again (up to 100
    rounds); ``stretch`` min-max scales each patch to [0, 1]. Levels smaller than the patch are
    not used; when none is large enough, the first is grown to fit. Returns patches float32
    (n, C, h, w) and the index of the level each came from (n,).
    """
    ids = [i for i, L in enumerate(levels) if L.shape[-2] >= h and L.shape[-1] >= w]
    pool = [levels[i] for i in ids] if ids else [_cover(levels[0], h, w)]
    ids = ids or [0]
    out = np.empty((n, pool[0].shape[0], h, w), dtype=np.float32)
    which = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    ar_h, ar_w = np.arange(h), np.arange(w)
    for _ in range(100):
        if not len(todo):
            break
        lev = rng.integers(0, len(pool), size=len(todo))
        ys = rng.random(len(todo))
        xs = rng.random(len(todo))
        accepted = np.zeros(len(todo), dtype=bool)
        for li in np.unique(lev):
            sel = np.nonzero(lev == li)[0]
            L = pool[li]
            y0 = (ys[sel] * (L.shape[-2] - h + 1)).astype(np.int64)
            x0 = (xs[sel] * (L.shape[-1] - w + 1)).astype(np.int64)
            p = L[:, (y0[:, None] + ar_h)[:, :, None], (x0[:, None] + ar_w)[:, None, :]]  # (C, m, h, w)
            p = np.ascontiguousarray(p.transpose(1, 0, 2, 3))  # (m, C, h, w)
            good = p.std(axis=(1, 2, 3)) >= min_std
            if stretch:
                lo = p.min(axis=(1, 2, 3), keepdims=True)
                hi = p.max(axis=(1, 2, 3), keepdims=True)
                out[todo[sel[good]]] = (p[good] - lo[good]) / (hi[good] - lo[good])
            else:
                out[todo[sel[good]]] = p[good]
            which[todo[sel[good]]] = ids[li]
            accepted[sel[good]] = True
        todo = todo[~accepted]
    if len(todo):  # practically unreachable: accept whatever was drawn last
        log.warning("%s: %d patches kept below the contrast threshold", what, len(todo))
        out[todo] = pool[0][:, :h, :w]
        which[todo] = ids[0]
    return out, which


def load_photos(root: pathlib.Path | None = None) -> Dataset:
    levels = photo_pyramid(True, True)
    rng = np.random.default_rng(_PHOTOS_SEED)
    x, which = random_patches([L for _, L in levels], PHOTOS_N, PHOTOS_SIDE, PHOTOS_SIDE, rng,
                              what="photos")
    # contrast on luminance, so a saturated but flat patch (blue sky) does not count as texture
    flat = luminance(x).std(axis=(1, 2, 3)) < PHOTOS_MIN_STD
    for _ in range(100):
        if not flat.any():
            break
        x[flat], which[flat] = random_patches([L for _, L in levels], int(flat.sum()), PHOTOS_SIDE, PHOTOS_SIDE,
                                              rng, what="photos")
        flat[flat] = luminance(x[flat]).std(axis=(1, 2, 3)) < PHOTOS_MIN_STD
    y = np.asarray([levels[i][0] for i in which], dtype=np.int64)
    return Dataset(x, y, "photos", tuple(name for name, _ in sample_photos(True)))


register_builtin("photos", load_photos,
                 "natural colour photo patches, 2000, 3x64x64: scikit-learn's 2 sample photos (+ scikit-image's "
                 "5 if installed) at 5 scales, fixed seed (offline)")

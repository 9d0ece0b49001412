"""Variants, nestable (``rotated:bgimage:digits``); each registers itself with :mod:`simex_ray.data.spec`.

``rotated:`` each image rotated by its own uniform angle in [0, 2*pi).
``bgimage:`` Larochelle-style photo-patch background, ``max(digit, patch)``.
``bgrand:`` uniform-noise background, ``max(digit, noise)``.
Randomness is seeded from (seed, canonical variant spec) (:func:`variant_rng`):
loading the same spec with the same seed is bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache

import numpy as np

from .dataset import Dataset
from .images import SIZE, resize
from .sources.builtin import sklearn_file
from .spec import register_variant, variant

log = logging.getLogger("simex_ray.data")

_BG_STD_MIN = 0.1  # Larochelle-style: reject near-flat background patches
_BG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)  # photo downscale factors: "random scale" of patches


def variant_rng(seed: int, canonical: str) -> np.random.Generator:
    """The generator of variant spec ``canonical`` at ``seed``."""
    h = hashlib.sha256(f"{int(seed)}|{canonical}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:16], "little"))


def apply_variant(name: str, ds: Dataset, canonical: str, seed: int) -> Dataset:
    """Registered variant ``name`` applied to ``ds``; the result is named ``canonical``."""
    x = variant(name).apply(ds.x, variant_rng(seed, canonical))
    return Dataset(x.astype(np.float32, copy=False), ds.y, canonical, ds.classes)


def rotate(x: np.ndarray, rng: np.random.Generator, chunk: int = 4096) -> np.ndarray:
    """Rotate each (1, H, W) image about its centre by its own angle; bilinear, zero fill."""
    n, _, h, w = x.shape
    theta = rng.uniform(0.0, 2 * np.pi, size=n)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    pw = w + 2  # one zero pixel of padding all round makes out-of-frame taps read 0
    out = np.empty_like(x)
    for s in range(0, n, chunk):
        img = x[s : s + chunk, 0]
        m = len(img)
        padded = np.zeros((m, h + 2, pw), dtype=np.float32)
        padded[:, 1:-1, 1:-1] = img
        flat = padded.reshape(m, -1)
        c = np.cos(theta[s : s + chunk])[:, None]
        sn = np.sin(theta[s : s + chunk])[:, None]
        # Inverse mapping: sample the source at the output pixel rotated back.
        sx = np.clip(c * xx + sn * yy + cx + 1, 0, w + 0.999)
        sy = np.clip(-sn * xx + c * yy + cy + 1, 0, h + 0.999)
        x0 = sx.astype(np.int64)
        y0 = sy.astype(np.int64)
        fx = (sx - x0).astype(np.float32)
        fy = (sy - y0).astype(np.float32)
        i00 = y0 * pw + x0
        v00 = np.take_along_axis(flat, i00, axis=1)
        v01 = np.take_along_axis(flat, i00 + 1, axis=1)
        v10 = np.take_along_axis(flat, i00 + pw, axis=1)
        v11 = np.take_along_axis(flat, i00 + pw + 1, axis=1)
        top = v00 + (v01 - v00) * fx
        bot = v10 + (v11 - v10) * fx
        out[s : s + chunk, 0] = (top + (bot - top) * fy).reshape(m, h, w)
    return np.clip(out, 0.0, 1.0, out=out)


@lru_cache(maxsize=1)
def _photo_pyramid() -> tuple[np.ndarray, ...]:
    """Greyscale [0,1] versions of sklearn's two sample photos at several scales."""
    files = [sklearn_file("datasets", "images", n) for n in ("china.jpg", "flower.jpg")]
    if all(files):
        from PIL import Image

        photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # type: ignore[arg-type]
    else:
        from sklearn.datasets import load_sample_images

        photos = list(load_sample_images().images)
    levels = []
    for img in photos:
        g = (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
        for f in _BG_SCALES:
            h, w = int(g.shape[0] / f), int(g.shape[1] / f)
            levels.append(resize(g[None], h, w)[0])
    return tuple(levels)


def bg_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random 28x28 photo patches (random photo, scale, position), min-max scaled to [0,1]."""
    levels = _photo_pyramid()
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    todo = np.arange(n)
    ar = np.arange(SIZE)
    for _ in range(100):
        if not len(todo):
            break
        lev = rng.integers(0, len(levels), size=len(todo))
        ys = rng.random(len(todo))
        xs = rng.random(len(todo))
        accepted = np.zeros(len(todo), dtype=bool)
        for li in np.unique(lev):
            sel = np.nonzero(lev == li)[0]
            L = levels[li]
            y0 = (ys[sel] * (L.shape[0] - SIZE + 1)).astype(np.int64)
            x0 = (xs[sel] * (L.shape[1] - SIZE + 1)).astype(np.int64)
            p = L[(y0[:, None] + ar)[:, :, None], (x0[:, None] + ar)[:, None, :]]
            good = p.std(axis=(1, 2)) >= _BG_STD_MIN
            lo = p.min(axis=(1, 2), keepdims=True)
            hi = p.max(axis=(1, 2), keepdims=True)
            out[todo[sel[good]]] = (p[good] - lo[good]) / (hi[good] - lo[good])
            accepted[sel[good]] = True
        todo = todo[~accepted]
    if len(todo):  # practically unreachable: accept whatever was drawn last
        log.warning("bgimage: %d patches kept below the contrast threshold", len(todo))
        out[todo] = levels[0][:SIZE, :SIZE]
    return out


def _bgrand(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(x, rng.random(x.shape, dtype=np.float32))


def _bgimage(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(x, bg_patches(len(x), rng)[:, None])


register_variant("rotated", rotate, "each image rotated by a random angle")
register_variant("bgimage", _bgimage, "random natural-photo patch background")
register_variant("bgrand", _bgrand, "uniform-noise background")

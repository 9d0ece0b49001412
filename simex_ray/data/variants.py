"""Variants, nestable (``rotated:bgimage:digits``); each registers itself with :mod:`simex_ray.data.spec`.

A variant takes the inner spec's images at their native format (N, C, H, W), any C (1 or 3) and size:

``rotated:`` each image rotated by its own uniform angle in [0, 2*pi) (all channels alike); same format.
``bgimage:`` Larochelle-style photo-patch background, ``max(image, patch)``, patches min-max
stretched, low-contrast ones rejected; grey patches of scikit-learn's two photos for grey images,
colour patches for colour images; same format.
``bgrand:`` uniform-noise background, ``max(image, noise)``, noise per channel; same format.
``colour:`` Coloured MNIST: the (luminance of the) image tinted by a random hue per image,
``grey * rgb(hue)`` with full saturation and value; -> RGB (3, H, W).
``mnistm:`` MNIST-M (Ganin & Lempitsky 2015): ``|patch - grey|`` per channel, the patch a random
crop of a colour photo at full resolution (:mod:`~simex_ray.data.sources.photos`); -> RGB (3, H, W).

Randomness is seeded from (seed, canonical variant spec) (:func:`variant_rng`):
loading the same spec with the same seed is bit-identical.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..formats import luminance
from .dataset import Dataset
from .sources.photos import photo_pyramid, random_patches
from .spec import register_variant, variant

_BG_STD_MIN = 0.1  # Larochelle-style: reject near-flat background patches
_MNISTM_SCALES = (1.0,)  # Ganin & Lempitsky crop BSDS500 photos at full resolution


def variant_rng(seed: int, canonical: str) -> np.random.Generator:
    """The generator of variant spec ``canonical`` at ``seed``."""
    h = hashlib.sha256(f"{int(seed)}|{canonical}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:16], "little"))


def apply_variant(name: str, ds: Dataset, canonical: str, seed: int) -> Dataset:
    """Registered variant ``name`` applied to ``ds``; the result is named ``canonical``."""
    x = variant(name).apply(ds.x, variant_rng(seed, canonical))
    return Dataset(x.astype(np.float32, copy=False), ds.y, canonical, ds.classes)


def rotate(x: np.ndarray, rng: np.random.Generator, chunk: int = 4096) -> np.ndarray:
    """Rotate each (C, H, W) image about its centre by its own angle, all channels alike; bilinear, zero fill."""
    n, c, h, w = x.shape
    theta = rng.uniform(0.0, 2 * np.pi, size=n)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    pw = w + 2  # one zero pixel of padding all round makes out-of-frame taps read 0
    out = np.empty_like(x)
    for s in range(0, n, chunk):
        img = x[s : s + chunk]
        m = len(img)
        padded = np.zeros((m, c, h + 2, pw), dtype=np.float32)
        padded[:, :, 1:-1, 1:-1] = img
        flat = padded.reshape(m, c, -1)
        cos = np.cos(theta[s : s + chunk])[:, None]
        sin = np.sin(theta[s : s + chunk])[:, None]
        # Inverse mapping: sample the source at the output pixel rotated back.
        sx = np.clip(cos * xx + sin * yy + cx + 1, 0, w + 0.999)
        sy = np.clip(-sin * xx + cos * yy + cy + 1, 0, h + 0.999)
        x0 = sx.astype(np.int64)
        y0 = sy.astype(np.int64)
        fx = (sx - x0).astype(np.float32)[:, None]  # (m, 1, H*W): the same taps for every channel
        fy = (sy - y0).astype(np.float32)[:, None]
        i00 = np.broadcast_to((y0 * pw + x0)[:, None], (m, c, h * w))
        v00 = np.take_along_axis(flat, i00, axis=2)
        v01 = np.take_along_axis(flat, i00 + 1, axis=2)
        v10 = np.take_along_axis(flat, i00 + pw, axis=2)
        v11 = np.take_along_axis(flat, i00 + pw + 1, axis=2)
        top = v00 + (v01 - v00) * fx
        bot = v10 + (v11 - v10) * fx
        out[s : s + chunk] = (top + (bot - top) * fy).reshape(m, c, h, w)
    return np.clip(out, 0.0, 1.0, out=out)


def bg_patches(n: int, rng: np.random.Generator, h: int = 28, w: int = 28, channels: int = 1) -> np.ndarray:
    """n random (channels, h, w) patches of scikit-learn's two photos (random photo, scale, position),
    low-contrast ones rejected, each min-max stretched to [0, 1]: grey for 1 channel, RGB for 3."""
    levels = [L for _, L in photo_pyramid(channels == 3, False)]
    return random_patches(levels, n, h, w, rng, min_std=_BG_STD_MIN, stretch=True, what="bgimage")[0]


def hue_rgb(hue: np.ndarray) -> np.ndarray:
    """Hues in [0, 1) -> (n, 3) RGB at full saturation and value (HSV -> RGB); one channel is always 1."""
    h6 = 6.0 * np.asarray(hue, dtype=np.float64)[:, None]
    rgb = np.abs(h6 - np.array([3.0, 2.0, 4.0])) * np.array([1.0, -1.0, -1.0]) + np.array([-1.0, 2.0, 2.0])
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def _grey(x: np.ndarray) -> np.ndarray:
    """(N, 1, H, W): the image itself if grey, its luminance if colour."""
    return x if x.shape[1] == 1 else luminance(x)


def _bgrand(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(x, rng.random(x.shape, dtype=np.float32))


def _bgimage(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, c, h, w = x.shape
    return np.maximum(x, bg_patches(n, rng, h, w, c))


def _colour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rgb = hue_rgb(rng.random(len(x)))
    return _grey(x) * rgb[:, :, None, None]  # (N, 1, H, W) * (N, 3, 1, 1) -> (N, 3, H, W)


def _mnistm(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    levels = [L for _, L in photo_pyramid(True, True, _MNISTM_SCALES)]
    patches = random_patches(levels, n, h, w, rng, what="mnistm")[0]
    return np.abs(patches - _grey(x))


register_variant("rotated", rotate, "each image rotated by a random angle")
register_variant("bgimage", _bgimage, "random natural-photo patch background")
register_variant("bgrand", _bgrand, "uniform-noise background")
register_variant("colour", _colour, "Coloured MNIST: the grey image tinted by a random hue per image (-> RGB)")
register_variant("mnistm", _mnistm, "MNIST-M: |colour photo patch - grey image| per channel (-> RGB)")

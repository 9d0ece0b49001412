"""Conversion of any image array to SimEx's unit images: float32 (N, C, H, W) in [0, 1], C 1 or 3.

Sources read images at their *native* format (:func:`to_unit_images` with ``fmt=None``: grey stays
one channel, colour three, alpha composited over black, size kept); a fleet's format is applied by
:func:`simex_ray.formats.convert`, the one conversion rule, when the data meets the fleet.
"""

from __future__ import annotations

import io
import logging
import pathlib
import warnings
from collections import Counter
from typing import Any

import numpy as np

from ..formats import LEGACY, FormatError, ImageFormat, convert, format_of, resize, resize_matrix
from .dataset import SpecError

__all__ = ["SIZE", "check_labels", "decode_image", "flat_to_square", "resize", "resize_matrix", "stack_images",
           "to_unit_images"]

log = logging.getLogger("simex_ray.data")

SIZE = 28  # side of the legacy format (LEGACY, 1x28x28)


def _channels_last(a: np.ndarray, name: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1..4 -> (N,H,W,C)."""
    if a.ndim == 3:
        return a[..., None]
    if a.ndim != 4:
        raise SpecError(f"{name}: expected (N,H,W), (N,H,W,C) or (N,C,H,W) images, got shape {a.shape}")
    first, last = a.shape[1] in (1, 2, 3, 4), a.shape[-1] in (1, 2, 3, 4)
    if last and not first:
        return a
    if first and not last:
        return np.moveaxis(a, 1, -1)
    if first and last:  # ambiguous (e.g. 3x3 images): a channels axis of 1 decides, else channels last
        return np.moveaxis(a, 1, -1) if a.shape[1] == 1 and a.shape[-1] != 1 else a
    raise SpecError(f"{name}: shape {a.shape} has no 1/3/4-channel axis; use (N,H,W), (N,H,W,C) or (N,C,H,W)")


def to_unit_images(arr: Any, *, name: str = "images", fmt: ImageFormat | None = LEGACY,
                   strict: bool = False) -> np.ndarray:
    """Convert images to float32 (N, C, H, W) in [0, 1].

    Accepts (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1 (grey), 2 (grey + alpha), 3 (RGB) or 4
    (RGBA); integers 0..255 or floats in [0, 1]. Alpha composites over black. ``fmt=None`` keeps the
    native format (C 1 or 3, size unchanged); a format converts by the rule of
    :mod:`simex_ray.formats` (``strict``: refuse instead). Raises SpecError (one line) on bad ndim,
    empty input, NaN/inf, out-of-range values or non-numeric dtype.
    """
    try:
        a = np.asarray(arr)
    except Exception as e:  # e.g. ragged lists
        raise SpecError(f"{name}: cannot convert to an array ({e}); pass equally sized images") from None
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.dtype.kind not in "uif":
        raise SpecError(f"{name}: dtype {a.dtype} is not numeric; pass uint8 0..255 or float in [0,1]")
    a = _channels_last(a, name)
    if a.size == 0:
        raise SpecError(f"{name}: no images (shape {a.shape}); pass at least one non-empty image")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise SpecError(f"{name}: contains NaN or inf; clean the data first")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            fix = "divide by 255" if hi <= 255 and lo >= 0 else "rescale to [0,1]"
            raise SpecError(f"{name}: float values must be in [0,1], got [{lo:g}, {hi:g}]; {fix}")
        x = np.clip(a.astype(np.float32, copy=False), 0.0, 1.0)
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise SpecError(f"{name}: integer values must be in 0..255, got {lo}..{hi}; convert to uint8 or float in [0,1]")
        x = a.astype(np.float32) / np.float32(255.0)
    c = x.shape[-1]
    if c in (2, 4):  # alpha composited over black
        x = x[..., :-1] * x[..., -1:]
    x = np.ascontiguousarray(np.moveaxis(x, -1, 1), dtype=np.float32)  # (N, C, H, W), C 1 or 3
    if fmt is None:
        return x
    try:
        return convert(x, fmt, strict=strict, name=name)
    except FormatError as e:
        raise SpecError(str(e)) from None


def stack_images(images: list[np.ndarray], where: str) -> np.ndarray:
    """Native images of possibly different formats (each (n, C, H, W)) as one array.

    When they differ, every image is converted by the rule to the most common format (ties: the
    larger), with a warning naming the formats found."""
    formats = Counter(format_of(x) for x in images for _ in range(len(x)))
    if len(formats) > 1:
        target = max(formats, key=lambda f: (formats[f], f.pixels, f.channels))
        found = ", ".join(f"{f} ({n})" for f, n in formats.most_common(6))
        log.warning("%s: images differ in format (%s); converting them all to %s", where, found, target)
        images = [convert(x, target) for x in images]
    return np.concatenate(images)


def check_labels(y: Any, n: int, where: str) -> np.ndarray:
    """Validate labels -> int64 (n,)."""
    a = np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise SpecError(f"{where}: labels have shape {a.shape}, expected ({n},) to match the images")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.all(a == np.round(a)):
            raise SpecError(f"{where}: labels must be integers; store them as int")
    elif a.dtype.kind not in "iu":
        raise SpecError(f"{where}: labels dtype {a.dtype} is not integer; store them as int")
    a = a.astype(np.int64)
    if n and a.min() < 0:
        raise SpecError(f"{where}: labels must be >= 0, got {a.min()}")
    return a


def flat_to_square(x: np.ndarray, where: str) -> np.ndarray:
    """(N, side*side) -> (N, side, side); other shapes unchanged."""
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise SpecError(f"{where}: flat images of length {x.shape[1]} are not square; store (N,H,W)")
        x = x.reshape(len(x), side, side)
    return x


def decode_image(src: bytes | pathlib.Path, where: str, fmt: ImageFormat | None = None) -> np.ndarray:
    """Decode one image file/bytes -> float32 (1, C, H, W) at its native format (``fmt``: converted).

    Grey modes (1, L, LA, I;16) give one channel, the rest RGB; Pillow's decompression-bomb guard
    is on and its warning is an error here."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                im.seek(0)  # first frame of animated gif
                alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
                grey = im.mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F")
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    a = np.asarray(im, dtype=np.float64)
                    a = np.clip(a / 65535.0 if a.max() > 255 else a / 255.0, 0.0, 1.0)  # 16-bit greyscale
                elif grey:
                    a = np.asarray(im.convert("LA" if alpha else "L"))
                else:
                    a = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SpecError(f"{where}: refused, image too large ({e}); resize it before sending") from None
    except Exception as e:
        raise SpecError(f"{where}: cannot decode image ({type(e).__name__}: {e}); use png/jpg/bmp/gif") from None
    return to_unit_images(a[None], name=where, fmt=fmt)

"""Conversion of any image array to SimEx's unit images: float32 (N, 1, 28, 28) in [0, 1]."""

from __future__ import annotations

import io
import pathlib
from typing import Any

import numpy as np

from .dataset import SpecError

__all__ = ["SIZE", "check_labels", "decode_image", "flat_to_square", "resize", "resize_matrix", "to_unit_images"]

SIZE = 28


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear resampling weights: box (area) when shrinking, bilinear when growing."""
    if n_in == n_out:
        return np.eye(n_out, dtype=np.float32)
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if scale > 1:  # area: output pixel = mean of the input interval it covers (antialiased)
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                m[i, j] = min(hi, j + 1) - max(lo, j)
        m /= m.sum(axis=1, keepdims=True)
    else:  # bilinear, half-pixel centres (align_corners=False)
        for i in range(n_out):
            src = min(max((i + 0.5) * scale - 0.5, 0.0), n_in - 1)
            j0 = int(np.floor(src))
            j1 = min(j0 + 1, n_in - 1)
            w = src - j0
            m[i, j0] += 1 - w
            m[i, j1] += w
    return m.astype(np.float32)


def resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize float (N, H, W) -> (N, h, w) with separable antialiased weights."""
    if x.shape[1:] == (h, w):
        return x
    rh = resize_matrix(x.shape[1], h)
    rw = resize_matrix(x.shape[2], w)
    return np.einsum("ij,njk,lk->nil", rh, x, rw, optimize=True).astype(np.float32)


def to_unit_images(arr: Any, *, name: str = "images") -> np.ndarray:
    """Convert images to float32 (N, 1, 28, 28) in [0, 1].

    Accepts (N,H,W), (N,H,W,C) with C in 1/3/4, or (N,C,H,W) with C in 1/3/4;
    integers 0..255 or floats in [0, 1]. Colour -> luminance (ITU-R 601);
    alpha composites over black. Other sizes are resized (area when shrinking).
    Raises SpecError (one line) on bad ndim, empty input, NaN/inf, out-of-range
    values or non-numeric dtype.
    """
    try:
        a = np.asarray(arr)
    except Exception as e:  # e.g. ragged lists
        raise SpecError(f"{name}: cannot convert to an array ({e}); pass equally sized images") from None
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.dtype.kind not in "uif":
        raise SpecError(f"{name}: dtype {a.dtype} is not numeric; pass uint8 0..255 or float in [0,1]")
    if a.ndim == 4:
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            pass  # NHWC
        elif a.shape[1] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 1, -1)
        elif a.shape[1] == 1:
            a = np.moveaxis(a, 1, -1)
        elif a.shape[-1] in (1, 3, 4):
            pass
        else:
            raise SpecError(
                f"{name}: shape {a.shape} has no 1/3/4-channel axis; use (N,H,W), (N,H,W,C) or (N,1,H,W)"
            )
    elif a.ndim != 3:
        raise SpecError(f"{name}: expected (N,H,W), (N,H,W,C) or (N,1,H,W) images, got shape {a.shape}")
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
    if x.ndim == 4:
        c = x.shape[-1]
        if c == 1:
            x = x[..., 0]
        else:
            gray = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
            if c == 4:
                gray = gray * x[..., 3]
            x = gray.astype(np.float32)
    x = resize(x, SIZE, SIZE)
    return np.clip(x, 0.0, 1.0, out=x)[:, None, :, :]


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


def decode_image(src: bytes | pathlib.Path, where: str) -> np.ndarray:
    """Decode one image file/bytes -> float32 (1, 1, 28, 28)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.seek(0)  # first frame of animated gif
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                a = np.asarray(im.convert("RGBA"))
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                a = a / 65535.0 if a.max() > 255 else a / 255.0  # 16-bit greyscale
            else:
                a = np.asarray(im.convert("L"))
    except Exception as e:
        raise SpecError(f"{where}: cannot decode image ({type(e).__name__}: {e}); use png/jpg/bmp/gif") from None
    return to_unit_images(a[None], name=where)

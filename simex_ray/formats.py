"""Image formats: the one (channels, height, width) a fleet works at, and the one rule that converts to it.

Every fleet has one :class:`ImageFormat`, recorded in each member's config in the manifest
(``"image_format": "3x32x32"``). A fleet trained before formats existed records none and reads
as :data:`LEGACY` (1×28×28, the paper's). Data reaches a fleet through :func:`convert`, which
applies one documented rule, and only that rule:

* **channels**: RGB -> grey is luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B);
  grey -> RGB repeats the grey plane in all three channels;
* **size**: each axis on its own, *area* (the mean of the input interval each output pixel
  covers, antialiased) when shrinking, *bilinear* (half-pixel centres) when growing; the aspect
  ratio is not kept (a 64×32 image becomes 32×32, not a letterbox).

``strict=True`` refuses any conversion instead of applying it (``--strict-format``).
:func:`conversion` names what the rule did, for the output a user reads. Numpy only.
"""

from __future__ import annotations

from .errors import UserError

import re
from dataclasses import dataclass

import numpy as np

from .errors import squash

__all__ = ["CHANNELS", "LEGACY", "FormatError", "ImageFormat", "conversion", "convert", "format_of",
           "luminance", "resize", "resize_matrix"]

CHANNELS = (1, 3)  # grey, RGB
MAX_SIDE = 1024
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601


class FormatError(UserError):
    """Data that is not in (or cannot be converted to) the format asked for. One line, with the fix."""

    def __init__(self, msg: str) -> None:
        super().__init__(squash(msg))


@dataclass(frozen=True, order=True)
class ImageFormat:
    """(channels, height, width) of the images a fleet takes: channels 1 (grey) or 3 (RGB)."""

    channels: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.channels not in CHANNELS:
            raise FormatError(f"image format {self}: channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        for side in (self.height, self.width):
            if not 1 <= side <= MAX_SIDE:
                raise FormatError(f"image format {self}: height and width must be in 1..{MAX_SIDE}")

    @classmethod
    def parse(cls, text: "str | ImageFormat") -> "ImageFormat":
        """``"3x32x32"`` (CxHxW; ``×`` and spaces accepted) -> ImageFormat; a one-line FormatError otherwise."""
        if isinstance(text, ImageFormat):
            return text
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*[x×]\s*(\d+)\s*", str(text).lower())
        if not m:
            raise FormatError(f"bad image format {text!r}; use CxHxW, e.g. 1x28x28 or 3x32x32")
        return cls(*(int(v) for v in m.groups()))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def pixels(self) -> int:
        """Values per image, C·H·W."""
        return self.channels * self.height * self.width

    @property
    def colour(self) -> bool:
        return self.channels == 3

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"


LEGACY = ImageFormat(1, 28, 28)  # the paper's format, and that of every fleet that records none


def format_of(x: np.ndarray) -> ImageFormat:
    """The format of an image array (N, C, H, W)."""
    if np.ndim(x) != 4:
        raise FormatError(f"expected images (N, C, H, W), got shape {tuple(np.shape(x))}")
    return ImageFormat(*(int(v) for v in x.shape[1:]))


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear resampling weights: area when shrinking, bilinear when growing."""
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
    """Resize float (..., H, W) -> (..., h, w) by the rule (area shrinking, bilinear growing), per axis."""
    if x.shape[-2:] == (h, w):
        return x
    rh, rw = resize_matrix(x.shape[-2], h), resize_matrix(x.shape[-1], w)
    return np.einsum("ij,...jk,lk->...il", rh, x, rw, optimize=True).astype(np.float32)


def luminance(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) RGB -> (N, 1, H, W) grey (ITU-R 601)."""
    return np.einsum("nchw,c->nhw", x, LUMA, optimize=True)[:, None].astype(np.float32)


def conversion(src: ImageFormat, dst: ImageFormat) -> str | None:
    """What :func:`convert` does from ``src`` to ``dst``, in words (None when nothing)."""
    steps = []
    if src.channels != dst.channels:
        steps.append("RGB -> luminance" if dst.channels == 1 else "grey -> RGB")
    for axis, a, b in (("height", src.height, dst.height), ("width", src.width, dst.width)):
        if a != b:
            steps.append(f"{axis} {a} -> {b} ({'area' if b < a else 'bilinear'})")
    return f"{src} -> {dst}: " + ", ".join(steps) if steps else None


def convert(x: np.ndarray, dst: ImageFormat, *, strict: bool = False, name: str = "images") -> np.ndarray:
    """Images (N, C, H, W) float32 in [0, 1] -> ``dst`` by the module's rule.

    ``strict``: refuse (one-line :class:`FormatError`) instead of converting. Returns ``x`` itself
    when it is in ``dst`` already.
    """
    src = format_of(x)
    if src == dst:
        return x
    if strict:
        raise FormatError(f"{name} are {src} but the fleet takes {dst}; convert them yourself, or drop "
                          f"--strict-format to apply the rule ({conversion(src, dst)})")
    if src.channels != dst.channels:
        x = luminance(x) if dst.channels == 1 else np.repeat(x, 3, axis=1)
    x = resize(np.asarray(x, dtype=np.float32), dst.height, dst.width)
    return np.clip(x, 0.0, 1.0, out=x if x.flags.writeable else None)

"""The autoencoder registry: an architecture is one module that registers its class under a name.

An architecture's class is built as ``cls(image_format=fmt, **kwargs)`` and may define
``refuses(fmt) -> str | None``, a classmethod naming (in one line) why it cannot take a format;
without it, an architecture takes every format.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..choices import ARCHITECTURES
from ..formats import LEGACY, FormatError, ImageFormat
from ..errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_autoencoder(name: str):
    """Class decorator adding an architecture to the registry under ``name``."""

    def add(cls):
        if name in _REGISTRY:
            raise UserError(f"autoencoder '{name}' registered twice")
        if name not in ARCHITECTURES:  # the command line offers the names of choices.py, without importing torch
            raise UserError(f"autoencoder '{name}' is not in simex_ray/choices.py ARCHITECTURES; add it there")
        _REGISTRY[name] = cls
        cls.architecture = name
        return cls

    return add


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def _class(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown architecture '{name}'; known: {', '.join(architectures())}") from None


def refusal(name: str, image_format: ImageFormat | str = LEGACY) -> str | None:
    """Why architecture ``name`` cannot take ``image_format`` (one line), or None when it can."""
    refuses = getattr(_class(name), "refuses", None)
    return refuses(ImageFormat.parse(image_format)) if refuses is not None else None


def default_architecture(image_format: ImageFormat | str = LEGACY) -> str:
    """``lenet`` (the paper's) at 1×28×28, ``conv`` at every other format."""
    return "lenet" if ImageFormat.parse(image_format) == LEGACY else "conv"


def create_autoencoder(name: str = "lenet", image_format: ImageFormat | str = LEGACY, **kwargs) -> nn.Module:
    """Build an architecture by registry name for ``image_format``; an unknown name lists the valid
    ones, a format the architecture cannot take raises a one-line :class:`FormatError`."""
    cls = _class(name)
    fmt = ImageFormat.parse(image_format)
    why = refusal(name, fmt)
    if why:
        raise FormatError(why)
    return cls(image_format=fmt, **kwargs)

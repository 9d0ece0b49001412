"""The autoencoder registry: an architecture is one module that registers its class under a name."""

from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_autoencoder(name: str):
    """Class decorator adding an architecture to the registry under ``name``."""

    def add(cls):
        if name in _REGISTRY:
            raise ValueError(f"autoencoder '{name}' registered twice")
        _REGISTRY[name] = cls
        cls.architecture = name
        return cls

    return add


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def create_autoencoder(name: str = "lenet", **kwargs) -> nn.Module:
    """Build an architecture by registry name; an unknown name lists the valid ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture '{name}'; known: {', '.join(architectures())}"
        ) from None
    return cls(**kwargs)

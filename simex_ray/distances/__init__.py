"""The similarity measures SimEx is compared with, by name: a new measure is one module and one line here.

Each takes the unknown samples, the reference samples and what the measure needs (a loss, the
reference's autoencoder A(Y)), and returns one distance: smaller = more similar, like Δ.
"""

from __future__ import annotations

from typing import Any, Callable

from .embeddings import embedding_codes, embedding_distance, encode_all, nearest_code_distance
from .sample import sample_distance
from ..errors import UserError


def _sample(loss: str) -> Callable[..., float]:
    def distance(x_unknown, x_reference, *, seed: int = 0, **_: Any) -> float:
        return sample_distance(x_unknown, x_reference, loss, seed=seed)
    return distance


def _embeddings(x_unknown, x_reference, *, autoencoder=None, seed: int = 0, **_: Any) -> float:
    if autoencoder is None:
        raise UserError("the embeddings distance needs the reference's autoencoder A(Y)")
    return embedding_distance(autoencoder, x_unknown, x_reference, seed=seed)


# name -> distance(x_unknown, x_reference, *, autoencoder=None, seed=0)
DISTANCES: dict[str, Callable[..., float]] = {
    "sample-mse": _sample("mse"),
    "sample-issim": _sample("issim"),
    "embeddings": _embeddings,
}
NEEDS_AUTOENCODER = frozenset({"embeddings"})


def get(name: str) -> Callable[..., float]:
    """The distance named ``name``; an unknown name lists the known ones."""
    try:
        return DISTANCES[name]
    except KeyError:
        raise UserError(f"unknown distance '{name}'; known: {', '.join(DISTANCES)}") from None


__all__ = ["DISTANCES", "NEEDS_AUTOENCODER", "get", "sample_distance", "embedding_codes", "embedding_distance",
           "encode_all", "nearest_code_distance"]

"""Embedding distance: the paper's code-space baseline, in the bottleneck of the reference autoencoder A(Y)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..training import as_tensor
from ..errors import UserError


@torch.no_grad()
def encode_all(autoencoder: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    autoencoder.eval()
    x = as_tensor(x)
    return torch.cat([autoencoder.encode(b) for b in torch.split(x, batch_size)]).double()


def embedding_codes(autoencoder: nn.Module, x, *, max_samples: int = 1000,
                    rng: np.random.Generator | None = None) -> torch.Tensor:
    """A(Y)'s bottleneck codes of ``x`` (subsampled to ``max_samples`` with ``rng``): (n, code) float64."""
    x = np.asarray(x)
    if len(x) == 0:
        raise UserError("embedding_distance needs two non-empty sets")
    if len(x) > max_samples:
        rng = rng if rng is not None else np.random.default_rng(0)
        x = x[np.sort(rng.choice(len(x), size=max_samples, replace=False))]
    return encode_all(autoencoder, x)


def nearest_code_distance(codes_unknown: torch.Tensor, codes_reference: torch.Tensor) -> float:
    """Mean over unknown codes of the L2 distance to the closest reference code."""
    d = torch.cdist(codes_unknown, codes_reference, compute_mode="donot_use_mm_for_euclid_dist")
    return float(d.min(dim=1).values.mean())


def embedding_distance(autoencoder: nn.Module, x_unknown, x_reference, *, max_samples: int = 1000,
                       seed: int = 0) -> float:
    """Mean nearest-code distance from the unknown to the reference, in A(Y)'s bottleneck.

    Each unknown sample is encoded by the reference autoencoder; its distance
    is the L2 distance to the closest code of a reference sample; the result
    is the mean over unknown samples. Nearest-code rather than
    distance-between-mean-codes: two sets with the same mean code but
    different spread (digits vs digits on noise) would otherwise look
    identical. Both sets are subsampled to ``max_samples`` (seeded) so the
    cost stays O(max_samples²).
    """
    rng = np.random.default_rng(seed)
    cu = embedding_codes(autoencoder, x_unknown, max_samples=max_samples, rng=rng)
    cr = embedding_codes(autoencoder, x_reference, max_samples=max_samples, rng=rng)
    return nearest_code_distance(cu, cr)

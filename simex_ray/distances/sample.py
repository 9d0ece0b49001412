"""Sample-space distance: the paper's cheapest baseline, δ between random pairs of raw samples."""

from __future__ import annotations

import numpy as np
import torch

from ..losses import check_loss, per_sample_delta
from ..training import as_tensor
from ..errors import UserError


def sample_distance(x_a, x_b, loss: str = "mse", n_pairs: int = 512, seed: int = 0) -> float:
    """Mean δ(a, b) over ``n_pairs`` random pairs, a from ``x_a``, b from ``x_b`` (N, 1, 28, 28).

    Pairs are drawn with replacement (seeded), so the cost is O(n_pairs)
    whatever the set sizes; the same sets and seed give the same value.
    """
    check_loss(loss)
    if len(x_a) == 0 or len(x_b) == 0:
        raise UserError("sample_distance needs two non-empty sets")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(x_a), size=n_pairs)
    ib = rng.integers(0, len(x_b), size=n_pairs)
    a, b = as_tensor(np.asarray(x_a)[ia]), as_tensor(np.asarray(x_b)[ib])
    with torch.no_grad():
        return float(per_sample_delta(a, b, loss).double().mean())


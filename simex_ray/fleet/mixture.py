"""The composition of unknown data as a mixture of the references: proportions by distribution matching.

For a mixture X = Σ_j π_j Y_j, every statistic of X that is a mean over images is linear in π. Two are used:

* through each member k, X's share of images with δ at or below each of a fixed grid of t: ``F_X,k(t) =
  Σ_j π_j F_jk(t)``, F_jk the CDF of reference j's held-out δ through member k;
* X's share of images nearest to member k by δ: ``Σ_j π_j s_jk``, s_jk that share among reference j's held-out
  images (today's nearest rule's confusion).

A member's *cross sketch* (computed once, when the fleet's member set is final: :func:`cross_sketches`) holds
its grid (:data:`GRID_SIZE` values, quantiles of the pooled held-out δ through it), F_jk and s_jk for every
reference j. π is the point of the simplex whose predicted statistics are closest in least squares to X's,
every member's rows stacked (the nearest rows weigh :data:`NEAREST_WEIGHT`). Least squares only needs the
normal equations: the Gram matrix AᵀA (fixed by the fleet: :func:`composition_gram`) and Aᵀb (a mean over
images: :func:`composition_moments`), so batches merge exactly and π is solved after merging
(:func:`mixture_weights`).

Unlike the share nearest to each member, it is not biased by ambiguous images (a source and its rotated copy)
or by broad references that reconstruct everything well: both are in F_jk and s_jk already. Chosen on the
first half of bench/rankings.py's suites (bench/composition.py; docs/results.md, "Rankings that hold").
"""

from __future__ import annotations

from typing import Any

import numpy as np

GRID_SIZE = 32
# the nearest-share rows' weight against the CDF rows: chosen on the first half of the benchmark (1, 3, 10, 30)
NEAREST_WEIGHT = 10.0
# the sum-to-one row's weight in the NNLS, against the Cholesky factor of the Gram matrix
_SIMPLEX_WEIGHT = 1e4


def cross_sketches(held_out: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Every member's cross sketch from ``held_out``: reference name -> (K, N_j) per-sample δ of that
    reference's held-out images through the K members, the members in the order of ``held_out``'s keys (each
    member is the reference of the same name).

    Returns member -> ``{"grid": [GRID_SIZE t], "cdf": {reference: [F_jk(t) per t]}, "nearest": {reference:
    s_jk}}``. The grid is the quantiles of the pooled δ through the member, each reference weighted equally,
    at levels (i + 0.5) / GRID_SIZE: dense where the references' δ are."""
    names = list(held_out)
    rows = {j: np.asarray(d, dtype=np.float64) for j, d in held_out.items()}
    for j, d in rows.items():
        if d.ndim != 2 or d.shape[0] != len(names) or d.shape[1] == 0:
            raise ValueError(f"held-out δ of '{j}' must be (members={len(names)}, N > 0), got {d.shape}")
    levels = (np.arange(GRID_SIZE) + 0.5) / GRID_SIZE
    nearest = {j: np.bincount(np.argmin(d, axis=0), minlength=len(names)) / d.shape[1] for j, d in rows.items()}
    out = {}
    for k, member in enumerate(names):
        pooled = np.concatenate([d[k] for d in rows.values()])
        weights = np.concatenate([np.full(d.shape[1], 1.0 / d.shape[1]) for d in rows.values()])
        order = np.argsort(pooled, kind="stable")
        cum = np.cumsum(weights[order]) / len(names)
        grid = pooled[order][np.minimum(np.searchsorted(cum, levels), len(pooled) - 1)]
        out[member] = {"grid": grid.tolist(), "cdf": {j: cdf_shares(grid, d[k]).tolist() for j, d in rows.items()},
                       "nearest": {j: float(nearest[j][k]) for j in names}}
    return out


def cdf_shares(grid, delta: np.ndarray) -> np.ndarray:
    """(len(grid),) the share of ``delta`` at or below each grid value: a mean over images."""
    d = np.sort(np.asarray(delta, dtype=np.float64))
    return np.searchsorted(d, np.asarray(grid, dtype=np.float64), side="right") / max(len(d), 1)


def covers(sketches: dict[str, dict | None], names: list[str]) -> bool:
    """Whether every member in ``names`` has a cross sketch over exactly the references ``names`` (a member
    added or removed since the sketches were computed: they no longer describe the fleet)."""
    return bool(names) and all(sketches.get(k) and set(sketches[k]["cdf"]) == set(names)
                               and set(sketches[k]["nearest"]) == set(names) for k in names)


def _design(sketches: dict[str, dict], names: list[str]) -> np.ndarray:
    """A: (K x (GRID_SIZE + 1), K) the stacked predicted statistics, column j = reference j."""
    blocks = []
    for k in names:
        sk = sketches[k]
        cdf = np.array([sk["cdf"][j] for j in names], dtype=np.float64).T  # (grid, references)
        near = NEAREST_WEIGHT * np.array([[sk["nearest"][j] for j in names]], dtype=np.float64)
        blocks += [cdf, near]
    return np.vstack(blocks)


def composition_gram(sketches: dict[str, dict], names: list[str]) -> np.ndarray:
    """(K, K) AᵀA: fixed by the fleet's cross sketches, the same for every batch."""
    a = _design(sketches, names)
    return a.T @ a


def composition_moments(per_sample: np.ndarray, sketches: dict[str, dict], names: list[str]) -> np.ndarray:
    """(K,) Aᵀb for X's (K, N) per-sample δ through the members ``names``: b is X's CDF shares on every
    member's grid and its share nearest to each member by δ, so Aᵀb is a mean over images."""
    d = np.asarray(per_sample, dtype=np.float64)
    near = np.bincount(np.argmin(d, axis=0), minlength=len(names)) / d.shape[1]
    b = np.concatenate([np.concatenate([cdf_shares(sketches[k]["grid"], d[i]), [NEAREST_WEIGHT * near[i]]])
                        for i, k in enumerate(names)])
    return _design(sketches, names).T @ b


def mixture_weights(gram: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """(K,) π ≥ 0, Σπ = 1, minimising πᵀ(AᵀA)π - 2πᵀ(Aᵀb), i.e. ||Aπ - b||², from the normal equations.

    NNLS on the Cholesky factor (a tiny ridge keeps near-duplicate references, whose columns are almost
    equal, factorable) with a heavily weighted sum row, then normalised."""
    from scipy.optimize import nnls

    g = np.asarray(gram, dtype=np.float64)
    c = np.asarray(moments, dtype=np.float64)
    k = len(c)
    chol = np.linalg.cholesky(g + 1e-9 * max(np.trace(g), 1e-12) * np.eye(k))  # g = L Lᵀ
    rhs = np.linalg.solve(chol, c)  # ||Lᵀπ - L⁻¹c||² = πᵀgπ - 2cᵀπ + const
    a = np.vstack([chol.T, np.full(k, _SIMPLEX_WEIGHT)])
    w, _ = nnls(a, np.concatenate([rhs, [_SIMPLEX_WEIGHT]]), maxiter=100 * k)
    total = w.sum()
    return w / total if total > 0 else np.full(k, 1.0 / k)

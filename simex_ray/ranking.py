"""Rank agreement between a distance matrix and transfer-learning outcomes (Ray-free).

Every matrix here has rows = unknown X and columns = reference / base Y, in
the same ``references`` order. Two ways to ask "does the distance order the
datasets like transfer learning?" per base Y:

* **paper** (``rho_per_base``, ``rho_mean``): all n datasets are ranked, the
  base itself included, as the paper's worked example A(M) -> (M, R, E, F, B)
  does. With 5 datasets ρ moves in steps of 0.1, like Table 1.
* **strict** (``rho_per_base_strict``, ``rho_mean_strict``): only X ≠ Y, so
  the easy fact "a dataset is most similar to itself" earns nothing.

ρ is signed so that +1 means "smaller distance ↔ higher accuracy" (perfect
agreement) and -1 the reverse.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata
from .errors import UserError

__all__ = ["agreement", "nanmean", "rank", "rho_per_base", "rho_per_unknown", "spearman"]


def rank(scores: Mapping[str, float], *, reverse: bool = False) -> list[str]:
    """Names ordered by score, smallest first (``reverse``: largest first); ties by name.

    The one ranking rule of the product: the CLI, the API, Serve and the
    experiments all order references with it.
    """
    if reverse:
        return sorted(scores, key=lambda k: (-scores[k], k))
    return sorted(scores, key=lambda k: (scores[k], k))


def spearman(a, b) -> float:
    """Spearman ρ (average ranks for ties); NaN with fewer than 2 points or a constant side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _square(score, accuracy, references: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    s, a = np.asarray(score, dtype=float), np.asarray(accuracy, dtype=float)
    n = len(references)
    if s.shape != (n, n) or a.shape != (n, n):
        raise UserError(f"need ({n}, {n}) matrices, got {s.shape} and {a.shape}")
    return s, a


def rho_per_base(score, accuracy, references: Sequence[str], *, strict: bool = False) -> dict[str, float]:
    """{Y: -ρ(score(·|Y), acc(·|B(Y)))} over every X (paper) or over X ≠ Y (``strict``)."""
    s, a = _square(score, accuracy, references)
    out = {}
    for j, ref in enumerate(references):
        rows = [i for i in range(len(references)) if not (strict and i == j)]
        out[ref] = -spearman(s[rows, j], a[rows, j])
    return out


def rho_per_unknown(score, accuracy, references: Sequence[str], *, strict: bool = False) -> dict[str, float]:
    """{X: agreement of row X}: ρ between score(X|·) and acc(X|B(·)) (same sign and ``strict``)."""
    return rho_per_base(np.asarray(score, dtype=float).T, np.asarray(accuracy, dtype=float).T, references,
                        strict=strict)


def nanmean(values: Iterable[float]) -> float:
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def agreement(score, targets: Mapping[str, Any], references: Sequence[str]) -> dict[str, Any]:
    """Every ρ field of one score matrix against each ground-truth matrix in ``targets``.

    ``targets``: {"accuracy": M, "efficiency": M, ...}; the accuracy target
    gives the unsuffixed keys (``rho_per_base``, ``rho_mean``, their
    ``_strict`` twins, ``rho_per_unknown``...), every other target ``name``
    the same keys with ``_<name>`` appended (efficiency keeps the historical
    suffix ``_normalized``).
    """
    out: dict[str, Any] = {}
    for name, target in targets.items():
        if target is None:
            continue
        suffix = "" if name == "accuracy" else "_normalized" if name == "efficiency" else f"_{name}"
        for strict, tag in ((False, ""), (True, "_strict")):
            per = rho_per_base(score, target, references, strict=strict)
            per_u = rho_per_unknown(score, target, references, strict=strict)
            out[f"rho_per_base{tag}{suffix}"] = per
            out[f"rho_mean{tag}{suffix}"] = nanmean(per.values())
            out[f"rho_per_unknown{tag}{suffix}"] = per_u
            out[f"rho_mean_per_unknown{tag}{suffix}"] = nanmean(per_u.values())
    return out

"""A member's latent moments: where its own training data's bottleneck codes lie (Ray-free).

The latent distance of an image x through member A(Y) is the Mahalanobis distance of its code c = encode(x)
(flattened, D values) from the codes of Y's training split:

    z(x) = (c - μ)ᵀ P (c - μ) / D,

μ and P the Ledoit-Wolf location and precision (as ``sklearn.covariance.LedoitWolf`` computes them: the
sample covariance shrunk towards a multiple of the identity by the analytic Ledoit-Wolf 2004 weight,
inverted with a symmetric pseudo-inverse, so a code direction that never varies does not make P infinite). "Own mean z"
is the mean z of Y's own held-out test split (the images the calibration sketch is made of): z / own mean z
is 1 for data like Y's own unseen data. It feeds the ``typicality_latent`` ranking
(:func:`simex_ray.fleet.result.typicality_latent`).

Cost: at most :data:`LATENT_SAMPLES` training images are encoded (a seeded subset: O(S·encoder) plus
O(S·D² + D³) for the fit; measured once per member at the end of its training, on 2 loaded CPU cores: 0.25 s
for ``lenet``, 1.2 s for ``conv`` at 3x32x32); the test split's z comes from the same pass as its calibration δ. The moments
(μ, P: (D + D²) float64, 57 KB for LeNet's D = 84, 132 KB for ``conv``'s 128) are stored in a
content-addressed file beside the member's weights (:mod:`.manifest`), not in the manifest.
"""

from __future__ import annotations

import numpy as np

LATENT_SAMPLES = 4096  # training images whose codes fit a member's moments (a seeded subset), at most
LATENT_ESTIMATOR = "ledoit-wolf"


def fit_moments(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ (D,), P (D, D)) of codes (S, D): the Ledoit-Wolf location and precision, float64, as
    ``sklearn.covariance.LedoitWolf().fit(codes)`` gives them (tested equal), in numpy: training processes
    need not import scikit-learn (about 1.4 s). O(S·D² + D³). Needs S >= 2.

    With X the centred codes and S = XᵀX / n: μ_tr = tr(S) / D; δ = ‖S − μ_tr I‖²_F / D;
    β = min(δ, (Σ‖x_i‖⁴ / n − ‖S‖²_F) / (n·D)); shrinkage β / δ (0 when β = 0); covariance
    (1 − β/δ) S + (β/δ) μ_tr I; P its symmetric pseudo-inverse (eigenvalues below max|λ|·D·ε dropped)."""
    c = np.asarray(codes, dtype=np.float64).reshape(len(codes), -1)
    if len(c) < 2:
        raise ValueError(f"need at least 2 codes to fit latent moments, got {len(c)}")
    n, d = c.shape
    mean = c.mean(axis=0)
    x = c - mean
    emp = x.T @ x / n
    if d == 1:
        shrinkage = 0.0
    else:
        trace = np.trace(emp)
        mu = trace / d
        x2 = x ** 2
        beta_ = float(np.sum(x2.T @ x2))  # Σ_i ‖x_i‖⁴
        delta_ = float(np.sum((x.T @ x) ** 2)) / n ** 2  # ‖S‖²_F
        beta = (beta_ / n - delta_) / (d * n)
        delta = (delta_ - 2.0 * mu * trace + d * mu ** 2) / d
        beta = min(beta, delta)
        shrinkage = 0.0 if beta == 0 else beta / delta
    cov = (1.0 - shrinkage) * emp
    cov.flat[:: d + 1] += shrinkage * (np.trace(emp) / d)
    w, v = np.linalg.eigh(cov)
    keep = np.abs(w) > np.abs(w).max() * d * np.finfo(np.float64).eps
    precision = (v[:, keep] / w[keep]) @ v[:, keep].T
    return mean, precision


def latent_distance(codes: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """z of codes (N, D) under one member's moments, (N,), in numpy: the reference of
    :func:`simex_ray.scoring.mahalanobis` (which computes it for every member inside the fused pass)."""
    c = np.asarray(codes, dtype=np.float64).reshape(len(codes), -1) - mean
    return np.einsum("ij,jk,ik->i", c, precision, c) / c.shape[1]


def training_subset(x_train, seed: int, cap: int = LATENT_SAMPLES) -> np.ndarray:
    """At most ``cap`` training images, a seeded subset in their order: (S, C, H, W). ``x_train``: an
    array, or an iterable of blocks (a streamed split, read only until ``cap`` images are in hand)."""
    if isinstance(x_train, np.ndarray) or hasattr(x_train, "__len__") and hasattr(x_train, "__getitem__"):
        n = len(x_train)
        if n <= cap:
            return np.asarray(x_train, dtype=np.float32)
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:cap])
        return np.asarray(x_train[idx], dtype=np.float32)
    held, size = [], 0
    for block in x_train:
        held.append(np.asarray(block[:cap - size], dtype=np.float32))
        size += len(held[-1])
        if size >= cap:
            break
    return np.concatenate(held) if held else np.zeros((0,), np.float32)


def encode_all(model, x: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Flattened codes of x (N, C, H, W) through ``model.encode``: (N, D) float64, on the model's device."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return np.concatenate([model.encode(torch.as_tensor(x[i:i + chunk], dtype=torch.float32, device=device))
                               .flatten(1).double().cpu().numpy() for i in range(0, len(x), chunk)])

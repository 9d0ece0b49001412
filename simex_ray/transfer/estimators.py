"""Transferability estimators: one score per (frozen source model, labelled target data), higher = better.

Pure functions on numpy arrays (numpy and scipy; scikit-learn only for k-means, imported lazily), no
training, no Ray, no torch. Written from the papers' formulas. Inputs: ``features`` (N, D), the source
model's penultimate features on the target samples; ``probs`` (N, C_s), its softmax; ``labels`` (N,), the
target labels (any values: they are remapped to 0..C-1, so no class is empty and renaming classes does not
change a score). Everything is computed in float64. :func:`estimate` is the single checked entry point and
:data:`ESTIMATORS` the registry, by name.

Label-based (all need the target labels):

- ``logme`` (You et al., ICML 2021). Per class c, with one-hot target y_c, the Bayesian linear model
  y = F w + e, w ~ N(0, I/alpha), e ~ N(0, I/beta); alpha, beta by the MacKay fixed point
  gamma = sum_i beta s_i / (alpha + beta s_i), alpha = gamma / |m|^2, beta = (N - gamma) / |F m - y|^2
  (s_i the eigenvalues of F^T F, m the posterior mean). Score: mean over classes of the per-sample log
  evidence  [D/2 log alpha + N/2 log beta - N/2 log 2pi - beta/2 |Fm - y|^2 - alpha/2 |m|^2
  - 1/2 log det(alpha I + beta F^T F)] / N. Features are used as given (no centring, no bias), as in the
  paper. O(N D^2 + D^3) through the eigendecomposition of F^T F (D x D) when N > D, O(N^2 D + N^3) through
  F F^T (N x N) when N <= D; then O(C) per iteration. Both paths share the nonzero spectrum, keep the same
  components (eigenvalues above max * max(N, D) * eps) and give the same value; the D - rank zero
  directions cancel exactly from the evidence. The component of y outside the kept span is computed
  directly, never as a difference of norms. Guards: |m|^2 and the residual floored (tiny and
  1e-12 |y|^2) so alpha, beta stay finite when a target is orthogonal to, or exactly inside, the span
  of the features (possible when N <= D); alpha capped at 1e15 beta s_max, where a class the features
  do not explain (alpha -> infinity, w -> 0) has reached its limiting evidence; the iteration stops when
  alpha and beta move by less than ``tol`` (relative) or after ``max_iter`` steps.
- ``leep`` (Nguyen et al., ICML 2020). Empirical joint P(y, z) = 1/N sum_{i: y_i = y} theta(x_i)_z from the
  soft source predictions theta, P(y | z) = P(y, z) / P(z); LEEP = 1/N sum_i log sum_z P(y_i | z)
  theta(x_i)_z. O(N C_s C). A source class no sample predicts (P(z) = 0) gets P(y | z) = 0; it carries no
  weight in any sample's sum.
- ``nce`` (Tran et al., ICCV 2019). With hard source labels z (the argmax of ``probs`` when probabilities
  are given): NCE = -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z) from the empirical joint. O(N + C_s C).
  0 when z determines y; -H(Y) when they are independent.
- ``hscore`` (Bao et al., ICIP 2019). H = tr(cov(f)^+ cov(E[f | y])), both covariances over the N samples
  (1/N), cov(E[f|y]) = sum_c (n_c / N)(mu_c - mu)(mu_c - mu)^T. Regulariser: the Moore-Penrose
  pseudo-inverse of cov(f) from its eigendecomposition, eigenvalues below 1e-10 x the largest dropped; no
  ridge, because a ridge breaks the score's invariance to an invertible linear map of the features, which
  the pseudo-inverse keeps (the between-class covariance lies in the range of the total covariance).
  O(N D^2 + D^3). With N <= D the total covariance is rank-deficient and the score saturates near C - 1.
- ``gbc`` (Pandy et al., CVPR 2022). Each class a Gaussian N(mu_c, diag(var_c)), diagonal covariance as in
  the reference implementation (``gaussian="spherical"`` averages the variance over dimensions);
  population variance floored at 1e-4 (also as in the reference, so scale-dependent) for constant
  features and singleton classes. Bhattacharyya distance between diagonal Gaussians
  DB = 1/8 sum (mu_1 - mu_2)^2 / v + 1/2 sum log(v / sqrt(v_1 v_2)), v = (v_1 + v_2) / 2; GBC =
  -sum over ordered pairs c != c' of exp(-DB) (twice the unordered sum, as in the paper). In [-C(C-1), 0]:
  -C(C-1) for identical classes, 0 for separated ones. No PCA by default (the paper projects ~2048-dim
  features to 64; the project's LeNet features are 84-dim); ``pca_dim=k`` first projects the centred
  features on their top-k principal axes (a rotation, not a whitening). O(N D + C^2 D).
- ``knn`` (leave-one-out k-NN accuracy on the frozen features; arXiv 2503.18528 found this simple baseline
  strong). Euclidean distance, each sample's own distance excluded; neighbours ordered by (distance,
  index); majority vote, a tie going to the tied class with the nearest neighbour. k is clipped to N - 1.
  O(N^2 D) time (plus a partition of each row), O(N x block) memory (rows in blocks).

Label-free (``needs_labels=False``; for ranking sources without the target's labels):

- ``entropy``: the negative mean Shannon entropy (nats) of the source softmax rows, sum_z p log p averaged
  over samples: 0 for one-hot predictions, -log C_s for uniform ones. O(N C_s).
- ``nuclear-norm`` (Deng et al., ICML 2023, "Confidence and dispersity speak"): |P|_* / sqrt(N min(N, C_s))
  for the N x C_s softmax matrix P. The normaliser is the upper bound |P|_* <= sqrt(rank) |P|_F <=
  sqrt(min(N, C_s)) sqrt(N) (each row has |p|_2 <= 1), reached by confident predictions spread evenly over
  the classes; so the score lies in (0, 1]: 1/C_s for uniform rows, 1/sqrt(C_s) when every sample gets
  the same one-hot prediction. O(N C_s min(N, C_s)).
- ``silhouette``: k-means (scikit-learn, ``k`` clusters, default 10, fixed seed, best of 4 starts) in the
  features, then the mean silhouette of that clustering (Euclidean), in [-1, 1]. If the features hold fewer than two
  distinct clusters (e.g. constant features) the score is -1, the worst. O(N k D per k-means iteration
  + N^2 D).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy.special import xlogy
from ..errors import UserError

__all__ = ["ESTIMATORS", "Estimator", "estimate", "gbc", "hscore", "kmeans_silhouette", "knn_accuracy",
           "leep", "logme", "nce", "nuclear_norm", "prediction_entropy"]

LOGME_PATHS = ("auto", "feature", "sample")
_PROB_SUM_ATOL = 1e-3
_GBC_VAR_FLOOR = 1e-4
_HSCORE_RCOND = 1e-10


# --- input checks: one-line ValueErrors that name the fix -------------------------------------------


def _as_matrix(x: Any, what: str, shape: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise UserError(f"{what} must be a numeric array, got dtype {a.dtype}: pass a float array of shape {shape}")
    a = a.astype(np.float64)
    if a.ndim != 2:
        raise UserError(f"{what} must be 2-D {shape}, got shape {a.shape}: reshape it to {shape}")
    if a.shape[0] < 2:
        raise UserError(f"{what} has {a.shape[0]} row(s); the estimators need at least 2 samples: pass more samples")
    if a.shape[1] < 1:
        raise UserError(f"{what} has no columns, shape {a.shape}: pass a non-empty {shape} array")
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise UserError(f"{what} contain {bad} NaN or inf value(s): drop or fix those samples")
    return a


def _features(features: Any) -> np.ndarray:
    return _as_matrix(features, "features", "(N, D)")


def _probs(probs: Any) -> np.ndarray:
    p = _as_matrix(probs, "probs", "(N, C_s)")
    if (p < 0).any():
        raise UserError("probs has negative entries: pass softmax probabilities, not logits")
    sums = p.sum(axis=1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > _PROB_SUM_ATOL:
        raise UserError(f"probs rows must sum to 1 (off by up to {worst:.3g}): pass softmax probabilities, "
                         "not logits or scores")
    return p / sums[:, None]


def _codes(values: Any, n: int, what: str, rows_of: str) -> tuple[np.ndarray, int]:
    """Values remapped to 0..K-1 (sorted order of the distinct values), checked against N."""
    v = np.asarray(values)
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.ndim != 1:
        raise UserError(f"{what} must be 1-D (N,), got shape {v.shape}: pass one integer label per sample")
    if v.shape[0] != n:
        raise UserError(f"{what} has {v.shape[0]} entries but {rows_of} has {n} rows: pass one label per row "
                         f"of {rows_of}")
    if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
        raise UserError(f"{what} contain NaN or inf: drop the unlabelled samples")
    _, codes = np.unique(v, return_inverse=True)
    codes = codes.reshape(-1).astype(np.intp)
    return codes, int(codes.max()) + 1


def _labels(labels: Any, n: int, rows_of: str) -> tuple[np.ndarray, int]:
    if labels is None:
        raise UserError("labels are missing: pass labels= (one target label per sample), or use a label-free "
                         f"estimator: {', '.join(n for n, e in ESTIMATORS.items() if not e.needs_labels)}")
    codes, c = _codes(labels, n, "labels", rows_of)
    if c < 2:
        raise UserError("labels hold a single class; the estimators need at least 2: pass samples of two or "
                         "more classes")
    return codes, c


def _onehot(codes: np.ndarray, c: int) -> np.ndarray:
    y = np.zeros((codes.shape[0], c))
    y[np.arange(codes.shape[0]), codes] = 1.0
    return y


# --- LogME -----------------------------------------------------------------------------------------


def _logme_spectrum(f: np.ndarray, y: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept eigenvalues s (k,) of F^T F, the squared coordinates z^2 (k, C) of y on the matching left
    singular vectors, and |y - P y|^2 (C,), the part of y outside their span."""
    n, d = f.shape
    if path == "sample":  # F F^T = U diag(s) U^T, N x N; U is a complete orthonormal basis of R^N
        s, u = np.linalg.eigh(f @ f.T)
        keep = s > max(float(s[-1]), 0.0) * max(n, d) * np.finfo(np.float64).eps
        proj = u.T @ y
        return s[keep], proj[keep] ** 2, (proj[~keep] ** 2).sum(axis=0)
    # F^T F = V diag(s) V^T, D x D; u_i = F v_i / sqrt(s_i), so z_i = v_i^T F^T y / sqrt(s_i)
    s, v = np.linalg.eigh(f.T @ f)
    keep = s > max(float(s[-1]), 0.0) * max(n, d) * np.finfo(np.float64).eps
    s, v = s[keep], v[:, keep]
    w = v.T @ (f.T @ y)                       # (k, C) = sqrt(s) * z
    coef = v @ (w / s[:, None])               # least-squares weights; F coef = projection of y
    outside = ((y - f @ coef) ** 2).sum(axis=0)
    return s, w ** 2 / s[:, None], outside


def _logme_evidence(s: np.ndarray, z2: np.ndarray, outside: np.ndarray, n: int, tol: float,
                    max_iter: int) -> np.ndarray:
    """Per-class maximised log evidence / N, all classes iterated together (columns of z2)."""
    c = z2.shape[1]
    k = s.shape[0]
    tiny = np.finfo(np.float64).tiny
    y2 = z2.sum(axis=0) + outside
    res_floor = 1e-12 * y2 + tiny
    alpha = np.ones(c)
    beta = np.ones(c)
    sc = s[:, None]
    alpha_cap = 1e15 * (float(s.max()) if k else 1.0)

    def moments(alpha, beta):
        den = alpha + beta * sc                               # (k, C)
        gamma = (beta * sc / den).sum(axis=0)
        m2 = (beta ** 2 * sc * z2 / den ** 2).sum(axis=0)     # |m|^2
        res = (z2 * (alpha / den) ** 2).sum(axis=0) + outside  # |F m - y|^2
        return den, gamma, m2, res

    for _ in range(max_iter):
        _, gamma, m2, res = moments(alpha, beta)
        new_beta = np.maximum(n - gamma, tiny) / np.maximum(res, res_floor)
        # alpha -> infinity (w -> 0: the features explain nothing of this class) is a legitimate limit the
        # iteration approaches geometrically; cap alpha / (beta s_max) at 1e15, where the evidence has
        # reached that limit to double precision, so that it stops instead of overflowing.
        new_alpha = np.minimum(np.where(gamma > 0, gamma / np.maximum(m2, tiny), 1.0), alpha_cap * new_beta)
        done = (np.abs(new_alpha - alpha) <= tol * alpha).all() and (np.abs(new_beta - beta) <= tol * beta).all()
        alpha, beta = new_alpha, new_beta
        if done:
            break
    den, _, m2, res = moments(alpha, beta)
    # D/2 log alpha - 1/2 log det(alpha I + beta F^T F): the D - k null directions contribute
    # log alpha to both and cancel, leaving k/2 log alpha - 1/2 sum over the kept spectrum.
    evidence = (k / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * np.maximum(res, res_floor) - alpha / 2 * m2 - 0.5 * np.log(den).sum(axis=0))
    return evidence / n


def logme(features, labels, *, path: str = "auto", tol: float = 1e-8, max_iter: int = 1000) -> float:
    """LogME: the mean over classes of the per-sample maximised log evidence of Bayesian linear regression
    from the features to the one-hot class indicator.

    ``path`` picks the eigendecomposition: ``"feature"`` (F^T F, D x D), ``"sample"`` (F F^T, N x N) or
    ``"auto"`` (feature when N > D, else sample); the value does not depend on it.
    """
    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    if path not in LOGME_PATHS:
        raise UserError(f"unknown LogME path '{path}'; known: {', '.join(LOGME_PATHS)}")
    if not (tol > 0 and max_iter >= 1):
        raise UserError(f"LogME needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    n, d = f.shape
    if path == "auto":
        path = "feature" if n > d else "sample"
    s, z2, outside = _logme_spectrum(f, _onehot(codes, c), path)
    return float(_logme_evidence(s, z2, outside, n, tol, max_iter).mean())


# --- LEEP, NCE -------------------------------------------------------------------------------------


def leep(source_probs, labels) -> float:
    """LEEP: the mean log-likelihood of the target labels under the empirical predictor
    sum_z P(y | z) theta(x)_z built from the source softmax theta."""
    theta = _probs(source_probs)
    codes, c = _labels(labels, theta.shape[0], "probs")
    n = theta.shape[0]
    joint = _onehot(codes, c).T @ theta / n                  # (C, C_s): P(y, z)
    pz = joint.sum(axis=0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P(y | z)
    eep = np.einsum("iz,iz->i", theta, cond[codes])           # sum_z P(y_i | z) theta_iz
    return float(np.mean(np.log(np.maximum(eep, np.finfo(np.float64).tiny))))


def nce(source_labels, labels) -> float:
    """NCE: -H(Y | Z) of the target labels Y given the source's hard predictions Z (a (N,) array of source
    labels, or a (N, C_s) probability array whose argmax is taken)."""
    z = np.asarray(source_labels)
    what = "source_labels"
    if z.ndim == 2 and z.shape[1] > 1:
        z, what = _probs(z).argmax(axis=1), "probs"
    z_codes, cz = _codes(z, z.shape[0] if z.ndim else 0, what, what)
    codes, c = _labels(labels, z_codes.shape[0], what)
    n = codes.shape[0]
    joint = np.bincount(z_codes * c + codes, minlength=cz * c).reshape(cz, c) / n  # P(z, y)
    pz = joint.sum(axis=1, keepdims=True)
    return float(np.sum(xlogy(joint, joint) - xlogy(joint, pz)))


# --- H-score, GBC, k-NN ----------------------------------------------------------------------------


def hscore(features, labels) -> float:
    """H-score: tr(cov(f)^+ cov(E[f | y])), the pseudo-inverse dropping eigenvalues below 1e-10 x max."""
    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    n = f.shape[0]
    f = f - f.mean(axis=0)
    cov = f.T @ f / n
    counts = np.bincount(codes, minlength=c).astype(np.float64)
    means = (_onehot(codes, c).T @ f) / counts[:, None]       # (C, D), centred class means
    between = (means * counts[:, None]).T @ means / n
    ev, q = np.linalg.eigh(cov)
    keep = ev > _HSCORE_RCOND * max(float(ev[-1]), 0.0)
    if not keep.any():
        return 0.0
    qk = q[:, keep]
    return float(np.sum(np.diag(qk.T @ between @ qk) / ev[keep]))


def _pca(f: np.ndarray, dim: int) -> np.ndarray:
    f = f - f.mean(axis=0)
    if dim >= f.shape[1]:
        return f
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    return f @ vt[:dim].T


def gbc(features, labels, *, gaussian: str = "diagonal", pca_dim: int | None = None) -> float:
    """GBC: minus the Bhattacharyya coefficients between the per-class Gaussians of the features, summed
    over ordered class pairs; 0 for separated classes, -C(C-1) for identical ones."""
    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    if gaussian not in ("diagonal", "spherical"):
        raise UserError(f"unknown GBC gaussian '{gaussian}'; known: diagonal, spherical")
    if pca_dim is not None:
        if int(pca_dim) < 1:
            raise UserError(f"pca_dim must be >= 1 or None, got {pca_dim}")
        f = _pca(f, int(pca_dim))
    onehot = _onehot(codes, c)
    counts = onehot.sum(axis=0)[:, None]
    mu = onehot.T @ f / counts                                 # (C, D)
    var = onehot.T @ (f - mu[codes]) ** 2 / counts             # population variance, centred per class
    var = np.maximum(var, _GBC_VAR_FLOOR)
    if gaussian == "spherical":
        var = np.repeat(var.mean(axis=1, keepdims=True), f.shape[1], axis=1)
    v = (var[:, None, :] + var[None, :, :]) / 2                # (C, C, D)
    first = ((mu[:, None, :] - mu[None, :, :]) ** 2 / v).sum(axis=2) / 8
    logv = np.log(var).sum(axis=1)
    second = 0.5 * (np.log(v).sum(axis=2) - 0.5 * (logv[:, None] + logv[None, :]))
    bc = np.exp(-(first + second))
    np.fill_diagonal(bc, 0.0)
    return float(-bc.sum())


def _nearest(d: np.ndarray, k: int) -> np.ndarray:
    """The k smallest entries of each row of d, ordered by (distance, column index)."""
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    dk = np.take_along_axis(d, part, axis=1)
    order = np.lexsort((part, dk), axis=1)                      # by distance, then by index
    nb = np.take_along_axis(part, order, axis=1)
    # argpartition breaks ties at the k-th distance arbitrarily: redo rows with such a tie exactly
    kth = np.take_along_axis(d, nb[:, -1:], axis=1)
    tied = (d <= kth).sum(axis=1) > k
    if tied.any():
        nb[tied] = np.argsort(d[tied], axis=1, kind="stable")[:, :k]
    return nb


def knn_accuracy(features, labels, k: int = 5, *, block: int = 1024) -> float:
    """Leave-one-out k-NN accuracy (Euclidean, majority vote, ties to the class of the nearest tied
    neighbour, equal distances ordered by sample index)."""
    f = _features(features)
    codes, _ = _labels(labels, f.shape[0], "features")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}: pass k >= 1")
    n = f.shape[0]
    k = min(int(k), n - 1)
    sq = (f ** 2).sum(axis=1)
    correct = 0
    for start in range(0, n, max(int(block), 1)):
        stop = min(start + max(int(block), 1), n)
        d = sq[start:stop, None] + sq[None, :] - 2.0 * (f[start:stop] @ f.T)
        np.maximum(d, 0.0, out=d)
        rows = np.arange(stop - start)
        d[rows, np.arange(start, stop)] = np.inf
        nb = _nearest(d, k)                                      # (b, k), nearest first
        nb_labels = codes[nb]
        votes = (nb_labels[:, :, None] == nb_labels[:, None, :]).sum(axis=2)  # votes for each neighbour's class
        first = np.argmax(votes == votes.max(axis=1, keepdims=True), axis=1)
        pred = nb_labels[rows, first]
        correct += int((pred == codes[start:stop]).sum())
    return correct / n


# --- label-free scores -----------------------------------------------------------------------------


def prediction_entropy(probs) -> float:
    """Minus the mean entropy (nats) of the softmax rows: higher = more confident predictions."""
    p = _probs(probs)
    return float(np.mean(xlogy(p, p).sum(axis=1)))


def nuclear_norm(probs) -> float:
    """The nuclear norm of the (N, C_s) softmax matrix over its upper bound sqrt(N min(N, C_s)), in (0, 1]."""
    p = _probs(probs)
    n, c = p.shape
    return float(np.linalg.svd(p, compute_uv=False).sum() / np.sqrt(n * min(n, c)))


def kmeans_silhouette(features, k: int = 10, *, seed: int = 0, n_init: int = 4) -> float:
    """The silhouette of a k-means clustering (``k`` clusters, fixed ``seed``, best of ``n_init`` k-means++
    starts) of the features; -1 when the features do not hold two distinct clusters. ``k`` defaults to the
    project's ten classes."""
    f = _features(features)
    n = f.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n - 1:
        raise UserError(f"k must be an integer in 2..N-1 = 2..{n - 1}, got {k!r}: pass the expected number of "
                         "classes as k")
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k: handled below
        assign = KMeans(n_clusters=int(k), n_init=int(n_init), random_state=seed).fit_predict(f)
    n_found = np.unique(assign).shape[0]
    if n_found < 2 or n_found > n - 1:
        return -1.0
    return float(silhouette_score(f, assign, metric="euclidean"))


# --- registry and entry point ----------------------------------------------------------------------


@dataclass(frozen=True)
class Estimator:
    """One registered score. ``needs``: the array it reads ("features", "probs" or "source_labels", the
    last also accepting ``probs`` and taking their argmax); ``fn(x, labels, **options)``, or ``fn(x,
    **options)`` when ``needs_labels`` is False. Every score is higher = better transfer."""

    name: str
    needs: str
    fn: Callable[..., float]
    needs_labels: bool = True

    def __post_init__(self):
        if self.needs not in ("features", "probs", "source_labels"):
            raise UserError(f"Estimator.needs must be features, probs or source_labels, got '{self.needs}'")


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("logme", "features", logme),
    Estimator("leep", "probs", leep),
    Estimator("nce", "source_labels", nce),
    Estimator("hscore", "features", hscore),
    Estimator("gbc", "features", gbc),
    Estimator("knn", "features", knn_accuracy),
    Estimator("entropy", "probs", prediction_entropy, needs_labels=False),
    Estimator("nuclear-norm", "probs", nuclear_norm, needs_labels=False),
    Estimator("silhouette", "features", kmeans_silhouette, needs_labels=False),
)}

_WHAT = {"features": "features= (the source model's (N, D) features on the target samples)",
         "probs": "probs= (the source model's (N, C_s) softmax on the target samples)",
         "source_labels": "probs= (the source softmax) or source_labels= (its (N,) predicted labels)"}


def estimate(name: str, *, features=None, probs=None, labels=None, source_labels=None, **options) -> float:
    """The score of estimator ``name`` (see :data:`ESTIMATORS`), inputs checked first; higher = better.

    Pass what the estimator needs (``features``, ``probs``, or for ``nce`` either ``source_labels`` or
    ``probs``) and ``labels`` unless it is label-free (labels are then ignored); ``options`` go to the
    function (``k=`` for knn and silhouette, ``path=`` for logme, ``pca_dim=`` for gbc). Every problem is
    a one-line ValueError that names the fix.
    """
    try:
        est = ESTIMATORS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}") from None
    if est.needs == "features":
        x = features
    elif est.needs == "probs":
        x = probs
    else:
        x = source_labels if source_labels is not None else probs
    if x is None:
        raise UserError(f"estimator '{name}' needs {_WHAT[est.needs]}: pass it")
    if est.needs_labels:
        return float(est.fn(x, labels, **options))
    return float(est.fn(x, **options))

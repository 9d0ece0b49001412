"""Transferability estimators: one score per (frozen source model, labelled target data), higher = better.

Pure functions on numpy arrays (numpy and scipy; scikit-learn only for k-means, the Gaussian mixture and
NCTI's PCA and LDA, imported lazily), no training, no Ray, no torch. Written from the papers' formulas (NCTI
from its authors' code). Inputs: ``features`` (N, D), the source model's penultimate features on the target
samples; ``probs`` (N, C_s), its softmax; ``logits`` (N, C_s), its pre-softmax outputs; ``labels`` (N,), the
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

- ``sfda`` (Shao et al., ECCV 2022, "Not all models are equal"). A regularised Fisher discriminant: S_w =
  sum_c pi_c cov_c (pi_c = n_c / N, population covariances), S_t the total covariance, both shrunk as
  S(lambda) = (1 - lambda) S + lambda tr(S)/D I with the paper's adaptive lambda = max(exp(-5 sigma_max(S_w)),
  1e-10) (sigma_max the largest eigenvalue of S_w, computed exactly where the reference code takes three
  power iterations), S_b = S_t(lambda) - S_w(lambda). The projection V solves S_b v = e S_w(lambda) v
  (scipy's generalised eigh, V^T S_w(lambda) V = I); the class posterior of the projected features is
  softmax_c(f V V^T mu_c - 1/2 mu_c^T V V^T mu_c + log pi_c), all D directions kept as in the authors'
  ``predict_proba`` (so V V^T = S_w(lambda)^-1). ConfMix (the reference code's self-challenging step):
  p_i = softmax over classes of the posteriors themselves (a softening), at the sample's own class;
  x_i <- p_i x_i + (1 - p_i) m_{y_i}, m_c the mean of the other classes' means; then the same Fisher
  posterior again, with the first lambda, on the mixed features. Score: the mean posterior of the true
  class (no log, as in the reference), in (0, 1]. Features are centred first (the posterior is
  translation-invariant; centring keeps dead units out of S_w(lambda)^-1). Invariant to rotations and
  shifts of the features, not to their scale (lambda reads sigma_max). Guards: S_w's ridge is
  lambda max(tr(S_w)/D, 1e-12 tr(S_t)/D), so S_w(lambda) stays definite when every class collapses to
  a point; constant features give the class priors. O(N D^2 + D^3).
- ``ncti`` (Wang et al., ICCV 2023, "How far pre-trained models are from neural collapse on the target
  dataset informs their transferability"), following the authors' code (BUserName/NCTI, also in
  OpenGVLab/Multitask-Model-Selector). X = the features on their top k = min(64, N - 1, D) principal axes
  (scikit-learn's PCA, exact SVD solver: the reference's default solver turns randomised, unseeded, for
  large inputs); shrinkage s = max(exp(-sum of the top-32 PCA variances), 1e-10); a linear discriminant
  (scikit-learn's LDA) fitted to (X, y): ``solver="svd"`` when s = 1e-10, else ``solver="eigen"`` with
  ``shrinkage=s``. Three terms per model: S_seli = |Z - mean(Z)|_*, the nuclear norm of the centred LDA
  projection Z (N, <= C - 1) (the simplex-ETF term, higher = better); S_ncc = 1/N sum_i P[i, y_i], the mean
  LDA posterior of the true class (the nearest-centre term, higher = better); S_vc = log sum_c
  |P[y == c]|_*, the summed nuclear norms of each class's posterior rows (within-class variability, higher =
  worse). Across candidates (``Estimator.combine``): each term min-max normalised over the candidates scored
  together, NCTI = seli_n + ncc_n - vc_n (equal weights), in [-1, 2]; a term equal for every candidate
  (always so for a single candidate) normalises to 0, so one model scored alone gets 0: NCTI ranks models
  against each other, :func:`ncti_terms` gives the raw terms [S_seli, S_ncc, S_vc]. Invariant to rotations
  and shifts of the features (PCA's axis signs change only the signs of Z's columns and not P), and their
  scale enters through s alone (the LDA projection whitens the within-class scatter): scaling changes
  nothing while s stays at 1e-10, i.e. top-32 variances summing to at least 10 ln 10 ~ 23.0. Guards: N > C
  (the discriminant needs it; a one-line error otherwise); rank-deficient features pass (the shrunk
  covariance stays definite, the svd solver drops null directions); constant features give the
  discriminant's limit without fitting it: Z = 0 (S_seli = 0), the class priors pi as every posterior (S_ncc
  = sum_c pi_c^2, S_vc = log(|pi|_2 sum_c sqrt(n_c)), each class's rows rank 1). O(N D min(N, D)) for the
  PCA, O(N k^2 + k^3) for the LDA, O(N C^2) for the nuclear norms.
- ``parc`` (Bolya et al., NeurIPS 2021). The centred features projected on their top k = min(32, rank)
  principal axes (the paper's 32; each axis signed so that its largest-magnitude coordinate is
  positive, so the result does not depend on the SVD's signs), each axis standardised (the reference
  code's StandardScaler); D_f = 1 - the Pearson correlation between the samples' reduced feature
  vectors, D_y = 1 - the Pearson correlation between their one-hot labels (0 within a class, C/(C-1)
  across); PARC = Spearman's rho between the upper triangles of D_f and D_y (the paper's rank
  correlation; the reference code's x100 dropped), in [-1, 1]. Guards: a sample whose reduced vector is
  constant (always so with k = 1) correlates 0 with every other; a constant triangle (e.g. every class
  a single sample) gives 0. Invariant to rotations, shifts and isotropic scaling of the features.
  O(N D min(N, D) + N^2 k + N^2 log N) time, O(N^2) memory.
- ``transrate`` (Huang et al., ICML 2022). On the centred features Z, the coding rate R(Z, eps) =
  1/2 logdet(I_D + Z^T Z / (n eps)) (n the rows of Z), eps = 1e-4 as in the paper's code, and
  TransRate = R(Z) - 1/C sum_c R(Z_c), Z_c the rows of class c (not re-centred), as in the reference
  code. Computed as 1/2 sum log1p(s_i^2 / (n eps)) over Z's singular values (no determinant, no
  overflow). Invariant to rotations and shifts of the features, not to their scale (eps is absolute).
  O(N D min(N, D)).
- ``nleep`` (Li et al., CVPR 2021, "Ranking neural checkpoints"). The centred features projected on the
  fewest principal axes whose variance reaches 80% of the total (scikit-learn's rule for
  ``PCA(n_components=0.8)``), a Gaussian mixture of 5 components per target class (full covariances,
  scikit-learn's ``GaussianMixture``, ``random_state`` fixed, components capped at N) fitted to them
  without labels (on the samples sorted by their signed principal coordinates, so that the order they
  come in does not move EM's seeded start), then LEEP with the mixture's posteriors p(z | x) in place
  of the source softmax.
  In [log of the label prior's geometric mean, 0]-ish: 0 when every component is pure. Constant
  features (zero variance) give one zero coordinate. Scale enters only through the mixture's
  ``reg_covar`` (1e-6). O(N D min(N, D)) + EM: O(N K d^2 + K d^3) per iteration (K = 5C, d kept axes).

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
- ``energy`` (ETran, Gholami et al., ICCV 2023: its energy score). From the source model's LOGITS q (N,
  C_s): mean_i T logsumexp(q_i / T), T = 1, minus the free energy: higher = the samples look more
  in-distribution to the source model. scipy's logsumexp (no overflow). Shift-equivariant: adding b to
  every logit adds b. O(N C_s).
- ``mano`` (Xie et al., NeurIPS 2024, "MaNo"). From the logits: the calibration proxy Phi = mean_i
  KL(uniform || softmax(q_i)) = mean_i (-log C_s - 1/C_s sum_k log softmax(q_i)_k) picks the
  normalisation (the paper's "softrun"): softmax when Phi >= eta = 5, else the second-order Taylor
  normalisation sigma(q)_k = v_k / sum_j v_j, v = 1 + q + q^2/2 (> 0 for every real q). MaNo =
  (1/(N C_s) sum_ik sigma_ik^p)^(1/p), p = 4: the normalised entrywise L_p norm, in [1/C_s, 1]-ish
  (1/C_s for uniform rows, C_s^(-1/p) for one-hot ones). A label-free accuracy estimate that needs no
  head for the target's classes. Guards: the Taylor terms are computed on q / max(1, max_k |q_k|) per
  row (the ratio is unchanged, nothing overflows); log_softmax for Phi. O(N C_s).

Cross-candidate scores: an estimator with ``combine`` (NCTI) returns raw per-model terms from its
function; :func:`combine_scores` turns the raw values of the candidates scored together into their
scores, and ``simex select`` applies it after scoring every classifier. :func:`estimate` returns the
score of one model alone (the combine step over that single candidate).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy.special import xlogy
from ..errors import UserError

__all__ = ["ESTIMATORS", "Estimator", "NEEDS", "combine_scores", "energy", "estimate", "gbc", "hscore",
           "kmeans_silhouette", "knn_accuracy", "leep", "logme", "mano", "mano_normalise", "ncti_combine",
           "ncti_terms", "nce", "nleep", "nuclear_norm", "parc", "prediction_entropy", "raw_score", "sfda",
           "transrate"]

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


# --- SFDA, NCTI, PARC, TransRate, N-LEEP ------------------------------------------------------------


def _shrink(cov: np.ndarray, lam: float, ridge_scale: float) -> np.ndarray:
    """(1 - lam) cov + lam * ridge_scale * I (ridge_scale: tr(cov)/D, floored by the caller)."""
    out = (1.0 - lam) * cov
    out.flat[::cov.shape[0] + 1] += lam * ridge_scale
    return out


def _fisher_posterior(f: np.ndarray, codes: np.ndarray, c: int, lam: float | None) -> tuple[np.ndarray, float]:
    """SFDA's class posteriors (N, C) of centred features ``f`` and the shrinkage used (adaptive when None)."""
    from scipy.linalg import eigh
    from scipy.special import softmax

    n, d = f.shape
    counts = np.bincount(codes, minlength=c).astype(np.float64)
    priors = counts / n
    means = _onehot(codes, c).T @ f / counts[:, None]           # (C, D)
    within = f - means[codes]
    sw = within.T @ within / n                                   # sum_c pi_c cov_c
    mean = f.mean(axis=0)
    st = (f - mean).T @ (f - mean) / n
    tr_t = float(np.trace(st)) / d
    if tr_t <= 0.0:                                              # constant features: nothing separates classes
        return np.tile(priors, (n, 1)), (1e-10 if lam is None else lam)
    if lam is None:
        lam = max(float(np.exp(-5.0 * np.linalg.eigvalsh(sw)[-1])), 1e-10)
    floor = 1e-12 * tr_t
    sw_l = _shrink(sw, lam, max(float(np.trace(sw)) / d, floor))
    st_l = _shrink(st, lam, max(tr_t, floor))
    _, v = eigh(st_l - sw_l, sw_l)                               # V^T S_w(lambda) V = I
    coef = (means @ v) @ v.T                                     # (C, D) = means S_w(lambda)^-1
    logits = f @ coef.T - 0.5 * np.einsum("cd,cd->c", means, coef) + np.log(priors)
    return softmax(logits, axis=1), lam


def sfda(features, labels, *, shrinkage: float | None = None) -> float:
    """SFDA: the mean Fisher-discriminant posterior of the true class after the ConfMix step; in (0, 1].

    ``shrinkage``: lambda in [0, 1) instead of the paper's adaptive exp(-5 sigma_max(S_w))."""
    from scipy.special import softmax

    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    if shrinkage is not None and not 0.0 <= float(shrinkage) < 1.0:
        raise UserError(f"shrinkage must be in [0, 1) or None, got {shrinkage}: pass a value in [0, 1), or None "
                        "for the paper's adaptive lambda")
    f = f - f.mean(axis=0)
    n = f.shape[0]
    rows = np.arange(n)
    prob, lam = _fisher_posterior(f, codes, c, shrinkage)
    own = softmax(prob, axis=1)[rows, codes][:, None]            # the reference code's softening
    counts = np.bincount(codes, minlength=c)[:, None]
    means = _onehot(codes, c).T @ f / counts
    others = (means.sum(axis=0) - means) / (c - 1)               # mean of the other classes' means
    mixed = own * f + (1.0 - own) * others[codes]
    prob, _ = _fisher_posterior(mixed, codes, c, lam)
    return float(prob[rows, codes].mean())


_NCTI_PCA_DIM, _NCTI_SHRINK_DIM = 64, 32   # the authors' PCA width and the variances their shrinkage reads


def ncti_terms(features, labels) -> np.ndarray:
    """NCTI's raw terms of one model, (3,): [S_seli (nuclear norm of the centred LDA projection, higher =
    better), S_ncc (mean LDA posterior of the true class, higher = better), S_vc (log of the summed
    per-class nuclear norms of the LDA posteriors, higher = worse)], as in the authors' code."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    n, d = f.shape
    if n <= c:
        raise UserError(f"NCTI's discriminant needs more samples than classes, got {n} samples of {c} classes: "
                        "pass more labelled samples")
    counts = np.bincount(codes, minlength=c).astype(np.float64)
    if not np.ptp(f, axis=0).any():      # constant features: the discriminant predicts the class priors
        priors = counts / n
        vc = np.log(np.sqrt(counts).sum() * np.linalg.norm(priors))        # each P[y == c] rank 1
        return np.array([0.0, float(priors @ priors), float(vc)])
    pca = PCA(n_components=min(_NCTI_PCA_DIM, n - 1, d), svd_solver="full")
    x = pca.fit_transform(f)                                                  # (N, k)
    shrink = max(float(np.exp(-pca.explained_variance_[:_NCTI_SHRINK_DIM].sum())), 1e-10)
    if shrink == 1e-10:
        lda = LinearDiscriminantAnalysis(solver="svd")
    else:
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=shrink)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variables are collinear")  # rank-deficient features: handled
        low = lda.fit_transform(x, codes)                                     # (N, <= C - 1)
        post = lda.predict_proba(x)                                           # (N, C), columns = codes 0..C-1
    low = low - low.mean(axis=0)
    s_seli = float(np.linalg.svd(low, compute_uv=False).sum())
    s_ncc = float(post[np.arange(n), codes].mean())
    s_vc = float(np.log(sum(np.linalg.svd(post[codes == k], compute_uv=False).sum() for k in range(c))))
    return np.array([s_seli, s_ncc, s_vc])


_NCTI_SIGNS = np.array([1.0, 1.0, -1.0])     # seli and ncc count for a model, vc against it


def ncti_combine(terms) -> np.ndarray:
    """NCTI over the candidates scored together: ``terms`` (M, 3) raw [S_seli, S_ncc, S_vc] -> (M,) scores
    seli_n + ncc_n - vc_n, each term min-max normalised over the M candidates (a term equal for every
    candidate, or a single candidate, normalises to 0)."""
    t = np.asarray(terms, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != _NCTI_SIGNS.size:
        raise UserError(f"NCTI combines an (M, 3) array of per-model terms, got shape {t.shape}: pass one row "
                        f"per candidate (its ncti_terms)")
    lo, hi = t.min(axis=0), t.max(axis=0)
    span = hi - lo
    norm = np.divide(t - lo, span, out=np.zeros_like(t), where=span > 0)
    return norm @ _NCTI_SIGNS


def _principal(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred ``f``'s principal coordinates (N, r) and variances (r,) over its numerical rank r, each axis
    signed so that its largest-magnitude coordinate is positive (independent of the SVD's signs)."""
    f = f - f.mean(axis=0)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    r = int((s > s[0] * max(f.shape) * np.finfo(np.float64).eps).sum()) if s[0] > 0 else 0
    z = u[:, :r] * s[:r]
    if r:
        z *= np.sign(z[np.argmax(np.abs(z), axis=0), np.arange(r)])
    return z, s[:r] ** 2 / f.shape[0]


def parc(features, labels, *, pca_dim: int = 32) -> float:
    """PARC: Spearman's rho between the samples' feature dissimilarities (1 - Pearson, on the top
    ``pca_dim`` standardised principal coordinates) and their label dissimilarities; in [-1, 1]."""
    from scipy.stats import rankdata

    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    if isinstance(pca_dim, bool) or not isinstance(pca_dim, (int, np.integer)) or pca_dim < 1:
        raise UserError(f"pca_dim must be a positive integer, got {pca_dim!r}: pass e.g. 32")
    z, var = _principal(f)
    if z.shape[1] == 0:                                          # constant features: no dissimilarity
        return 0.0
    z = z[:, :pca_dim] / np.sqrt(var[:pca_dim])                 # standardised axes
    z = z - z.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.divide(z, norm, out=np.zeros_like(z), where=norm > 1e-12 * max(float(norm.max(initial=0.0)), 1e-300))
    n = f.shape[0]
    iu = np.triu_indices(n, 1)
    d_f = 1.0 - (z @ z.T)[iu]
    d_y = (codes[iu[0]] != codes[iu[1]]) * (c / (c - 1))
    r_f, r_y = rankdata(d_f), rankdata(d_y)
    r_f, r_y = r_f - r_f.mean(), r_y - r_y.mean()
    den = np.sqrt((r_f ** 2).sum() * (r_y ** 2).sum())
    return float((r_f @ r_y) / den) if den > 0 else 0.0


def _coding_rate(z: np.ndarray, eps: float) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    return 0.5 * float(np.log1p(s ** 2 / (z.shape[0] * eps)).sum())


def transrate(features, labels, *, eps: float = 1e-4) -> float:
    """TransRate: the coding-rate difference R(Z) - 1/C sum_c R(Z_c) of the centred features, in nats."""
    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    if not eps > 0:
        raise UserError(f"eps must be > 0, got {eps}: pass e.g. 1e-4")
    f = f - f.mean(axis=0)
    return _coding_rate(f, eps) - float(np.mean([_coding_rate(f[codes == k], eps) for k in range(c)]))


def nleep(features, labels, *, components_per_class: int = 5, variance: float = 0.8, seed: int = 0) -> float:
    """N-LEEP: LEEP with the posteriors of a Gaussian mixture (``components_per_class`` x C components,
    fixed ``seed``) fitted to the features' principal coordinates that keep ``variance`` of the total."""
    f = _features(features)
    codes, c = _labels(labels, f.shape[0], "features")
    if isinstance(components_per_class, bool) or not isinstance(components_per_class, (int, np.integer)) \
            or components_per_class < 1:
        raise UserError(f"components_per_class must be a positive integer, got {components_per_class!r}: pass "
                        "e.g. 5")
    if not 0.0 < float(variance) <= 1.0:
        raise UserError(f"variance must be in (0, 1], got {variance}: pass e.g. 0.8")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    z, var = _principal(f)
    if z.shape[1] == 0:
        z = np.zeros((f.shape[0], 1))
    else:
        ratio = np.cumsum(var) / var.sum()
        z = z[:, :int(np.searchsorted(ratio, float(variance), side="right")) + 1]
    k = min(int(components_per_class) * c, f.shape[0])
    # EM's start (k-means++ from a seeded generator) picks samples by position: fit on the samples in one
    # canonical order (by their signed principal coordinates) so that the order they come in changes nothing.
    canonical = z[np.lexsort(z.T[::-1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture = GaussianMixture(n_components=k, covariance_type="full", random_state=seed).fit(canonical)
    post = mixture.predict_proba(z)
    return leep(post, codes)


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


def _logits(logits: Any) -> np.ndarray:
    return _as_matrix(logits, "logits", "(N, C_s)")


def energy(logits, *, temperature: float = 1.0) -> float:
    """The energy score: mean_i T logsumexp(logits_i / T), higher = more in-distribution for the source."""
    from scipy.special import logsumexp

    q = _logits(logits)
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}: pass e.g. 1")
    return float(np.mean(temperature * logsumexp(q / temperature, axis=1)))


def mano_normalise(logits, *, eta: float = 5.0) -> np.ndarray:
    """MaNo's "softrun" normalisation of the logits (N, C_s): softmax when the calibration proxy Phi =
    mean KL(uniform || softmax) is at least ``eta``, else the second-order Taylor normalisation."""
    from scipy.special import log_softmax

    q = _logits(logits)
    logp = log_softmax(q, axis=1)
    phi = float(np.mean(-np.log(q.shape[1]) - logp.mean(axis=1)))
    if phi >= eta:
        return np.exp(logp)
    m = np.maximum(np.abs(q).max(axis=1, keepdims=True), 1.0)
    v = (1.0 + q) / m / m + (q / m) ** 2 / 2                     # (1 + q + q^2/2) / m^2: no overflow
    return v / v.sum(axis=1, keepdims=True)


def mano(logits, *, p: float = 4.0, eta: float = 5.0) -> float:
    """MaNo: the normalised entrywise L_p norm (1/(N C_s) sum sigma^p)^(1/p) of the softrun-normalised
    logits; higher = more accurate predictions expected."""
    if not p >= 1:
        raise UserError(f"p must be >= 1, got {p}: pass e.g. 4")
    s = mano_normalise(logits, eta=eta)
    return float(np.mean(s ** p) ** (1.0 / p))


# --- registry and entry point ----------------------------------------------------------------------


NEEDS = ("features", "probs", "source_labels", "logits")


@dataclass(frozen=True)
class Estimator:
    """One registered score. ``needs``: the array it reads ("features", "probs", "logits" or
    "source_labels", the last also accepting ``probs`` and taking their argmax); ``fn(x, labels,
    **options)``, or ``fn(x, **options)`` when ``needs_labels`` is False. Every score is higher = better
    transfer. ``combine``: for a score defined across the candidates scored together (NCTI), ``fn``
    returns one model's raw terms (T,) and ``combine`` maps the (M, T) terms of M candidates to their M
    scores; None for the others, whose ``fn`` returns the score itself."""

    name: str
    needs: str
    fn: Callable[..., Any]
    needs_labels: bool = True
    combine: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise UserError(f"Estimator.needs must be one of {', '.join(NEEDS)}, got '{self.needs}'")


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("logme", "features", logme),
    Estimator("leep", "probs", leep),
    Estimator("nce", "source_labels", nce),
    Estimator("hscore", "features", hscore),
    Estimator("gbc", "features", gbc),
    Estimator("knn", "features", knn_accuracy),
    Estimator("sfda", "features", sfda),
    Estimator("ncti", "features", ncti_terms, combine=ncti_combine),
    Estimator("parc", "features", parc),
    Estimator("transrate", "features", transrate),
    Estimator("nleep", "features", nleep),
    Estimator("entropy", "probs", prediction_entropy, needs_labels=False),
    Estimator("nuclear-norm", "probs", nuclear_norm, needs_labels=False),
    Estimator("silhouette", "features", kmeans_silhouette, needs_labels=False),
    Estimator("energy", "logits", energy, needs_labels=False),
    Estimator("mano", "logits", mano, needs_labels=False),
)}

_WHAT = {"features": "features= (the source model's (N, D) features on the target samples)",
         "probs": "probs= (the source model's (N, C_s) softmax on the target samples)",
         "logits": "logits= (the source model's (N, C_s) pre-softmax outputs on the target samples)",
         "source_labels": "probs= (the source softmax) or source_labels= (its (N,) predicted labels)"}


def _estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}") from None


def raw_score(name: str, *, features=None, probs=None, logits=None, labels=None, source_labels=None,
              **options) -> Any:
    """One model's value before the cross-candidate step: the score itself (a float), or for an
    estimator with ``combine`` (NCTI) its raw terms (an array). Inputs as for :func:`estimate`."""
    est = _estimator(name)
    if est.needs == "features":
        x = features
    elif est.needs == "probs":
        x = probs
    elif est.needs == "logits":
        x = logits
    else:
        x = source_labels if source_labels is not None else probs
    if x is None:
        raise UserError(f"estimator '{name}' needs {_WHAT[est.needs]}: pass it")
    value = est.fn(x, labels, **options) if est.needs_labels else est.fn(x, **options)
    return float(value) if est.combine is None else np.asarray(value, dtype=np.float64)


def combine_scores(name: str, raw: dict[str, Any]) -> dict[str, float]:
    """The scores of the candidates scored together, from their :func:`raw_score` values (candidate ->
    value): ``combine`` applied over all of them, or the values themselves."""
    est = _estimator(name)
    if est.combine is None or not raw:
        return {c: float(v) for c, v in raw.items()}
    names = list(raw)
    return dict(zip(names, map(float, est.combine(np.stack([raw[c] for c in names])))))


def estimate(name: str, *, features=None, probs=None, logits=None, labels=None, source_labels=None,
             **options) -> float:
    """The score of estimator ``name`` (see :data:`ESTIMATORS`) for one model, inputs checked first;
    higher = better.

    Pass what the estimator needs (``features``, ``probs``, ``logits``, or for ``nce`` either
    ``source_labels`` or ``probs``) and ``labels`` unless it is label-free (labels are then ignored);
    ``options`` go to the function (``k=`` for knn and silhouette, ``path=`` for logme, ``pca_dim=`` for
    gbc and parc, ``eps=`` for transrate, ``shrinkage=`` for sfda). An estimator defined across candidates
    (NCTI) scores one model as a single candidate (0: rank several with :func:`combine_scores`). Every
    problem is a one-line ValueError that names the fix.
    """
    raw = raw_score(name, features=features, probs=probs, logits=logits, labels=labels,
                    source_labels=source_labels, **options)
    return combine_scores(name, {"model": raw})["model"]

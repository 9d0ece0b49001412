"""Known answers and invariances of the transferability estimators (simex_ray.transfer.estimators)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from simex_ray.transfer.estimators import (ESTIMATORS, Estimator, estimate, gbc, hscore, kmeans_silhouette,
                                           knn_accuracy, leep, logme, nce, nuclear_norm, prediction_entropy)

LABEL_BASED = ("logme", "leep", "nce", "hscore", "gbc", "knn")
LABEL_FREE = ("entropy", "nuclear-norm", "silhouette")


def blobs(n=300, d=20, c=3, sep=4.0, seed=0):
    """Gaussian classes, class c shifted by ``sep`` along axis c."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    f = rng.normal(size=(n, d))
    f[np.arange(n), y] += sep
    return f, y


def source_probs(y, c_s=4, agree=0.9, seed=0):
    """A soft source classifier whose argmax follows the target label with probability ``agree``."""
    rng = np.random.default_rng(seed)
    n = len(y)
    z = np.where(rng.random(n) < agree, y % c_s, rng.integers(0, c_s, n))
    logits = rng.normal(scale=0.3, size=(n, c_s))
    logits[np.arange(n), z] += 3.0
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def inputs(name, f, y, p):
    needs = ESTIMATORS[name].needs
    return {"features": f} if needs == "features" else {"probs": p}


# --- LogME -----------------------------------------------------------------------------------------


def test_logme_separable_beats_shuffled_labels():
    f, y = blobs()
    shuffled = np.random.default_rng(1).permutation(y)
    assert logme(f, y) > logme(f, shuffled) + 0.3


@pytest.mark.parametrize("n,d", [(60, 10), (20, 50), (30, 30)])
def test_logme_same_through_both_eigendecompositions(n, d):
    rng = np.random.default_rng(n + d)
    f, y = rng.normal(size=(n, d)), rng.integers(0, 3, n)
    assert logme(f, y, path="feature") == pytest.approx(logme(f, y, path="sample"), abs=1e-9)
    assert logme(f, y) == pytest.approx(logme(f, y, path="feature"), abs=1e-9)


def test_logme_rank_deficient_features_same_through_both_paths():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(40, 4)) @ rng.normal(size=(4, 12))   # rank 4 in 12 dims
    f = np.hstack([f, np.zeros((40, 2))])                       # and two dead units
    y = rng.integers(0, 2, 40)
    assert logme(f, y, path="feature") == pytest.approx(logme(f, y, path="sample"), abs=1e-9)


def test_logme_is_the_maximised_log_evidence():
    """Mean over classes of max_{alpha,beta} log N(y_c; 0, F F^T / alpha + I / beta) / N, found directly."""
    rng = np.random.default_rng(0)
    n, d = 40, 5
    y = rng.integers(0, 2, n)
    f = rng.normal(size=(n, d))
    f[:, 0] += 2 * y
    per_class = []
    for c in range(2):
        t = (y == c).astype(float)

        def neg(p, t=t):
            cov = np.exp(-p[0]) * f @ f.T + np.exp(-p[1]) * np.eye(n)
            return -multivariate_normal(np.zeros(n), cov).logpdf(t) / n

        per_class.append(-minimize(neg, [0.0, 0.0], method="Nelder-Mead",
                                   options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000}).fun)
    assert logme(f, y) == pytest.approx(np.mean(per_class), abs=1e-7)


def test_logme_invariant_to_feature_scale():
    f, y = blobs(n=120, d=8)
    assert logme(1e3 * f, y) == pytest.approx(logme(f, y), abs=1e-7)


def test_logme_useless_features_stay_finite():
    """Constant-zero features, and features orthogonal to every target (alpha -> infinity)."""
    y = np.array([0, 1] * 10)
    assert np.isfinite(logme(np.zeros((20, 3)), y))
    orthogonal = np.c_[np.r_[np.ones(10), -np.ones(10)], np.tile([1.0, 1.0, -1.0, -1.0], 5)]
    assert np.abs(orthogonal.T @ np.eye(2)[y]).max() == 0.0
    assert np.isfinite(logme(orthogonal, y))
    assert logme(orthogonal, y) < logme(np.eye(2)[y] + 0.1 * orthogonal, y)


# --- LEEP, NCE -------------------------------------------------------------------------------------


def test_leep_hand_computed_2x2():
    theta = np.array([[0.8, 0.2], [0.3, 0.7]])
    y = np.array([0, 1])
    # P(y, z) = [[0.40, 0.10], [0.15, 0.35]], P(z) = [0.55, 0.45]
    p0 = 0.8 * 0.40 / 0.55 + 0.2 * 0.10 / 0.45
    p1 = 0.3 * 0.15 / 0.55 + 0.7 * 0.35 / 0.45
    assert leep(theta, y) == pytest.approx((np.log(p0) + np.log(p1)) / 2, abs=1e-12)


def test_leep_is_zero_for_a_one_hot_source_that_determines_the_labels():
    y = np.array([0, 0, 1, 1, 2, 2])
    theta = np.eye(3)[[1, 1, 2, 2, 0, 0]]                      # source class = (y + 1) mod 3
    assert leep(theta, y) == pytest.approx(0.0, abs=1e-12)


def test_leep_uninformative_source_gives_the_label_log_prior():
    y = np.array([0, 0, 0, 1])
    theta = np.full((4, 3), 1 / 3)
    expected = (3 * np.log(0.75) + np.log(0.25)) / 4
    assert leep(theta, y) == pytest.approx(expected, abs=1e-12)


def test_nce_is_zero_when_source_labels_determine_target_labels():
    z = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])                      # y = z // 2
    assert nce(z, y) == pytest.approx(0.0, abs=1e-12)


def test_nce_is_minus_label_entropy_when_independent():
    # every source class sees the targets in the same proportions 1:3
    z = np.repeat([0, 1, 2], 4)
    y = np.tile([0, 1, 1, 1], 3)
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert nce(z, y) == pytest.approx(-h, abs=1e-12)


def test_nce_takes_the_argmax_of_probabilities():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = source_probs(y, c_s=3, agree=0.7, seed=2)
    assert nce(p, y) == nce(p.argmax(axis=1), y)
    assert estimate("nce", probs=p, labels=y) == estimate("nce", source_labels=p.argmax(axis=1), labels=y)


# --- H-score, GBC, k-NN ----------------------------------------------------------------------------


def test_hscore_invariant_to_invertible_linear_map_and_shift():
    f, y = blobs(n=200, d=6)
    a = np.random.default_rng(5).normal(size=(6, 6)) + 3 * np.eye(6)
    assert hscore(f @ a + 7.0, y) == pytest.approx(hscore(f, y), rel=1e-8)


def test_hscore_known_values():
    # one feature equal to the class: all variance is between classes
    assert hscore(np.array([[0.0], [0.0], [1.0], [1.0]]), [0, 0, 1, 1]) == pytest.approx(1.0)
    # class means equal: nothing between classes
    assert hscore(np.array([[0.0], [2.0], [0.0], [2.0]]), [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)


def test_hscore_separable_beats_shuffled():
    f, y = blobs()
    assert hscore(f, y) > 3 * hscore(f, np.random.default_rng(1).permutation(y))


def test_gbc_more_negative_for_overlapping_classes():
    near, y = blobs(sep=0.5)
    far, _ = blobs(sep=6.0)
    assert gbc(near, y) < gbc(far, y) - 1.0
    assert -6.0 <= gbc(near, y) <= 0.0                          # C(C-1) = 6 ordered pairs


def test_gbc_identical_classes_give_minus_number_of_ordered_pairs():
    x = np.random.default_rng(0).normal(size=(10, 4))
    f = np.vstack([x, x, x])                                    # three classes, same mean and variance
    y = np.repeat([0, 1, 2], 10)
    assert gbc(f, y) == pytest.approx(-6.0, abs=1e-12)
    assert gbc(f, y, gaussian="spherical") == pytest.approx(-6.0, abs=1e-12)


def test_gbc_pca_option_keeps_the_ordering():
    near, y = blobs(d=30, sep=0.5)
    far, _ = blobs(d=30, sep=6.0)
    assert gbc(near, y, pca_dim=8) < gbc(far, y, pca_dim=8)


def test_knn_is_one_on_separated_clusters_and_near_chance_on_random_labels():
    f, y = blobs(n=600, sep=12.0)
    assert knn_accuracy(f, y) == 1.0
    random_labels = np.random.default_rng(4).integers(0, 3, 600)
    assert abs(knn_accuracy(f, random_labels) - 1 / 3) < 0.08


def test_knn_tie_rule_is_deterministic_nearest_tied_class():
    # x = 0, 1, -1.5 labelled 2, 1, 2; k = 2. Sample 0: a 1-1 tie between class 1 (at 1) and class 2 (at 1.5)
    # goes to class 1 (wrong); sample 1: two votes for class 2 (wrong); sample 2: a tie between class 2
    # (at 1.5) and class 1 (at 2.5) goes to class 2 (right). "Smallest label wins" would give 0/3,
    # "largest label wins" 2/3.
    f = np.array([[0.0], [1.0], [-1.5]])
    assert knn_accuracy(f, np.array([2, 1, 2]), k=2) == pytest.approx(1 / 3)
    # equal distances: samples 1 and 2 are both at distance 1 from sample 0; the lower index is nearer
    f3 = np.array([[0.0], [1.0], [-1.0]])
    assert knn_accuracy(f3, np.array([5, 5, 7]), k=1) == pytest.approx(2 / 3)
    g, y = blobs(n=50, sep=1.0)
    assert knn_accuracy(g, y, k=4, block=7) == knn_accuracy(g, y, k=4)


# --- every label-based estimator -------------------------------------------------------------------


@pytest.mark.parametrize("name", LABEL_BASED)
def test_invariant_to_renaming_classes(name):
    f, y = blobs(n=150, sep=2.0, seed=3)
    p = source_probs(y, seed=3)
    renamed = np.array([30, 10, 20])[y]                         # a permutation, and non-contiguous values
    a = estimate(name, labels=y, **inputs(name, f, y, p))
    b = estimate(name, labels=renamed, **inputs(name, f, y, p))
    assert a == pytest.approx(b, abs=1e-10)


@pytest.mark.parametrize("name", LABEL_BASED)
def test_higher_for_informative_source_than_for_shuffled_labels(name):
    f, y = blobs(n=300, sep=3.0, seed=6)
    p = source_probs(y, agree=0.9, seed=6)
    shuffled = np.random.default_rng(7).permutation(y)
    assert estimate(name, labels=y, **inputs(name, f, y, p)) > estimate(name, labels=shuffled,
                                                                          **inputs(name, f, y, p))


def test_estimate_equals_the_functions():
    f, y = blobs(n=100)
    p = source_probs(y)
    assert estimate("logme", features=f, labels=y) == logme(f, y)
    assert estimate("leep", probs=p, labels=y) == leep(p, y)
    assert estimate("knn", features=f, labels=y, k=3) == knn_accuracy(f, y, k=3)
    assert estimate("gbc", features=f, labels=y, pca_dim=4) == gbc(f, y, pca_dim=4)
    assert estimate("entropy", probs=p, labels=y) == prediction_entropy(p)   # labels ignored


def test_registry():
    assert set(ESTIMATORS) == set(LABEL_BASED) | set(LABEL_FREE)
    for name, est in ESTIMATORS.items():
        assert isinstance(est, Estimator) and est.name == name
        assert est.needs_labels == (name in LABEL_BASED)
        assert est.needs in ("features", "probs", "source_labels")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ESTIMATORS["logme"].name = "x"                          # frozen


# --- label-free ------------------------------------------------------------------------------------


def test_prediction_entropy_known_values():
    assert prediction_entropy(np.full((5, 4), 0.25)) == pytest.approx(-np.log(4))
    assert prediction_entropy(np.eye(4)) == pytest.approx(0.0)
    assert prediction_entropy(np.eye(4)) > prediction_entropy(source_probs(np.arange(8) % 4))


def test_nuclear_norm_known_values():
    n, c = 12, 4
    balanced = np.eye(c)[np.arange(n) % c]                      # confident and dispersed: the upper bound
    collapsed = np.eye(c)[np.zeros(n, dtype=int)]               # confident, one class
    uniform = np.full((n, c), 1 / c)                            # not confident
    assert nuclear_norm(balanced) == pytest.approx(1.0)
    assert nuclear_norm(collapsed) == pytest.approx(1 / np.sqrt(c))
    assert nuclear_norm(uniform) == pytest.approx(1 / c)


def test_silhouette_separated_clusters_beat_noise_and_is_deterministic():
    f, _ = blobs(n=150, d=5, sep=10.0)
    noise = np.random.default_rng(0).normal(size=(150, 5))
    s = kmeans_silhouette(f, k=3)
    assert s > 0.6 and s > kmeans_silhouette(noise, k=3) + 0.3
    assert kmeans_silhouette(f, k=3) == s
    assert estimate("silhouette", features=f, k=3) == s


def test_silhouette_constant_features_are_the_worst():
    assert kmeans_silhouette(np.ones((20, 3)), k=3) == -1.0


# --- estimate: errors are one line and name the fix ------------------------------------------------


def one_line_error(match, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        estimate(**kwargs)
    text = str(info.value)
    assert "\n" not in text and ":" in text, text
    return text


def test_estimate_errors_name_the_fix():
    f, y = blobs(n=30)
    p = source_probs(y)
    text = one_line_error("unknown estimator", name="logmee", features=f, labels=y)
    assert all(n in text for n in ESTIMATORS)
    one_line_error("needs features=", name="logme", probs=p, labels=y)
    one_line_error("needs probs=", name="leep", features=f, labels=y)
    one_line_error("source_labels=", name="nce", features=f, labels=y)
    one_line_error("2-D .*reshape", name="hscore", features=f[:, 0], labels=y)
    one_line_error("29 entries but features has 30 rows", name="logme", features=f, labels=y[:-1])
    one_line_error("single class.*two or more", name="gbc", features=f, labels=np.zeros(30))
    one_line_error("labels are missing.*label-free.*entropy", name="knn", features=f)
    bad = f.copy()
    bad[3, 2] = np.nan
    one_line_error("NaN or inf.*drop or fix", name="logme", features=bad, labels=y)
    one_line_error("labels must be 1-D", name="logme", features=f, labels=np.c_[y, y])
    one_line_error("not logits", name="leep", probs=np.log(p), labels=y)
    one_line_error("not logits", name="entropy", probs=3 * p)
    one_line_error("at least 2 samples", name="knn", features=f[:1], labels=y[:1])
    one_line_error("positive integer", name="knn", features=f, labels=y, k=0)
    one_line_error("k must be an integer in 2..N-1", name="silhouette", features=f, k=1)
    one_line_error("unknown LogME path", name="logme", features=f, labels=y, path="svd")
    one_line_error("numeric array", name="logme", features=[["a", "b"], ["c", "d"]], labels=[0, 1])

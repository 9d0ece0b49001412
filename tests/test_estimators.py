"""Known answers and invariances of the transferability estimators (simex_ray.transfer.estimators)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from simex_ray.choices import LABEL_FREE_METHODS
from simex_ray.transfer.estimators import (ESTIMATORS, NEEDS, Estimator, combine_scores, energy, estimate, gbc,
                                           hscore, kmeans_silhouette, knn_accuracy, leep, logme, mano,
                                           mano_normalise, ncti_combine, ncti_terms, nce, nleep, nuclear_norm, parc,
                                           prediction_entropy, raw_score, sfda, transrate)

LABEL_BASED = ("logme", "leep", "nce", "hscore", "gbc", "knn", "sfda", "ncti", "parc", "transrate", "nleep")
LABEL_FREE = ("entropy", "nuclear-norm", "silhouette", "energy", "mano")
NEW = ("sfda", "ncti", "parc", "transrate", "nleep", "energy", "mano")


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


def inputs(name, f, y, p, q=None):
    needs = ESTIMATORS[name].needs
    if needs == "logits":
        return {"logits": np.log(p) if q is None else q}
    return {"features": f} if needs == "features" else {"probs": p}


def rotation(d, seed=0):
    """A random orthogonal (d, d) matrix."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


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
    a = raw_score(name, labels=y, **inputs(name, f, y, p))
    b = raw_score(name, labels=renamed, **inputs(name, f, y, p))
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", LABEL_BASED)
def test_higher_for_informative_source_than_for_shuffled_labels(name):
    f, y = blobs(n=300, sep=3.0, seed=6)
    p = source_probs(y, agree=0.9, seed=6)
    shuffled = np.random.default_rng(7).permutation(y)
    # scored together, as `simex select` scores candidates (NCTI's combine step needs them side by side)
    s = combine_scores(name, {"true": raw_score(name, labels=y, **inputs(name, f, y, p)),
                              "shuffled": raw_score(name, labels=shuffled, **inputs(name, f, y, p))})
    assert s["true"] > s["shuffled"]


@pytest.mark.parametrize("name", NEW)
def test_new_estimators_do_not_depend_on_sample_order(name):
    f, y = blobs(n=120, d=6, sep=2.0, seed=8)
    q = np.random.default_rng(8).normal(scale=2.0, size=(120, 5))
    order = np.random.default_rng(9).permutation(120)
    a = raw_score(name, features=f, logits=q, labels=y)
    b = raw_score(name, features=f[order], logits=q[order], labels=y[order])
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


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
    assert set(LABEL_FREE_METHODS) == {"simex", *LABEL_FREE}
    # label-using ones first, then the label-free ones
    assert list(ESTIMATORS) == [*LABEL_BASED, *LABEL_FREE]
    for name, est in ESTIMATORS.items():
        assert isinstance(est, Estimator) and est.name == name
        assert est.needs_labels == (name in LABEL_BASED)
        assert est.needs in NEEDS
        assert (est.combine is not None) == (name == "ncti")
    assert {ESTIMATORS[m].needs for m in ("energy", "mano")} == {"logits"}
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


# --- SFDA ------------------------------------------------------------------------------------------


def _sklearn_fisher_posterior(x, y, lam):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    p = LinearDiscriminantAnalysis(solver="eigen", shrinkage=lam).fit(x, y).predict_proba(x)
    return p if p.shape[1] > 1 else np.c_[1 - p, p]


def test_sfda_equals_an_independent_computation_through_sklearn_lda():
    """SFDA's Fisher posterior is scikit-learn's shrunk eigen-LDA (the reference code is a copy of it); with
    the paper's lambda and the reference's ConfMix written as a loop, the score is the same number."""
    f, y = blobs(n=90, d=5, c=3, sep=1.5, seed=11)
    f = f + 3.0                                                 # sklearn sees uncentred features
    sw = sum(np.mean(y == c) * np.cov(f[y == c].T, bias=True) for c in range(3))
    lam = max(np.exp(-5 * np.linalg.eigvalsh(sw).max()), 1e-10)
    prob = _sklearn_fisher_posterior(f, y, lam)
    soft = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)
    means = np.array([f[y == c].mean(axis=0) for c in range(3)])
    mixed = f.copy()
    for i in range(len(y)):
        other = np.mean([means[c] for c in range(3) if c != y[i]], axis=0)
        mixed[i] = soft[i, y[i]] * f[i] + (1 - soft[i, y[i]]) * other
    expected = np.mean(_sklearn_fisher_posterior(mixed, y, lam)[np.arange(len(y)), y])
    assert sfda(f, y) == pytest.approx(expected, abs=1e-8)
    # a fixed lambda goes straight through
    assert sfda(f, y, shrinkage=0.3) != pytest.approx(sfda(f, y), abs=1e-6)


def test_sfda_invariant_to_rotation_and_shift_and_higher_for_separated_classes():
    f, y = blobs(n=150, d=6, sep=1.0, seed=12)
    assert sfda(f @ rotation(6) - 4.0, y) == pytest.approx(sfda(f, y), abs=1e-9)
    far, _ = blobs(n=150, d=6, sep=5.0, seed=12)
    assert 0.0 < sfda(f, y) < sfda(far, y) <= 1.0


def test_sfda_constant_features_give_the_prior_and_collapsed_classes_stay_finite():
    y = np.array([0, 0, 0, 1])
    assert sfda(np.ones((4, 3)), y) == pytest.approx(0.75 * 0.75 + 0.25 * 0.25)   # mean prior of the true class
    collapsed = np.eye(3)[[0, 0, 1, 1, 2, 2]]                   # every class a single point: S_w = 0
    assert 0.9 < sfda(collapsed, [0, 0, 1, 1, 2, 2]) <= 1.0


# --- NCTI ------------------------------------------------------------------------------------------


def _ncti_reference(f, y, signs=None):
    """NCTI's terms written as the authors' code computes them (PCA to 64, LDA shrunk by exp(-sum of the
    top-32 variances)); ``signs`` flips PCA axes first."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    c = len(np.unique(y))
    pca = PCA(n_components=min(64, f.shape[0] - 1, f.shape[1]), svd_solver="full")
    x = pca.fit_transform(f)
    if signs is not None:
        x = x * signs
    temp = max(np.exp(-np.sum(pca.explained_variance_[:32])), 1e-10)
    if temp == 1e-10:
        clf = LinearDiscriminantAnalysis(solver="svd")
    else:
        clf = LinearDiscriminantAnalysis(solver="eigen", shrinkage=temp)
    low = clf.fit_transform(x, y)
    low = low - np.mean(low, axis=0, keepdims=True)
    seli = np.linalg.norm(low, ord="nuc")
    pred = clf.predict_proba(x)
    ncc = np.sum(pred[np.arange(len(y)), y]) / len(y)
    vc = np.log(sum(np.linalg.norm(pred[y == k], ord="nuc") for k in range(c)))
    return np.array([seli, ncc, vc]), temp


@pytest.mark.parametrize("scale, n, d, solver", [(0.3, 90, 6, "eigen"), (3.0, 90, 6, "svd"),
                                                 (0.1, 40, 80, "eigen"), (1.0, 14, 100, "svd")])
def test_ncti_terms_equal_the_authors_pca_and_lda(scale, n, d, solver):
    f, y = blobs(n=n, d=d, c=3, sep=2.0, seed=13)
    f = scale * f + 5.0
    ref, temp = _ncti_reference(f, y)
    assert (temp == 1e-10) == (solver == "svd")                  # both of the reference's branches covered
    np.testing.assert_allclose(ncti_terms(f, y), ref, rtol=1e-8)
    # the terms do not depend on the signs PCA gives its axes, so nor on rotations of the features
    signs = np.where(np.random.default_rng(1).random(min(64, n - 1, d)) < 0.5, -1.0, 1.0)
    np.testing.assert_allclose(_ncti_reference(f, y, signs)[0], ref, rtol=1e-8)
    np.testing.assert_allclose(ncti_terms(f @ rotation(d) - 2.0, y), ref, rtol=1e-7)
    if solver == "svd":                                          # scale enters through the shrinkage alone
        np.testing.assert_allclose(ncti_terms(4.0 * f, y), ref, rtol=1e-7)


def test_ncti_terms_invariant_to_label_names_and_sample_order():
    f, y = blobs(n=100, d=8, sep=1.5, seed=14)
    order = np.random.default_rng(14).permutation(100)
    renamed = np.array([30, 10, 20])[y]
    np.testing.assert_allclose(ncti_terms(f[order], renamed[order]), ncti_terms(f, y), rtol=1e-8)


def test_ncti_combine_min_max_normalises_each_term_over_the_candidates():
    terms = np.array([[10.0, 0.5, 3.0], [20.0, 0.9, 2.0], [15.0, 0.7, 4.0]])
    # seli -> 0, 1, .5; ncc -> 0, 1, .5; vc (counts against) -> .5, 0, 1
    np.testing.assert_allclose(ncti_combine(terms), [-0.5, 2.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(ncti_combine([[1.0, 0.5, 2.0], [3.0, 0.5, 2.0]]), [0.0, 1.0])  # equal terms: 0
    assert ncti_combine(terms[:1]).tolist() == [0.0]            # one candidate alone: well defined, 0
    f, y = blobs(n=60, d=4, seed=15)
    assert estimate("ncti", features=f, labels=y) == 0.0
    assert combine_scores("ncti", {"a": ncti_terms(f, y), "b": ncti_terms(f, y)}) == {"a": 0.0, "b": 0.0}


def test_ncti_separated_classes_score_higher_than_mixed_ones():
    mixed, y = blobs(n=120, d=5, sep=0.5, seed=16)
    far, _ = blobs(n=120, d=5, sep=4.0, seed=16)
    s = combine_scores("ncti", {"mixed": ncti_terms(mixed, y), "far": ncti_terms(far, y)})
    assert s["far"] > s["mixed"]
    t_mixed, t_far = ncti_terms(mixed, y), ncti_terms(far, y)
    assert t_far[0] > t_mixed[0] and t_far[1] > t_mixed[1]     # seli and ncc both favour the separated classes


def test_ncti_constant_features_and_too_few_samples():
    y = np.array([0, 0, 0, 1, 2, 2])
    pi = np.array([3, 1, 2]) / 6
    # nothing separates the classes: zero projection, the priors as posteriors (each class's rows rank 1)
    expect = [0.0, pi @ pi, np.log((np.sqrt(3) + 1 + np.sqrt(2)) * np.linalg.norm(pi))]
    np.testing.assert_allclose(ncti_terms(np.full((6, 4), 0.1), y), expect, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="more samples than classes") as info:
        ncti_terms(np.eye(3), [0, 1, 2])
    assert "\n" not in str(info.value)


# --- PARC ------------------------------------------------------------------------------------------


def _parc_loop(f, y, dim=32):
    from scipy.stats import spearmanr

    fc = f - f.mean(axis=0)
    w, v = np.linalg.eigh(fc.T @ fc)
    v = v[:, ::-1][:, :min(dim, np.sum(w > 1e-9 * w.max()))]
    z = fc @ v
    z = z * np.sign(z[np.argmax(np.abs(z), axis=0), np.arange(z.shape[1])])
    z = z / z.std(axis=0)
    onehot = np.eye(y.max() + 1)[y]
    df, dy = [], []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            df.append(1 - np.corrcoef(z[i], z[j])[0, 1])
            dy.append(1 - np.corrcoef(onehot[i], onehot[j])[0, 1])
    return spearmanr(df, np.round(dy, 12))[0]                   # 1.5 +- 2e-16 are the same dissimilarity


def test_parc_equals_a_loop_computation():
    f, y = blobs(n=40, d=5, c=3, sep=2.0, seed=16)
    assert parc(f, y) == pytest.approx(_parc_loop(f, y), abs=1e-10)
    g, z = blobs(n=30, d=8, c=2, sep=2.0, seed=17)
    assert parc(g, z, pca_dim=3) == pytest.approx(_parc_loop(g, z, dim=3), abs=1e-10)


def test_parc_invariant_to_similarity_maps_and_higher_for_separated_classes():
    f, y = blobs(n=100, d=6, sep=1.0, seed=18)
    assert parc(3.0 * f @ rotation(6) - 1.0, y) == pytest.approx(parc(f, y), abs=1e-9)
    far, _ = blobs(n=100, d=6, sep=6.0, seed=18)
    assert parc(far, y) > parc(f, y) + 0.1
    assert parc(np.ones((20, 3)), np.arange(20) % 2) == 0.0     # constant features: no information


# --- TransRate -------------------------------------------------------------------------------------


def test_transrate_hand_computed_and_equal_to_the_log_determinants():
    eps = 1e-4
    z = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])   # centred; class 0 on x, class 1 on y
    expected = np.log(1 + 1 / (2 * eps)) - 0.5 * np.log(1 + 1 / eps)
    assert transrate(z, [0, 0, 1, 1]) == pytest.approx(expected, rel=1e-12)

    def rate(a):
        return 0.5 * np.linalg.slogdet(np.eye(a.shape[1]) + a.T @ a / (len(a) * eps))[1]

    f, y = blobs(n=80, d=4, sep=2.0, seed=19)
    fc = f - f.mean(axis=0)
    direct = rate(fc) - np.mean([rate(fc[y == c]) for c in range(3)])
    assert transrate(f, y) == pytest.approx(direct, rel=1e-10)


def test_transrate_invariant_to_rotation_and_shift_and_higher_for_separated_classes():
    f, y = blobs(n=120, d=5, sep=1.0, seed=20)
    assert transrate(f @ rotation(5) + 3.0, y) == pytest.approx(transrate(f, y), rel=1e-10)
    far, _ = blobs(n=120, d=5, sep=5.0, seed=20)
    assert transrate(far, y) > transrate(f, y) + 0.5


# --- N-LEEP ----------------------------------------------------------------------------------------


def test_nleep_equals_leep_on_an_independent_pca_and_mixture():
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    f, y = blobs(n=90, d=6, c=3, sep=3.0, seed=21)
    z = PCA(n_components=0.8, svd_solver="full").fit_transform(f)
    z = z * np.sign(z[np.argmax(np.abs(z), axis=0), np.arange(z.shape[1])])   # N-LEEP's sign rule
    rows = sorted(range(90), key=lambda i: tuple(z[i]))                       # and its order of the samples
    post = GaussianMixture(n_components=15, covariance_type="full", random_state=0).fit(z[rows]).predict_proba(z)
    joint = np.array([[post[y == c, k].sum() for k in range(15)] for c in range(3)]) / 90
    cond = joint / joint.sum(axis=0)
    expected = np.mean([np.log(sum(cond[y[i], k] * post[i, k] for k in range(15))) for i in range(90)])
    assert nleep(f, y) == pytest.approx(expected, abs=1e-6)


def test_nleep_is_zero_for_pure_components_and_higher_for_separated_classes():
    f, y = blobs(n=90, d=3, c=3, sep=60.0, seed=22)             # tight, far apart: every component is pure
    assert nleep(f, y) == pytest.approx(0.0, abs=1e-9)
    near, _ = blobs(n=90, d=3, c=3, sep=0.5, seed=22)
    assert nleep(near, y) < nleep(blobs(n=90, d=3, c=3, sep=4.0, seed=22)[0], y) < 0.0
    assert np.isfinite(nleep(np.ones((12, 3)), np.arange(12) % 3))   # constant features, more components than 1


# --- energy, MaNo ----------------------------------------------------------------------------------


def test_energy_known_values_and_shift():
    assert energy(np.zeros((5, 4))) == pytest.approx(np.log(4))
    q = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]])          # log 4, and 1000 + log 2 without overflow
    assert energy(q) == pytest.approx((np.log(4) + 1000 + np.log(2)) / 2)
    r = np.random.default_rng(23).normal(size=(20, 6))
    assert energy(r + 2.5) == pytest.approx(energy(r) + 2.5)
    assert energy(r[:, ::-1]) == pytest.approx(energy(r))       # the order of the source classes
    assert energy(r, temperature=2.0) == pytest.approx(np.mean(2 * np.log(np.exp(r / 2).sum(axis=1))))
    assert energy(5 * np.eye(4)) > energy(np.zeros((4, 4)))     # confident beats undecided


def test_mano_known_values_through_both_normalisations():
    # uniform logits: Phi = 0 < 5, Taylor; every entry 1/C -> 1/C
    assert mano(np.zeros((6, 4))) == pytest.approx(0.25)
    # a Taylor row by hand: v = 1 + q + q^2/2 = (1, 2.5)
    q = np.array([[0.0, 1.0], [0.0, 1.0]])
    sig = np.array([1.0, 2.5]) / 3.5
    np.testing.assert_allclose(mano_normalise(q), [sig, sig])
    assert mano(q) == pytest.approx(np.mean(sig ** 4) ** 0.25)
    # very confident logits: Phi ~ 100 >= 5, softmax; one-hot rows -> C^(-1/4)
    assert mano(100.0 * np.eye(4)) == pytest.approx(4 ** -0.25)
    np.testing.assert_allclose(mano_normalise(100.0 * np.eye(4)), np.eye(4), atol=1e-40)


def test_mano_picks_softmax_exactly_from_eta_on():
    # two classes, logits (0, t): Phi = -log 2 + t/2 - log(1 + e^t) ... computed, then eta set on each side
    q = np.array([[0.0, 12.0]] * 3)
    logp = q - np.log(np.exp(q).sum(axis=1, keepdims=True))
    phi = np.mean(-np.log(2) - logp.mean(axis=1))
    soft = np.exp(logp)
    taylor = np.array([[1.0, 1 + 12 + 72]] * 3) / (2 + 12 + 72)
    np.testing.assert_allclose(mano_normalise(q, eta=phi), soft)
    np.testing.assert_allclose(mano_normalise(q, eta=phi + 1e-9), taylor)


def test_mano_stays_finite_for_huge_logits_and_is_invariant_to_orders():
    # Taylor, forced: v ~ q^2/2 dominates each row, so both rows are one-hot: (2 / 4)^(1/4)
    assert mano(np.array([[1e200, 0.0], [0.0, -1e200]]), eta=np.inf) == pytest.approx(0.5 ** 0.25)
    r = np.random.default_rng(24).normal(scale=3.0, size=(30, 5))
    assert mano(r[::-1, ::-1]) == pytest.approx(mano(r))
    assert mano(6 * np.eye(5)[np.arange(30) % 5]) > mano(r / 10)   # confident beats unsure


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
    # the seven later estimators
    one_line_error("needs logits=", name="energy", probs=p)
    one_line_error("needs logits=", name="mano", features=f)
    one_line_error("logits must be 2-D .*reshape", name="mano", logits=np.zeros(30))
    bad_q = np.zeros((30, 4))
    bad_q[0, 0] = np.nan
    one_line_error("logits contain 1 NaN", name="energy", logits=bad_q)
    one_line_error("temperature must be > 0", name="energy", logits=np.zeros((30, 4)), temperature=0)
    one_line_error("p must be >= 1", name="mano", logits=np.zeros((30, 4)), p=0.5)
    one_line_error("shrinkage must be in", name="sfda", features=f, labels=y, shrinkage=1.5)
    one_line_error("eps must be > 0", name="transrate", features=f, labels=y, eps=0)
    one_line_error("pca_dim must be a positive integer", name="parc", features=f, labels=y, pca_dim=0)
    one_line_error("components_per_class must be", name="nleep", features=f, labels=y, components_per_class=0)
    one_line_error("variance must be in", name="nleep", features=f, labels=y, variance=1.5)
    one_line_error("29 entries but features has 30 rows", name="ncti", features=f, labels=y[:-1])
    one_line_error("single class", name="transrate", features=f, labels=np.zeros(30))
    one_line_error("2-D .*reshape", name="parc", features=f[:, 0], labels=y)
    with pytest.raises(ValueError, match="one row per candidate") as info:
        ncti_combine(np.zeros(3))
    assert "\n" not in str(info.value)

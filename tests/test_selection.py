"""`simex select` and `simex train-bases`: which of my classifiers should I transfer from? (no Ray)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from simex_ray.protocol import ProtocolConfig, load_splits
from simex_ray.ranking import agreement
from simex_ray.transfer.ground_truth import compute_ground_truth
from simex_ray.transfer.library import Library
from simex_ray.transfer.selection import METHODS, SIMEX, needs_labels, select

REFS = ["digits", "bgrand:digits", "rotated:digits"]
TINY = ProtocolConfig(ae_epochs=1, clf_max_epochs=3, clf_patience=1, tl_configs=("TL-1",), seeds=(0,),
                      n_pairs=64, embedding_samples=100, test_samples=60, transfer_samples=100)


def simex(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "simex_ray.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def gt():
    return compute_ground_truth(REFS, samples=240, data_seed=0, model_seed=0, protocol=TINY)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    out = tmp_path_factory.mktemp("lib") / "lib"
    proc = simex("train-bases", "--refs", ",".join(REFS[:2]), "--samples", 240, "--no-ray", "--out", out)
    assert "2 classifier(s), 2 trained now" in proc.stderr
    return out


def test_every_method_scores_every_classifier_and_ranks_by_it(gt):
    lib = Library.in_memory(gt.bases)
    split = load_splits("rotated:digits", samples=240, data_seed=0, protocol=TINY)
    kw = split.clf_kwargs(TINY.transfer_samples)
    methods = [m for m in METHODS if m != SIMEX]
    sel = select(lib, kw["x_train"], kw["y_train"], methods=methods)
    for m in methods:
        assert set(sel.scores[m]) == set(lib.names) and all(np.isfinite(list(sel.scores[m].values())))
        ranked = sel.ranking(m)
        assert [sel.scores[m][c] for c in ranked] == sorted(sel.scores[m].values(), reverse=True)
        assert sel.seconds[m] > 0
    out = sel.to_json()
    assert out["needs_labels"] == {m: needs_labels(m) for m in methods}
    assert out["needs_labels"]["logme"] and not out["needs_labels"]["silhouette"]


def test_methods_that_cannot_run_are_one_line_errors_naming_the_fix(gt):
    lib = Library.in_memory(gt.bases)
    x = np.random.default_rng(0).random((20, 1, 28, 28)).astype(np.float32)
    with pytest.raises(ValueError, match="need the data's labels.*label-free method: simex, entropy"):
        select(lib, x, None, methods=["logme"])
    with pytest.raises(ValueError, match="needs the fleet.*--fleet"):
        select(lib, x, None, methods=["simex"])
    with pytest.raises(ValueError, match="unknown method.*known: simex, logme"):
        select(lib, x, None, methods=["logmee"])
    scores = select(lib, x, None, methods=["entropy"]).scores["entropy"]  # label-free: no labels needed
    assert set(scores) == set(lib.names) and all(np.isfinite(v) for v in scores.values())


def test_the_later_estimators_run_in_select_and_all_includes_them(gt):
    """sfda, ncti, parc, transrate, nleep (labels) and energy, mano (logits, no labels): offered by `--method all`
    as the data allows, scored by select(), NCTI combined over the classifiers scored together."""
    from scipy.special import softmax

    from simex_ray.transfer.estimators import energy, ncti_combine, ncti_terms
    from simex_ray.transfer.selection import available_methods

    new = ["sfda", "ncti", "parc", "transrate", "nleep", "energy", "mano"]
    assert set(new) <= set(available_methods(labelled=True, fleet=False))
    free = available_methods(labelled=False, fleet=False)
    assert {"energy", "mano"} <= set(free) and not set(new[:5]) & set(free)
    lib = Library.in_memory(gt.bases)
    kw = load_splits("rotated:digits", samples=240, data_seed=0, protocol=TINY).clf_kwargs(TINY.transfer_samples)
    x, y = kw["x_train"], kw["y_train"]
    sel = select(lib, x, y, methods=new)
    names = lib.names
    assert len(names) == 3 and all(np.isfinite(list(sel.scores[m].values())).all() for m in new)
    terms = np.stack([ncti_terms(lib.features(c, x), y) for c in names])
    assert [sel.scores["ncti"][c] for c in names] == pytest.approx(ncti_combine(terms).tolist(), abs=1e-12)
    assert max(sel.scores["ncti"].values()) > 0.0
    # the logits are the pre-softmax outputs: their softmax is the classifier's probabilities
    first = names[0]
    logits = lib.logits(first, x)
    assert logits.shape == (len(x), 10) and logits.dtype == np.float64
    np.testing.assert_allclose(softmax(logits, axis=1), lib.probabilities(first, x), rtol=1e-4, atol=1e-6)
    assert sel.scores["energy"][first] == pytest.approx(energy(logits))
    # one candidate alone: NCTI is defined (0), every other score is what it was among the three
    one = select(lib, x, y, methods=new, classifiers=[first])
    assert one.scores["ncti"] == {first: 0.0}
    for m in new:
        if m != "ncti":
            assert one.scores[m][first] == pytest.approx(sel.scores[m][first], rel=1e-9)


def test_inter_dataset_estimators_agree_like_the_formula_says(gt):
    from simex_ray.experiments.inter_dataset import estimator_matrices, selection_table

    splits = {r: load_splits(r, samples=240, data_seed=0, protocol=TINY) for r in REFS}
    est = estimator_matrices(gt, REFS, splits, TINY)
    assert set(est) == set(METHODS) - {SIMEX}
    lib = Library.in_memory(gt.bases)
    # Row X, column B(Y): the estimator on X's transfer-training split through B(Y), nothing else.
    kw = splits["bgrand:digits"].clf_kwargs(TINY.transfer_samples)
    direct = select(lib, kw["x_train"], kw["y_train"], methods=["logme"], classifiers=["digits@s0"])
    assert est["logme"]["matrix"][1][0] == pytest.approx(direct.scores["logme"]["digits@s0"])
    # Higher score = better transfer: ρ is taken on its negative, as for a distance.
    r = agreement(-np.asarray(est["knn"]["matrix"]), gt.targets(), REFS)
    rows = selection_table({"rho_mean": 0.1, "rho_mean_strict": 0.2, "rho_mean_per_unknown": 0.3}, 1.0, {}, 0.0,
                           {k: {**v, **agreement(-np.asarray(v["matrix"]), gt.targets(), REFS)}
                            for k, v in est.items()})
    knn = next(row for row in rows if row["method"] == "knn")
    assert knn["rho_mean"] == pytest.approx(r["rho_mean"]) and knn["needs_labels"] is True
    assert rows[0]["method"] == "simex" and rows[0]["needs_labels"] is False


def test_simex_select_json_ranks_verifies_and_refuses_unlabelled_data(library, tmp_path, simex_here):
    proc = simex("select", "--library", library, "--data", "digits", "--samples", 120, "--split", "test",
                 "--verify", 1, "--no-ray", "--method", "knn,logme", "--json")
    out = json.loads(proc.stdout)
    assert set(out["ranking"]) == {"knn", "logme"} and out["needs_labels"] == {"knn": True, "logme": True}
    assert set(out["scores"]["knn"]) == {"digits@s0", "bgrand:digits@s0"}
    v = out["verified"]
    assert v["method"] == "knn" and v["predicted_best"] == out["ranking"]["knn"][0]
    assert list(v["accuracy"]) == [v["predicted_best"]] and v["predicted_best_came"] == 1
    # No transfer, verified: the same head on the raw pixels; the warning checked against it.
    assert 0.1 < v["no_transfer_accuracy"] <= 1  # digits are linearly separable from their pixels: above chance
    assert v["transfer_helped"] == (v["accuracy"][v["best"]] > v["no_transfer_accuracy"])
    assert v["no_transfer_warning_right"] == (out["no_transfer"]["transfer_helps"] == v["transfer_helped"])
    # Unlabelled data: label-using methods refuse in one line; label-free ones run.
    x = np.random.default_rng(0).random((30, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "u.npz", x=x)
    bad = simex_here("select", "--library", library, "--data", f"npz:{tmp_path / 'u.npz'}", "--method", "logme",
                     check=False)
    assert bad.returncode == 2 and "need the data's labels" in bad.stderr and len(bad.stderr.splitlines()) == 1
    free = json.loads(simex_here("select", "--library", library, "--data", f"npz:{tmp_path / 'u.npz'}",
                                 "--json").stdout)
    assert set(free["ranking"]) == {"entropy", "nuclear-norm", "silhouette", "energy", "mano"}


def test_train_bases_resumes_without_training_again(library, simex_here):
    proc = simex_here("train-bases", "--refs", ",".join(REFS[:2]), "--samples", 240, "--no-ray", "--out", library)
    assert "0 trained now" in proc.stderr and proc.stderr.count("already trained") == 2
    assert Library.load(library).references == REFS[:2]


def test_the_no_transfer_baseline_is_each_estimator_on_raw_pixels_and_says_when_nothing_beats_it(gt):
    from simex_ray.cli.select import format_selection
    from simex_ray.transfer.estimators import knn_accuracy
    from simex_ray.transfer.features import PIXEL_FEATURES, pixel_features
    from simex_ray.transfer.selection import Selection, no_transfer

    lib = Library.in_memory(gt.bases)
    split = load_splits("rotated:digits", samples=240, data_seed=0, protocol=TINY)
    x, y = split.clf_kwargs(TINY.transfer_samples)["x_train"], split.clf_kwargs(TINY.transfer_samples)["y_train"]
    sel = select(lib, x, y, methods=["knn", "leep", "nce", "ncti", "entropy"])
    base = sel.to_json()["no_transfer"]
    # Computed the same way, on the pixels: the same estimator's value; no source = predictions saying nothing.
    assert base["scores"]["knn"] == knn_accuracy(x.reshape(len(x), -1), y)
    p = np.bincount(y) / len(y)
    minus_entropy = float(np.sum(p[p > 0] * np.log(p[p > 0])))
    assert base["scores"]["leep"] == pytest.approx(minus_entropy) and base["scores"]["nce"] == pytest.approx(minus_entropy)
    assert base["scores"]["ncti"] is None and base["scores"]["entropy"] is None  # no such baseline
    assert base["method"] == "knn"
    assert base["transfer_helps"] == (max(sel.scores["knn"].values()) > base["scores"]["knn"])
    # The verdict follows the scores: candidates all below the baseline -> the warning, in one CLI line.
    low = Selection({"knn": {c: -1.0 for c in lib.names}}, {"knn": 0.0}, len(x), True)
    high = Selection({"knn": {c: 2.0 for c in lib.names}}, {"knn": 0.0}, len(x), True)
    assert no_transfer(low, x, y)["transfer_helps"] is False and no_transfer(high, x, y)["transfer_helps"] is True
    low.extra["no_transfer"] = no_transfer(low, x, y)
    out = {**low.to_json(), "data": "rotated:digits", "classifiers": {c: lib.classifiers[c].spec for c in lib.names}}
    assert sum("no transfer:" in line for line in format_selection(out).splitlines()) == 1
    # Large images are area-shrunk to a bounded width, aspect kept.
    big = np.random.default_rng(0).random((4, 3, 224, 112)).astype(np.float32)
    assert pixel_features(big).shape[1] <= PIXEL_FEATURES and pixel_features(x).shape == (len(x), 784)

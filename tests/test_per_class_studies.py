"""The per-class studies: inter-class similarity (Table 2, Fig. 8) and augmentation (Fig. 7)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simex_ray import data
from simex_ray.transfer.classifiers import leave_one_class_out
from simex_ray.experiments import augment as aug
from simex_ray.experiments import inter_class as ic
from simex_ray.fleet import Fleet
from simex_ray.ranking import nanmean

ROOT = Path(__file__).resolve().parents[1]


def test_rho_rows_ignores_the_diagonal_and_table2_signs_confusion_against_distance():
    dist = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 3.0, 2.0], [2.0, 3.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    assert ic.rho_rows(dist, dist + 5 * np.eye(4)) == [1.0] * 4  # only j != k counts
    confusion = np.where(np.eye(4, dtype=bool), np.nan, 1.0 / (1.0 + dist))  # more confused = closer
    grid = ic.table2({"d": dist, "c": -confusion}, ["d"], ["d", "c"])
    assert grid["d"]["d"] == 1.0 and grid["d"]["c"] == pytest.approx(1.0)


def test_leave_one_class_out_never_predicts_the_missing_class():
    parts = data.prepare_by_class("digits", samples=40, seed=0)
    split = ic.classifier_split(parts, 0.1, seed=0)
    out = leave_one_class_out("lenet5", 3, **split, n_classes=10, max_epochs=2, patience=1)
    p, v = np.array(out["probability"]), np.array(out["votes"])
    assert np.isnan(p[3]) and np.isnan(v[3])
    assert np.nansum(p) == pytest.approx(1.0) and np.nansum(v) == pytest.approx(1.0)
    assert out["n_train"] == int((split["y_train"] != 3).sum())
    # votes are shares of class 3's own evaluation samples; accuracy counts only the other classes' ones
    n_mine, n_others = int((split["y_eval"] == 3).sum()), int((split["y_eval"] != 3).sum())
    np.testing.assert_allclose(v[~np.isnan(v)] * n_mine, np.round(v[~np.isnan(v)] * n_mine), atol=1e-9)
    assert out["accuracy"] * n_others == pytest.approx(round(out["accuracy"] * n_others), abs=1e-9)
    assert out["accuracy"] > 3 / 9  # learnt the 9 kept classes (chance is 1/9; measured 0.62-0.68)


@pytest.fixture(scope="module")
def inter(tmp_path_factory):
    root = tmp_path_factory.mktemp("inter-class")
    fleets = {"mse": str(root / "fleet-mse"), "issim": str(root / "fleet-issim")}
    calls = []

    def map_fn(fn, kwargs_list):
        calls.append((fn.__name__, len(kwargs_list)))
        return [fn(**kw) for kw in kwargs_list]

    result = ic.inter_class("digits", config=ic.PRESETS["tiny"], fleets=fleets, map_fn=map_fn)
    return result, fleets, calls, root


def test_inter_class_matrices_have_the_documented_orientation(inter):
    result, fleets, calls, _ = inter
    assert calls == [("leave_one_class_out", 20)]  # 10 classes x (LeNet-5, ResNet-18), through map_fn
    m = {k: np.array(v, dtype=float) for k, v in result["matrices"].items()}
    assert set(m) == {"simex_mse", "simex_issim", "sample_mse", "sample_issim", "confusion_lenet5",
                      "confusion_resnet18"}
    # simex[k][j] = Δ(test_j | A(k)): recompute one column from the saved fleet and the per-class split.
    parts = data.prepare_by_class("digits", samples=ic.PRESETS["tiny"].samples_per_class, seed=0)
    fleet = Fleet.load(fleets["mse"])
    j = 4
    column = fleet.engine.per_sample(parts[j].test.x, [p.spec for p in parts], "mse").mean(axis=1)
    np.testing.assert_allclose(m["simex_mse"][:, j], column, rtol=1e-6)
    for arch in ("lenet5", "resnet18"):
        c = m[f"confusion_{arch}"]
        assert np.isnan(np.diag(c)).all()
        np.testing.assert_allclose(np.nansum(c, axis=1), 1.0, rtol=1e-6)


def test_table2_is_the_mean_row_rho_of_the_stated_profiles(inter):
    result = inter[0]
    m = {k: np.array(v, dtype=float) for k, v in result["matrices"].items()}
    t2, t2t = result["table2"], result["table2_transposed"]
    assert list(t2) == ["SimEx-MSE", "SimEx-iSSIM", "sample-mse", "sample-issim"]
    assert list(t2["SimEx-MSE"]) == ["sample-mse", "sample-issim", "9class-le5", "9class-res18"]
    assert t2["sample-mse"]["sample-mse"] == 1.0
    le5 = -m["confusion_lenet5"]
    assert t2["SimEx-iSSIM"]["9class-le5"] == pytest.approx(nanmean(ic.rho_rows(m["simex_issim"].T, le5)))
    assert t2t["SimEx-iSSIM"]["9class-le5"] == pytest.approx(nanmean(ic.rho_rows(m["simex_issim"], le5)))
    own = np.diag(m["simex_mse"])  # Δ(test_j | A(j))
    assert result["table2_calibrated"]["SimEx-MSE"]["9class-le5"] == pytest.approx(
        nanmean(ic.rho_rows(m["simex_mse"].T / own[None, :], le5)))
    assert t2["sample-issim"]["9class-res18"] == pytest.approx(
        nanmean(ic.rho_rows(m["sample_issim"], -m["confusion_resnet18"])))


def test_inter_class_reuses_its_fleets_and_refuses_a_mismatched_one(inter, tmp_path):
    result, fleets, _, root = inter
    cfg = dataclasses.replace(ic.PRESETS["tiny"], classifiers=("lenet5",))
    again = ic.inter_class("digits", losses=("mse",), config=cfg, fleets={"mse": fleets["mse"]})
    np.testing.assert_allclose(again["matrices"]["simex_mse"], result["matrices"]["simex_mse"])
    other = dataclasses.replace(cfg, samples_per_class=48)
    with pytest.raises(ValueError, match="trained on other images"):
        ic.inter_class("digits", losses=("mse",), config=other, fleets={"mse": fleets["mse"]})


def test_write_inter_class_writes_json_parquet_and_figures(inter, tmp_path):
    import pandas as pd

    paths = ic.write_inter_class(inter[0], tmp_path)
    assert json.loads(paths["json"].read_text())["classes"] == [str(c) for c in range(10)]
    table = pd.read_parquet(paths["parquet"])
    assert len(table) == 6 * 100 and set(table["matrix"]) == set(inter[0]["matrices"])
    assert paths["png"].stat().st_size > 10_000 and paths["table2"].stat().st_size > 5_000
    assert "SimEx-iSSIM" in ic.format_table2(inter[0])


def test_inter_class_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="known: default, paper, tiny"):
        ic.load_config("huge")
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"resnet_epoch": 3}))
    with pytest.raises(ValueError, match=r"inter-class file .*unknown field\(s\) resnet_epoch"):
        ic.load_config(str(bad))
    with pytest.raises(ValueError, match="unknown classifier"):
        ic.InterClassConfig(classifiers=("vgg",))


# --------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    cfg = dataclasses.replace(aug.PRESETS["tiny"], trials=2)
    return aug.augment("digits", ["rotated:digits", "bgrand:digits"], config=cfg, fleet_dir=root / "fleets"), root


def test_augment_rows_cover_the_grid_and_share_identical_runs(augmented):
    result, _ = augmented
    cfg = result["config"]
    per_trial_n = 1 + len(result["references"]) * len(cfg["methods"]) * len(cfg["m"])
    assert result["runs"] == len(result["rows"]) == cfg["trials"] * len(cfg["n"]) * per_trial_n
    assert result["unique_runs"] <= result["runs"]
    for row in result["rows"]:
        if row["m"] == 0:
            assert row["gain"] == 0.0 and row["reference"] is None
        else:
            assert row["n_train"] == 10 * (row["n"] + row["m"])  # every target class got m borrowed samples
    for s in result["summary"]:
        assert s["min"] <= s["median"] <= s["max"]
    # Same pairing, same borrowed samples, same seed: one run, one accuracy.
    by = {}
    for row, pairing in zip([r for r in result["rows"] if r["m"] == cfg["m"][0]], result["pairings"]):
        key = (row["trial"], row["n"], row["reference"], tuple(sorted(pairing["pairs"].items())))
        by.setdefault(key, set()).add(row["accuracy"])
    assert all(len(v) == 1 for v in by.values())


def test_augment_orders_references_by_gain_and_by_normalised_delta(augmented):
    result, _ = augmented
    o = result["order"]
    gain, norm = result["gain"], result["delta_normalized"]
    assert o["by_gain"] == sorted(result["references"], key=lambda r: -gain[r])
    assert o["by_delta_normalized"] == sorted(result["references"], key=lambda r: norm[r])
    assert all(p["identity"] == sum(k == v for k, v in p["pairs"].items()) for p in result["pairings"])


def test_augmented_accuracy_is_deterministic_and_m0_is_the_baseline():
    ds = data.load("digits")
    idx = np.concatenate([np.nonzero(ds.y == c)[0][:5] for c in range(10)])
    test = np.concatenate([np.nonzero(ds.y == c)[0][-20:] for c in range(10)])
    kw = dict(x_target=ds.x, target_idx=idx, target_y=ds.y[idx], x_test=ds.x[test], y_test=ds.y[test],
              n_classes=10, epochs=1, min_steps=20, batch_size=16, optimizer="adam", seed=3)
    none = aug.augmented_accuracy(**kw, x_ref=None, ref_idx=np.zeros(0, int), ref_y=np.zeros(0, int))
    again = aug.augmented_accuracy(**kw, x_ref=ds.x, ref_idx=np.zeros(0, int), ref_y=np.zeros(0, int))
    assert none["accuracy"] == again["accuracy"] and none["n_train"] == 50
    more = aug.augmented_accuracy(**kw, x_ref=ds.x, ref_idx=idx, ref_y=ds.y[idx])
    assert more["n_train"] == 100


def test_write_augment_writes_the_fig7_grid(augmented, tmp_path):
    import pandas as pd

    result = augmented[0]
    paths = aug.write_augment(result, tmp_path)
    assert len(pd.read_parquet(paths["parquet"])) == result["runs"]
    assert paths["png"].stat().st_size > 10_000
    assert "order by gain" in aug.format_augment(result)


def test_format_augment_with_one_reference_has_no_rho(augmented):
    result = json.loads(json.dumps(augmented[0]))  # as written: NaN becomes null
    result["references"] = result["references"][:1]
    result["order"] = {"by_gain": result["references"], "by_delta_normalized": result["references"], "rho": None}
    assert "ρ needs 2+ references" in aug.format_augment(result)


def test_augment_config_overrides_and_errors():
    cfg = aug.load_config("tiny", n="3,4", m="7", trials=1, methods="simex")
    assert cfg.n == (3, 4) and cfg.m == (7,) and cfg.methods == ("simex",)
    with pytest.raises(ValueError, match="comma-separated integers"):
        aug.load_config(None, n="ten")
    with pytest.raises(ValueError, match="unknown pairing method"):
        aug.load_config(None, methods="simex,knn")


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def cluster_jobs(ray_cluster, tmp_path_factory):
    """Both per-class jobs, started together at the first test that asks: their drivers' start-ups (the
    imports, the connection to Ray, the data) overlap, and Ray queues their Train runs on the 2-CPU test
    cluster. Back to back they took 66 + 46 s. Each test waits for its own job and asserts on it alone;
    stdout and stderr go to files (a pipe nobody reads could fill and stall the other job).

    --cpus-per-task 1: two concurrent Train runs per job; 0.5 made four per job, whose start-ups (not their
    work) cost about 30 s more. The wiring is the same."""
    commands = {
        "inter_class": ["--data", "digits", "--loss", "mse", "--preset", "tiny"],
        "augment": ["--target", "digits", "--refs", "rotated:digits", "--preset", "tiny",
                    "--methods", "simex,sample-mse"],
    }
    jobs = {}
    for name, flags in commands.items():
        out = tmp_path_factory.mktemp(name)
        with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
            proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--address",
                                     ray_cluster.address, *flags, "--cpus-per-task", "1", "--out", str(out / "out")],
                                    stdout=stdout, stderr=stderr, text=True)
        jobs[name] = (proc, out)
    yield jobs
    for proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finished(jobs, name: str):
    """The job's exit status, stdout, stderr and output directory, once it has ended."""
    proc, out = jobs[name]
    returncode = proc.wait(timeout=900)
    return returncode, (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text(), out / "out"


@pytest.mark.ray
def test_inter_class_job_on_the_cluster(cluster_jobs):
    """Autoencoders and the leave-one-class-out classifiers on Ray Train, progress from start to end."""
    returncode, stdout, stderr, out = _finished(cluster_jobs, "inter_class")
    assert returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert list(summary["table2"]) == ["SimEx-MSE", "sample-mse", "sample-issim"]
    counts = [int(c) for c in re.findall(r"\] classifiers\s+(\d+)/20", stderr)]
    assert counts and counts[0] == 0 and counts[-1] == 20 and counts == sorted(counts)
    assert (out / "fleet-mse" / "manifest.json").is_file()
    assert (out / "inter_class.png").stat().st_size > 10_000


@pytest.mark.ray
def test_augment_job_on_the_cluster(cluster_jobs):
    returncode, stdout, stderr, out = _finished(cluster_jobs, "augment")
    assert returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["references"] == ["rotated:digits"]
    result = json.loads((out / "augment.json").read_text())
    assert result["runs"] == 1 + 2 * 2 and re.search(r"\] trials\s+\d+/\d+", stderr)
    assert len(list((out / "fleets").glob("*-per-class/manifest.json"))) == 1

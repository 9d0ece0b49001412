"""Class pairing (`simex pair`) and the per-class data split it shares with per-class fleets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simex_ray import data
from simex_ray.cli import main
from simex_ray.pairing import class_matrix, greedy_pairs


def test_greedy_pairing_fixes_the_smallest_distance_first_not_the_row_minimum():
    # Row 0's minimum is column 0, but (1, 0) is smaller and is fixed first; row 0 then takes column 1.
    d = np.array([[0.2, 0.3, 0.9],
                  [0.1, 0.5, 0.8],
                  [0.7, 0.6, 0.4]])
    assert greedy_pairs(d) == [(1, 0, 0.1), (0, 1, 0.3), (2, 2, 0.4)]


def test_greedy_pairing_uses_each_class_once_on_rectangular_matrices_and_skips_nan():
    d = np.array([[0.1, 0.2], [0.15, np.nan], [0.3, 0.05]])
    pairs = greedy_pairs(d)
    assert pairs == [(2, 1, 0.05), (0, 0, 0.1)]  # row 1 can only go to column 0, already taken
    ties = greedy_pairs(np.zeros((2, 2)))
    assert [(i, k) for i, k, _ in ties] == [(0, 0), (1, 1)]


def test_split_by_class_is_the_per_class_prepare_with_one_load(monkeypatch):
    parts = data.prepare_by_class("digits", samples=40, seed=3)
    assert [p.name for p in parts] == [str(c) for c in range(10)]
    for p in parts[:3]:
        train, test = data.prepare(p.spec, samples=40, seed=3)
        np.testing.assert_array_equal(p.train.x, train.x)
        np.testing.assert_array_equal(p.test.x, test.x)
        assert p.spec == f"digits#{p.name}" and set(np.unique(p.train.y)) == {p.label}

    calls = []
    real = data.loading.load_node
    monkeypatch.setattr(data.loading, "load_node", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cache: dict = {}
    for c in range(10):
        data.prepare(f"rotated:digits#{c}", samples=20, seed=0, cache=cache)
    # the rotated variant (and the digits under it) is derived once for all ten classes
    assert [c.canonical for c in calls] == ["rotated:digits", "digits"]


@pytest.fixture(scope="module")
def per_class_fleet(tmp_path_factory):
    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    out = tmp_path_factory.mktemp("per-class")
    plans = plan_fleet(["digits"], TrainConfig(epochs=2), samples=60, per_class=True, seed=0)
    train_fleet_local(plans, out, extra={"refs": ["digits"], "samples": 60, "per_class": True, "data_seed": 0})
    return out


def _pair_json(capsys, *argv):
    assert main(["pair", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_simex_pairing_is_greedy_over_the_per_class_delta_matrix(per_class_fleet, capsys):
    from simex_ray.fleet import Fleet

    out = _pair_json(capsys, "--fleet", str(per_class_fleet), "--data", "rotated:digits", "--samples", "30")
    assert out["reference"] == "digits" and out["unknown_classes"] == [str(c) for c in range(10)]
    # The matrix is Δ(c_i | A(c_k)) recomputed here from the members directly.
    fleet = Fleet.load(per_class_fleet)
    ds = data.load("rotated:digits")
    xs = []
    for c in range(10):
        idx = np.nonzero(ds.y == c)[0]
        xs.append(ds.x[np.sort(np.random.default_rng(0).choice(idx, size=30, replace=False))])
    expected = class_matrix("simex", xs, engine=fleet.engine, members=[f"digits#{c}" for c in range(10)])
    np.testing.assert_allclose(out["matrix"], expected, rtol=1e-6)
    pairs = greedy_pairs(expected)
    assert [(p["unknown"], p["reference"]) for p in out["pairs"]] == [(str(i), str(k)) for i, k, _ in pairs]
    assert [p["distance"] for p in out["pairs"]] == sorted(p["distance"] for p in out["pairs"])


def test_sample_mse_pairing_of_a_dataset_with_itself_is_the_identity(per_class_fleet, capsys):
    out = _pair_json(capsys, "--fleet", str(per_class_fleet), "--data", "digits", "--method", "sample-mse",
                     "--samples", "40")
    assert {p["unknown"]: p["reference"] for p in out["pairs"]} == {str(c): str(c) for c in range(10)}


def test_embeddings_pairing_reads_the_whole_dataset_autoencoder(per_class_fleet, tmp_path, capsys):
    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    ae = tmp_path / "ae"
    train_fleet_local(plan_fleet(["digits"], TrainConfig(epochs=1), samples=200), ae)
    out = _pair_json(capsys, "--fleet", str(per_class_fleet), "--data", "digits", "--method", "embeddings",
                     "--ae", str(ae), "--samples", "20")
    assert len(out["pairs"]) == 10 and np.isfinite(out["matrix"]).all()


def test_pair_table_marks_the_pairs(per_class_fleet, capsys):
    assert main(["pair", "--fleet", str(per_class_fleet), "--data", "digits", "--samples", "10"]) == 0
    text = capsys.readouterr().out
    assert text.count("*") == 10 and "pairs, in the order fixed" in text


@pytest.mark.parametrize("argv, message", [
    (["--method", "embeddings"], "needs --ae"),
    (["--data", "npz:UNLABELLED"], "has no labels"),
    (["--fleet", "TINY"], "not per-class"),
    (["--ref", "mnist"], "no per-class members of 'mnist'"),
])
def test_pair_errors_are_one_line(per_class_fleet, tiny_fleet, tmp_path, capsys, argv, message):
    np.savez(tmp_path / "u.npz", x=np.random.default_rng(0).random((20, 28, 28)).astype(np.float32))
    base = {"--fleet": str(per_class_fleet), "--data": "digits"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value.replace("UNLABELLED", str(tmp_path / "u.npz")).replace("TINY", str(tiny_fleet))
    args = [x for kv in base.items() for x in kv]
    assert main(["pair", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_pair_refuses_an_empty_class_in_one_line(per_class_fleet, tmp_path, capsys):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(tmp_path / "pets" / "cat" / f"{i}.png")
    assert main(["pair", "--fleet", str(per_class_fleet), "--data", f"folder:{tmp_path / 'pets'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dog have no samples" in err and len(err.splitlines()) == 1

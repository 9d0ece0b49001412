"""The score contract: one field list (SCORE_FIELDS). `simex score --json`, POST /v1/score and
`simex query --json` answer every field of it, and the same values for the same images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from simex_ray.api import RESPONSE_EXTRAS, score_response, score_response_model
from simex_ray.fleet import SCORE_FIELDS, FleetError, Member, ScoreResult, calibration_of, score_result
from simex_ray.fleet.manifest import verify_fleet
from simex_ray.fleet.result import SCORE_CONTRACT, merge_results, typicality_latent, typicality_of
from tests.test_serve import assert_same_score


def members(k: int = 3, seed: int = 0) -> list[Member]:
    """Manifest records with a calibration sketch, latent moments and a normaliser each, as `simex train`
    writes them."""
    rng = np.random.default_rng(seed)
    return [Member(name=f"m{i}", spec=f"m{i}", config={"loss": "mse", "architecture": "lenet"}, fingerprint="",
                   metrics={"ref_mean_l2": 1.0 + i}, calibration=calibration_of(rng.gamma(2.0, 0.01 * (i + 1), 200)),
                   latent={"file": f"weights/m{i}.pt", "own_mean": 1.0 + 0.5 * i, "dim": 84})
            for i in range(k)]


def per_sample(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, [[0.01], [0.02], [0.03]], (3, n))


def latent(n: int, seed: int = 2) -> np.ndarray:
    """Per-sample latent distances z, (3, n)."""
    return np.random.default_rng(seed).gamma(3.0, [[0.4], [0.6], [0.5]], (3, n))


def test_score_fields_are_exactly_the_keys_of_score_result():
    result = score_result(per_sample(20), members(), "mse")
    assert tuple(result.to_json()) == SCORE_FIELDS == tuple(SCORE_CONTRACT)
    assert {"typicality", "ranking_typicality"} <= set(SCORE_FIELDS)


def test_http_response_model_is_built_from_the_score_fields_and_keeps_them():
    """FastAPI serialises the answer through this model and drops what it does not declare."""
    model = score_response_model()
    assert tuple(model.model_fields) == SCORE_FIELDS + tuple(RESPONSE_EXTRAS)
    answer = score_response(np.stack([per_sample(20), latent(20)], axis=1), [m.to_json() for m in members()], "mse",
                            latency_ms=1.5)
    assert answer["ranking_method"] == "typicality_latent" and None not in answer["typicality_latent"].values()
    served = json.loads(model.model_validate(answer).model_dump_json(exclude_unset=True))  # as the app serialises it
    assert_same_score(served, answer, 0.0)
    assert served["typicality"] == answer["typicality"] and served["latency_ms"] == 1.5


def test_merged_batches_are_the_whole_and_typicality_is_not_averaged():
    """`simex query` merges batch answers: means weighted by batch size, typicality from the merged Δ."""
    d, z, ms = per_sample(50), latent(50), members()
    whole = score_result(d, ms, "mse", latent=z).to_json()
    assert whole["ranking_method"] == "typicality_latent"  # every member has latent moments: the default
    own_d, own_z = np.array([m.calibration["mean"] for m in ms]), np.array([m.latent["own_mean"] for m in ms])
    np.testing.assert_allclose(list(whole["latent_calibrated"].values()), z.mean(axis=1) / own_z, rtol=1e-12)
    np.testing.assert_allclose(list(whole["typicality_latent"].values()),  # the formula, by hand
                               np.abs(np.log(d.mean(axis=1) / own_d)) + np.abs(np.log(z.mean(axis=1) / own_z)))
    cuts = [(0, 7), (7, 30), (30, 50)]
    parts = [ScoreResult.from_json(json.loads(json.dumps(score_result(d[:, a:b], ms, "mse", latent=z[:, a:b])
                                                         .to_json()))) for a, b in cuts]
    merged = merge_results(parts)
    assert_same_score(merged.to_json(), whole, 1e-12)
    for key in ("typicality", "typicality_latent"):
        averaged = {name: sum(getattr(p, key)[name] * p.n for p in parts) / 50 for name in whole[key]}
        assert averaged != pytest.approx(whole[key], rel=1e-3)  # so averaging it would be wrong
    assert merged.typicality == typicality_of(merged.delta_calibrated)
    assert list(merged.typicality_latent.values()) == pytest.approx(
        typicality_latent(list(merged.delta_calibrated.values()), list(merged.latent_calibrated.values())).tolist())
    # An answer without typicality (an older service) still gives every field.
    old = {k: v for k, v in whole.items() if k not in ("typicality", "ranking_typicality")}
    assert_same_score(ScoreResult.from_json(old).to_json(), whole, 1e-12)
    # One from before latent moments: no latent values, its other fields as they were.
    older = ScoreResult.from_json({k: v for k, v in whole.items() if "latent" not in k}).to_json()
    assert set(older["latent_calibrated"].values()) == {None} and older["ranking_typicality_latent"] == ["m0", "m1", "m2"]
    assert older["delta"] == whole["delta"] and older["distribution"] == whole["distribution"]


def test_the_default_ranking_needs_latent_moments_for_every_member_and_says_which_it_used():
    d, z, ms = per_sample(30), latent(30), members()
    assert score_result(d, ms, "mse", latent=z).method == "typicality_latent"
    old = [Member.from_json({k: v for k, v in m.to_json().items() if k != "latent"}) for m in ms]
    for records, zs in ((old, None), (old, z), (ms, None), (ms[:2] + old[2:], z)):  # any member lacking them
        r = score_result(d, records, "mse", latent=zs)
        assert r.method == "distribution" and r.ranking == score_result(d, old, "mse").ranking
    # asked for by name without moments: the default of an older fleet, and the answer says so
    assert score_result(d, old, "mse", "typicality_latent").method == "distribution"
    # composition: per sample nearest by δ, as distribution's
    assert score_result(d, ms, "mse", latent=z).composition == score_result(d, ms, "mse", "distribution").composition


def test_verify_fleet_hashes_every_weight_file_without_building_a_model(tiny_fleet, tmp_path, monkeypatch):
    import simex_ray.fleet.fleet as fleet_module

    def no_model(*a, **k):
        raise AssertionError("verify_fleet built a model")

    monkeypatch.setattr(fleet_module, "create_autoencoder", no_model)
    monkeypatch.setattr(fleet_module.torch, "load", no_model)
    fleet = shutil.copytree(tiny_fleet, tmp_path / "fleet")
    manifest = verify_fleet(fleet)
    assert manifest == json.loads((fleet / "manifest.json").read_text())
    weights = fleet / manifest["members"][1]["weights"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(FleetError, match=f"{weights.name}.*corrupted"):
        verify_fleet(fleet)
    weights.unlink()
    with pytest.raises(FleetError, match=f"{weights.name}.*missing"):
        verify_fleet(fleet)
    moments = fleet / manifest["members"][0]["latent"]["file"]  # the latent moments are checked the same way
    moments.write_bytes(moments.read_bytes()[:-4] + b"oops")
    manifest["members"] = manifest["members"][:1]
    (fleet / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FleetError, match=f"{moments.name}.*corrupted"):
        verify_fleet(fleet)


@pytest.mark.parametrize("flag", ["--samples", "--batch"])
def test_query_rejects_zero_counts_as_usage_errors(flag, simex_here):
    proc = simex_here("query", "--url", "http://127.0.0.1:9", "--data", "digits", flag, "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"simex query: error: argument {flag}: expected a positive integer, got 0"], proc.stderr


def _result(delta: dict, calibrated: dict, in_dist: dict, method: str = "raw") -> ScoreResult:
    return ScoreResult(n=10, loss="mse", delta=delta, delta_normalized=dict(delta), delta_calibrated=calibrated,
                       in_distribution=in_dist, typicality=typicality_of(calibrated), method=method)


def test_agreement_counts_the_rankings_that_put_the_first_member_first_and_margin_is_in_its_units():
    # a and b: raw and normalized put a first; calibrated, in_distribution and typicality put b first
    weak = _result({"a": 0.010, "b": 0.012}, {"a": 2.0, "b": 1.1}, {"a": 0.3, "b": 0.9})
    assert weak.ranking[0] == "a" and weak.agreement == pytest.approx(2 / 5)  # no distribution, no latent: left out
    assert weak.margin == pytest.approx(0.002) and not weak.confident
    sure = _result({"a": 0.010, "b": 0.020}, {"a": 1.0, "b": 2.0}, {"a": 0.9, "b": 0.2})
    assert sure.agreement == 1.0 and sure.confident
    assert sure.margin == pytest.approx(0.010)
    by_typicality = _result({"a": 0.010, "b": 0.020}, {"a": 1.0, "b": 2.0}, {"a": 0.9, "b": 0.2}, "typicality")
    assert by_typicality.margin == pytest.approx(abs(np.log(2.0)))  # in typicality's units
    # an uncalibrated member: only raw and normalized have a value for every member, and they agree
    partial = _result({"a": 0.010, "b": 0.020}, {"a": None, "b": 1.0}, {"a": None, "b": 0.5})
    assert partial.agreement == 1.0
    alone = _result({"a": 0.01}, {"a": 1.0}, {"a": 0.9})
    assert alone.margin is None and alone.agreement == 1.0


def test_the_cli_table_flags_a_weak_answer_in_one_line():
    from simex_ray.cli.common import format_score

    weak = _result({"a": 0.010, "b": 0.012}, {"a": 2.0, "b": 1.1}, {"a": 0.3, "b": 0.9})
    text = format_score(weak, "title")
    assert sum(line.startswith("weak answer:") for line in text.splitlines()) == 1
    assert "agreement 40%" in text
    sure = _result({"a": 0.010, "b": 0.020}, {"a": 1.0, "b": 2.0}, {"a": 0.9, "b": 0.2})
    assert "weak answer" not in format_score(sure, "title")

"""The composition of unknown data: distribution matching against the fleet's cross sketches recovers known
mixture weights, merges across batches exactly, and leaves fleets without cross sketches as they were."""

from __future__ import annotations

import numpy as np
import pytest

from simex_ray.fleet import Member, ScoreResult, calibration_of, score_result
from simex_ray.fleet.mixture import (GRID_SIZE, composition_gram, composition_moments, covers, cross_sketches,
                                     mixture_weights)
from simex_ray.fleet.result import merge_results

# reference j's δ through member k ~ lognormal(MU[k, j], 0.3): each member reconstructs its own reference
# best, but references b and c are near-duplicates (a source and its rotated copy) and member "broad"
# reconstructs every reference almost as well as its own member does, so single images are ambiguous
MU = np.log(np.array([[0.010, 0.030, 0.031, 0.030],
                      [0.030, 0.010, 0.012, 0.030],
                      [0.031, 0.012, 0.010, 0.030],
                      [0.012, 0.012, 0.012, 0.012]]))
NAMES = ["a", "b", "c", "broad"]


def draw(j: int, n: int, rng) -> np.ndarray:
    """(members, n) δ of n images of reference j through every member."""
    return np.exp(MU[:, j][:, None] + 0.3 * rng.standard_normal((len(MU), n)))


def mixture(pi, n: int, rng) -> np.ndarray:
    counts = rng.multinomial(n, pi)
    return np.concatenate([draw(j, c, rng) for j, c in enumerate(counts)], axis=1)


def fleet_members(rng, cross: bool = True) -> list[Member]:
    held = {name: draw(j, 1000, rng) for j, name in enumerate(NAMES)}
    sketches = cross_sketches(held) if cross else {}
    return [Member(name=name, spec=name, config={"loss": "mse", "architecture": "lenet"}, fingerprint="",
                   metrics={"ref_mean_l2": 1.0}, calibration=calibration_of(held[name][j]),
                   cross_sketch=sketches.get(name, {})) for j, name in enumerate(NAMES)]


@pytest.mark.parametrize("pi, nearest_biased", [((0.5, 0.5, 0.0, 0.0), True), ((0.0, 0.5, 0.5, 0.0), True),
                                                ((0.2, 0.3, 0.1, 0.4), True), ((0.0, 0.0, 0.0, 1.0), False)])
def test_matching_recovers_known_mixture_weights_where_the_nearest_rule_is_biased(pi, nearest_biased):
    rng = np.random.default_rng(0)
    ms = fleet_members(rng)
    x = mixture(pi, 4000, rng)
    result = score_result(x, ms, "mse", "raw")
    assert result.composition_method == "matching"
    got = np.array([result.composition[n] for n in NAMES])
    assert np.abs(got - pi).max() < 0.05 and got.min() >= 0 and got.sum() == pytest.approx(1.0)
    near = np.bincount(np.argmin(x, axis=0), minlength=4) / x.shape[1]
    # the rule it replaces: ambiguous images and a broad member pull shares away from the truth
    assert (np.abs(near - pi).max() > 0.1) == nearest_biased


def test_the_solver_is_the_least_squares_point_of_the_simplex():
    rng = np.random.default_rng(1)
    sketches = cross_sketches({name: draw(j, 500, rng) for j, name in enumerate(NAMES)})
    assert covers(sketches, NAMES) and not covers(sketches, NAMES[:3])
    assert all(len(s["grid"]) == GRID_SIZE and sorted(s["grid"]) == s["grid"] for s in sketches.values())
    x = mixture((0.3, 0.3, 0.2, 0.2), 2000, rng)
    gram, moments = composition_gram(sketches, NAMES), composition_moments(x, sketches, NAMES)
    w = mixture_weights(gram, moments)
    objective = lambda p: p @ gram @ p - 2 * moments @ p  # noqa: E731
    for _ in range(200):  # no point of the simplex does better
        p = rng.dirichlet(np.ones(4))
        assert objective(w) <= objective(p) + 1e-9


def test_pure_reference_sets_are_put_on_their_own_reference():
    rng = np.random.default_rng(2)
    ms = fleet_members(rng)
    for j, name in enumerate(NAMES):
        assert score_result(draw(j, 1000, rng), ms, "mse").composition[name] > 0.95


def test_composition_merges_across_batches_exactly_and_round_trips_through_json():
    rng = np.random.default_rng(3)
    ms = fleet_members(rng)
    x = mixture((0.5, 0.0, 0.5, 0.0), 900, rng)
    whole = score_result(x, ms, "mse", "raw")
    parts = [ScoreResult.from_json(score_result(x[:, s], ms, "mse", "raw").to_json())
             for s in (slice(0, 100), slice(100, 550), slice(550, 900))]
    merged = merge_results(parts)
    assert merged.composition_method == "matching" and merged.n == 900
    for name in NAMES:
        assert merged.composition[name] == pytest.approx(whole.composition[name], abs=1e-9)
        assert merged.composition_moments[name] == pytest.approx(whole.composition_moments[name], rel=1e-12)
    # a batch's own composition differs from the whole's: merging is not averaging π
    assert any(abs(parts[0].composition[n] - whole.composition[n]) > 1e-3 for n in NAMES)


def test_a_fleet_without_cross_sketches_keeps_the_nearest_rule():
    rng = np.random.default_rng(4)
    old = fleet_members(rng, cross=False)
    x = mixture((0.5, 0.5, 0.0, 0.0), 600, rng)
    for method in ("raw", "distribution", "calibrated"):
        r = score_result(x, old, "mse", method)
        near = np.argmin(x / np.array([m.calibration["mean"] for m in old])[:, None], axis=0) \
            if method == "calibrated" else np.argmin(x, axis=0)
        assert r.composition_method == "nearest" and r.composition_gram == {} and r.composition_moments == {}
        assert r.composition == {n: float(np.mean(near == k)) for k, n in enumerate(NAMES)}
    # an answer from before the composition fields reads as nearest, and merges as the mean it always was
    answer = {k: v for k, v in score_result(x, old, "mse").to_json().items() if not k.startswith("composition_")}
    a, b = ScoreResult.from_json(answer), ScoreResult.from_json(answer)
    assert a.composition_method == "nearest" and merge_results([a, b]).composition == pytest.approx(a.composition)


def test_a_subset_of_the_members_or_mixed_fleets_fall_back_and_refuse_to_merge():
    rng = np.random.default_rng(5)
    ms = fleet_members(rng)
    x = mixture((0.5, 0.5, 0.0, 0.0), 300, rng)
    assert score_result(x[:3], ms[:3], "mse").composition_method == "nearest"  # sketches name a 4th reference
    assert score_result(x, ms, "issim").composition_method == "nearest"  # sketches of δ in the members' mse
    with pytest.raises(Exception, match="different compositions"):
        merge_results([score_result(x, ms, "mse"), score_result(x, fleet_members(rng, cross=False), "mse")])


def test_a_trained_fleet_gets_cross_sketches_and_answers_by_matching(tiny_fleet):
    from simex_ray.fleet import Fleet

    fleet = Fleet.load(tiny_fleet)
    names = fleet.names
    assert covers({n: fleet.members[n].cross_sketch for n in names}, names)
    x = np.concatenate([_further_held_out(names[0], 60), _further_held_out(names[1], 60)])
    result = fleet.score(x)
    assert result.composition_method == "matching" and sum(result.composition.values()) == pytest.approx(1.0)
    assert result.composition[names[0]] == pytest.approx(0.5, abs=0.1)


def _further_held_out(spec: str, n: int) -> np.ndarray:
    """n held-out images of ``spec`` that the tiny fleet's member neither trained nor calibrated on."""
    from simex_ray import data

    n_own = len(data.prepare(spec, samples=300, seed=0)[1])
    _, test = data.prepare(spec, samples=300, seed=0, test_samples=n_own + n)
    return np.asarray(test.x[n_own:])

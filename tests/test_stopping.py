"""The early-stopping study's Ray-free parts: the stability rule, the fleet stepper, the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.experiments.stopping import (FleetStepper, StabilityRule, epoch_metrics, plot_stopping,
                                            recommended_training, summarize)
from simex_ray.training import TrainConfig, train_member


@pytest.mark.parametrize("curve, eps, k, expected", [
    ([0.2, 0.6, 0.9, 0.9, 0.9, 0.9], 0.05, 3, 3),           # plateau reached at epoch 3
    ([0.2, 0.6, 0.9, 0.9, 0.8, 0.9, 0.9, 0.9], 0.05, 3, 6),  # a dip restarts the count
    ([0.2, 0.6, 0.9, 0.9, 0.8, 0.9], 0.1, 3, 3),            # ... unless it stays inside ε
    ([0.2, 0.6, 0.9, 0.9], 0.05, 3, None),                  # not held for k epochs yet
    ([0.5, 0.5, 0.5], 0.0, 3, 1),                           # ε = 0: exactly equal
    ([0.5, None, 0.5, 0.5, 0.5], 0.05, 3, 3),               # an undefined ρ breaks the window
    ([0.9, 0.85, 0.9, 0.85], 0.05, 4, 1),                   # the band is max - min, not distance to one end
    ([0.9, 0.84, 0.9, 0.85], 0.05, 2, 3),
    ([], 0.05, 1, None),
    ([0.3], 0.05, 1, 1),
])
def test_stability_rule_on_hand_made_curves(curve, eps, k, expected):
    assert StabilityRule(eps, k).stable_epoch(curve) == expected


def test_stability_rule_rejects_bad_parameters():
    with pytest.raises(ValueError, match="k must be >= 1"):
        StabilityRule(0.05, 0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        StabilityRule(-0.1, 3)


def test_fleet_stepper_equals_training_each_member_alone():
    """All members stepping together give exactly what train_member gives for the same epochs."""
    a, _ = data.prepare("digits", samples=60, seed=0)
    b, _ = data.prepare("bgrand:digits", samples=60, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="rmsprop", lr=2e-4, seed=7)
    stepper = FleetStepper({"a": a.x, "b": b.x}, cfg)
    stepper.step()
    stepper.step()
    for name, x in (("a", a.x), ("b", b.x)):
        alone, _ = train_member(x, x[:8], cfg)
        for k, v in alone.state_dict().items():
            assert torch.equal(v, stepper.models[name].state_dict()[k]), (name, k)
    # A stepper restored from its state continues exactly like the uninterrupted one.
    resumed = FleetStepper({"a": a.x, "b": b.x}, cfg).load_state_dict(stepper.state_dict())
    stepper.step()
    resumed.step()
    assert resumed.epoch == 3 and resumed.train_seconds > 0
    for name in ("a", "b"):
        for k, v in stepper.models[name].state_dict().items():
            assert torch.equal(v, resumed.models[name].state_dict()[k])
    delta = stepper.delta_matrix({"a": a.x, "b": b.x})
    assert delta.shape == (2, 2) and delta[0, 0] < delta[0, 1] and delta[1, 1] < delta[1, 0]


def test_epoch_metrics_agree_with_the_ranking_module():
    refs = ["a", "b", "c"]
    acc = np.array([[0.9, 0.5, 0.4], [0.6, 0.9, 0.3], [0.2, 0.4, 0.9]])
    m = epoch_metrics(1 - acc, {"accuracy": acc, "efficiency": acc / np.diag(acc)[:, None]}, refs)
    assert m["rho_mean"] == pytest.approx(1.0) and m["rho_mean_strict"] == pytest.approx(1.0)
    assert m["mean_test_delta"] == pytest.approx(np.mean(1 - np.diag(acc))) and len(m["rho_per_base"]) == 3


def _rows(optimizer, lr, curves, seconds_per_epoch):
    return [{"optimizer": optimizer, "lr": lr, "seed": s, "epoch": e + 1, "rho_mean": v,
             "train_seconds": seconds_per_epoch * (e + 1)} for s, curve in enumerate(curves) for e, v in enumerate(curve)]


def test_summary_picks_the_earliest_stable_configuration_among_the_best():
    rule = StabilityRule(0.05, 2)
    rows = (_rows("rmsprop", 2e-4, [[0.5, 0.9, 0.9, 0.9], [0.7, 0.9, 0.9, 0.9]], 10.0)     # stable at 2, final .9
            + _rows("rmsprop", 1e-3, [[0.9, 0.9, 0.8, 0.9], [0.6, 0.7, 0.9, 0.9]], 10.0)   # stable at 3 (worst seed)
            + _rows("adam", 1e-3, [[0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2]], 5.0))      # fast, but ρ low
    s = summarize(rows, rule, base_seconds={"x": 12.0, "y": 30.0})
    c = s["configs"]
    assert c["rmsprop lr=0.0002"]["earliest_stable_epoch"] == 2
    assert c["rmsprop lr=0.0002"]["earliest_stable_seconds"] == 20.0
    assert c["rmsprop lr=0.001"]["earliest_stable_epoch"] == 3
    assert c["adam lr=0.001"]["final_rho"] == pytest.approx(0.25)
    assert c["rmsprop lr=0.0002"]["curve"]["rho_min"] == [0.5, 0.9, 0.9, 0.9]
    assert c["rmsprop lr=0.0002"]["curve"]["rho_max"] == [0.7, 0.9, 0.9, 0.9]
    assert s["best"] == "rmsprop lr=0.0002" and s["fastest_base_seconds"] == 12.0
    assert s["stable_over_fastest_base"] == pytest.approx(20.0 / 12.0)
    rec = recommended_training({**s, "loss": "issim", "batch_size": 16, "architecture": "lenet"})
    assert rec["optimizer"] == "rmsprop" and rec["lr"] == 2e-4 and rec["epochs"] == 2 and rec["loss"] == "issim"


def test_a_configuration_never_stable_recommends_every_epoch_it_ran(tmp_path):
    rows = _rows("sgd", 1e-3, [[0.1, 0.5, 0.9]], 1.0)
    s = summarize(rows, StabilityRule(0.05, 3))
    assert s["configs"]["sgd lr=0.001"]["earliest_stable_epoch"] is None
    assert recommended_training(s)["epochs"] == 3 and recommended_training(s)["stable"] is False
    with pytest.raises(ValueError, match="no best configuration"):
        recommended_training(summarize([], StabilityRule()))
    assert plot_stopping(s, tmp_path / "s.png").stat().st_size > 1000
    # An epoch where no seed has a rho is null in the curve (0 seeds), never a number; a seed with no rho
    # at an epoch is left out of that epoch's spread rather than counted as 0.
    undefined = summarize(_rows("sgd", 1e-3, [[None, None]], 1.0), StabilityRule())["configs"]["sgd lr=0.001"]
    assert undefined["curve"]["rho_median"] == [None, None] and undefined["curve"]["n_seeds"] == [0, 0]
    assert undefined["final_rho"] is None and undefined["earliest_stable_epoch"] is None
    partial = summarize(_rows("sgd", 1e-3, [[None, 0.5], [0.3, 0.7]], 1.0), StabilityRule())["configs"]["sgd lr=0.001"]
    assert partial["curve"]["n_seeds"] == [1, 2]
    assert partial["curve"]["rho_median"] == [0.3, pytest.approx(0.6)]
    assert (partial["curve"]["rho_min"], partial["curve"]["rho_max"]) == ([0.3, 0.5], [0.3, 0.7])
    json.dumps(s)  # the summary is plain JSON

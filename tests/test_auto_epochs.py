"""`--epochs auto`: members train until their own held-out Δ stops improving (Ray-free)."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.errors import UserError
from simex_ray.fused_training import MemberJob, train_members
from simex_ray.training import (AUTO_MAX_EPOCHS, AUTO_PATIENCE, TrainConfig, auto_stop_epoch, train_member)

NAN = math.nan


def test_the_stopping_rule_on_known_histories():
    assert auto_stop_epoch([1.0, 0.9, 0.8], 30, 3) is None  # still improving
    assert auto_stop_epoch([1.0, 0.9, 0.899, 0.898, 0.897], 30, 3) == 5  # 3 epochs under a 1% gain after epoch 2
    assert auto_stop_epoch([1.0, 0.9, 0.899, 0.898], 30, 3) is None  # only 2 so far
    assert auto_stop_epoch([1.0, 0.9, 0.95, 0.97, 0.85], 30, 3) is None  # a gain at epoch 5 restarts the count
    assert auto_stop_epoch([NAN] * 10, 30, 3) is None  # no held-out split: never stops early...
    assert auto_stop_epoch([NAN] * 30, 30, 3) == 30  # ...but at the cap
    assert auto_stop_epoch([1.0] * 12, 12, 3) == 12
    assert auto_stop_epoch([1.0, 1.0], 30, 1) == 2


def test_auto_is_recorded_and_a_fixed_config_is_written_as_before():
    auto = TrainConfig.auto(loss="mse")
    assert (auto.epochs, auto.patience, auto.epochs_label) == (AUTO_MAX_EPOCHS, AUTO_PATIENCE, "auto")
    assert auto.to_dict()["patience"] == AUTO_PATIENCE
    assert TrainConfig.from_dict(auto.to_dict()).to_dict() == auto.to_dict()
    assert "patience" not in TrainConfig(epochs=3).to_dict()  # old manifests and run keys are unchanged
    with pytest.raises(UserError, match="patience"):
        TrainConfig(patience=0)


def _data(n=60, seed=0):
    x = data.load("digits").x
    idx = np.random.default_rng(seed).permutation(len(x))[:n + 20]
    return x[idx[:n]], x[idx[n:]]


# SGD at a tiny learning rate: the held-out Δ barely moves, so patience 1 stops after epoch 2
STILL = dict(optimizer="sgd", lr=1e-7, epochs=10, patience=1)


def test_train_member_stops_when_held_out_delta_stops_improving_and_equals_a_fixed_run():
    x_train, x_test = _data()
    model, history = train_member(x_train, x_test, TrainConfig(**STILL))
    assert [h["epoch"] for h in history] == [1, 2]
    fixed, fixed_history = train_member(x_train, x_test, TrainConfig(**{**STILL, "epochs": 2, "patience": None}))
    assert [h["test_delta"] for h in history] == [h["test_delta"] for h in fixed_history]
    for p, q in zip(model.parameters(), fixed.parameters()):
        assert torch.equal(p, q)


def test_a_member_that_keeps_improving_trains_on():
    x_train, x_test = _data()
    _, history = train_member(x_train, x_test, TrainConfig(epochs=4, patience=3))
    assert len(history) == 4  # Adam at its default lr improves by more than 1% per epoch here: the cap stops it


def test_a_resumed_finished_member_trains_no_further():
    x_train, x_test = _data()
    states = []
    train_member(x_train, x_test, TrainConfig(**STILL), on_epoch=lambda e, m, s: states.append(s))
    model, history = train_member(x_train, x_test, TrainConfig(**STILL), resume=states[-1])
    assert len(history) == 2


def test_fused_members_stop_each_on_its_own_rule():
    x_train, x_test = _data()
    still = TrainConfig(**STILL)
    fixed = TrainConfig(**{**STILL, "patience": None, "epochs": 4})
    # one fused pass holds members of one config: patience differs, so each config trains in its own pass
    (m1, h1), = train_members([MemberJob("still", still, x_train, x_test)])
    (m2, h2), = train_members([MemberJob("fixed", fixed, x_train, x_test)])
    assert (len(h1), len(h2)) == (2, 4)
    auto = TrainConfig(epochs=6, patience=2, optimizer="sgd", lr=1e-7)
    other = _data(seed=1)
    results = train_members([MemberJob("a", auto, x_train, x_test), MemberJob("b", auto, *other)])
    for (model, history), (x, t) in zip(results, [(x_train, x_test), other]):
        alone, alone_history = train_member(x, t, auto)
        assert [h["epoch"] for h in history] == [h["epoch"] for h in alone_history]
        assert [h["test_delta"] for h in history] == pytest.approx([h["test_delta"] for h in alone_history],
                                                                    rel=1e-5)


def test_the_cli_reads_epochs_auto():
    from simex_ray.cli.fleet import epochs_arg, train_config

    assert epochs_arg("auto") == "auto" and epochs_arg("7") == 7
    with pytest.raises(argparse.ArgumentTypeError):
        epochs_arg("0")
    args = argparse.Namespace(epochs="auto", loss=None, optimizer=None, lr=None, batch_size=None, architecture=None,
                              seed=0, from_study=None, precision="fp32")
    config = train_config(args)
    assert config.patience == AUTO_PATIENCE and config.epochs == AUTO_MAX_EPOCHS

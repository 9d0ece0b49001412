"""Base classifiers trained K at a time in fused passes are the classifiers trained one after another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from simex_ray import data
from simex_ray.transfer.classifiers import CLASSIFIER_LRS, LeNet5, train_base
from simex_ray.transfer.fused_bases import (base_key, bases_per_pass, fused_logits, plan_bases, train_base_group,
                                            train_bases)


@pytest.fixture(scope="module")
def digits():
    ds = data.load("digits")
    return ds.x, ds.y


def _units(x, y, sizes=(48, 37, 56), **kw):
    """Classifiers on their own digits of different sizes (their last batches differ), seeds and stopping."""
    rng = np.random.default_rng(0)
    units = []
    for k, n in enumerate(sizes):
        i = rng.permutation(len(x))
        units.append(dict(x_train=x[i[:n]], y_train=y[i[:n]], x_val=x[i[n:n + 30]], y_val=y[i[n:n + 30]],
                          x_test=x[i[n + 30:n + 60]], y_test=y[i[n + 30:n + 60]], batch_size=16, seed=k,
                          max_epochs=(3, 2, 4)[k % 3], patience=1, **kw))
    return units


# RMSprop's and Adagrad's first steps are lr·g/|g|-sized whatever |g| (as for the autoencoders): compared at a
# smaller lr, where a gradient that is zero up to rounding cannot flip a whole step.
SMALL_LR = {"rmsprop": 1e-4, "adagrad": 1e-3}


@pytest.mark.parametrize("optimizer", sorted(CLASSIFIER_LRS))
def test_fused_base_classifiers_equal_separate_training(digits, optimizer):
    units = _units(*digits, optimizer=optimizer, lr=SMALL_LR.get(optimizer))
    for got, unit in zip(train_base_group(units), units):
        want = train_base(**unit)
        # early stopping saw the same validation losses: the same epochs, the same best one, the same accuracy
        assert (got["epochs_run"], got["best_epoch"]) == (want["epochs_run"], want["best_epoch"])
        assert got["test_accuracy"] == want["test_accuracy"] and got["val_accuracy"] == want["val_accuracy"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
        assert [h["train_loss"] for h in got["history"]] == pytest.approx(
            [h["train_loss"] for h in want["history"]], rel=1e-4)
        assert got["state"].keys() == want["state"].keys()
        for k in want["state"]:
            torch.testing.assert_close(got["state"][k], want["state"][k], rtol=1e-4, atol=1e-4)
        assert {k for k in want if k != "seconds"} <= set(got) and got["image_format"] == "1x28x28"


@pytest.mark.parametrize("fmt", ["1x28x28", "3x32x32", "3x20x24"])
def test_one_fused_step_gives_each_classifier_its_own_logits_and_gradient(fmt):
    torch.manual_seed(0)
    models = [LeNet5(10, fmt) for _ in range(3)]
    x, y = torch.rand(3, 8, *models[0].image_format.shape), torch.randint(0, 10, (3, 8))
    logits = fused_logits(models, x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(3, 8).mean(1).sum().backward()
    fused = [[p.grad.clone() for p in m.parameters()] for m in models]
    for k, m in enumerate(models):
        m.zero_grad()
        own = m(x[k])
        torch.testing.assert_close(logits[k], own, rtol=1e-4, atol=1e-5)
        F.cross_entropy(own, y[k]).backward()
        for g, p in zip(fused[k], m.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-6)


def test_plan_groups_alike_classifiers_within_the_bound_and_the_parallel_runs(digits):
    x, y = digits
    units = _units(x, y, sizes=(20,) * 6, optimizer="adam")
    units[2] = {**units[2], "lr": 1e-2}  # another lr: its own pass
    units[4] = {**units[4], "x_train": np.repeat(units[4]["x_train"], 3, axis=1)}  # another format
    assert base_key(units[0]) == base_key(units[1]) != base_key(units[2])
    assert plan_bases(units) == [[0, 1, 3, 5], [2], [4]]
    assert plan_bases(units, per_pass=3) == [[0, 1, 3], [5], [2], [4]]
    assert plan_bases(units, parallel=3) == [[0, 1], [3, 5], [2], [4]]  # ceil(6 / 3) at most: every run busy
    assert plan_bases(units, per_pass=1) == [[i] for i in (0, 1, 3, 5, 2, 4)]
    per = bases_per_pass(units[0], 1000, budget=1 << 40)
    assert per == 1000 and bases_per_pass(units[0], 1000, budget=1) == 1
    assert bases_per_pass(units[0], 1000) < 1000  # the default 256 MiB bound binds at 1000 classifiers


def test_train_bases_through_a_map_fn_one_by_one_is_train_base_bit_for_bit(digits):
    x, y = digits
    units = _units(x, y, sizes=(30, 25), optimizer="adam")
    seen, progress = [], []

    def map_fn(fn, kwargs_list):  # stands in for a Ray adapter that runs two units at once
        seen.append((fn.__name__, len(kwargs_list)))
        return [fn(**kw) for kw in kwargs_list]

    map_fn.concurrency = lambda total: 2
    got = train_bases(units, map_fn=map_fn, on_progress=lambda *a: progress.append(a))
    assert seen == [("train_base", 2)]  # two runs at once: a classifier each, no fusion
    for g, unit in zip(got, units):
        want = train_base(**unit)
        for k in want["state"]:
            torch.testing.assert_close(g["state"][k], want["state"][k], rtol=0, atol=0)
    # here, fused: progress counts classifiers
    progress.clear()
    fused = train_bases(units + units[:1], on_progress=lambda *a: progress.append(a), per_pass=2)
    assert progress == [("base-classifiers", 2, 3), ("base-classifiers", 3, 3)]
    assert fused[2]["test_accuracy"] == got[0]["test_accuracy"]

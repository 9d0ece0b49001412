"""Known answers and invariances of the transfer-learning and sample-space baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.transfer.learning import TL_CONFIGS, normalize_by_base, tl_config, transfer, transfer_efficiency
from simex_ray.transfer.classifiers import LeNet5, first_classes, first_labels, train_base, train_classifier
from simex_ray.distances import embedding_distance, sample_distance
from simex_ray.fleet import Fleet


@pytest.fixture(scope="module")
def digits_splits():
    """digits, 240 samples: classifier train / val / test."""
    train, test = data.prepare("digits", samples=240, seed=0)
    fit, val = data.train_test_split(train, 0.2, seed=0)
    return {"x_train": fit.x, "y_train": fit.y, "x_val": val.x, "y_val": val.y, "x_test": test.x, "y_test": test.y}


@pytest.fixture(scope="module")
def base(digits_splits):
    return train_base(**digits_splits, max_epochs=3, patience=2, seed=0)


def test_lenet5_shapes_and_stages():
    model = LeNet5(10)
    x = torch.rand(4, 1, 28, 28)
    assert model.forward_features(x).shape == (4, 16, 5, 5)
    assert model(x).shape == (4, 10)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(6, (5, 5), (2, 2)), (16, (5, 5), (0, 0))]
    assert [f.out_features for f in model.fc_layers] == [120, 84, 10]


def test_first_classes_keeps_the_k_smallest_labels_and_relabels_them():
    y = np.array([0, 11, 3, 10, 9, 25, 1, 2, 4, 5, 6, 7, 8])
    ds = data.Dataset(np.arange(len(y), dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 28, 28), np.float32),
                      y, "t")
    out = first_classes(ds)
    assert sorted(out.y.tolist()) == list(range(10)) and 11 not in out.y and len(out) == 10
    assert first_classes(ds, 4).y.tolist() == [0, 3, 1, 2]
    with pytest.raises(data.SpecError, match="labels"):
        first_classes(data.Dataset(ds.x, None, "t"))


def test_first_classes_of_one_based_letters_are_a_to_j():
    # EMNIST letters files often label a..z as 1..26: the first ten are a..j, relabelled 0..9.
    y = np.repeat(np.arange(1, 27), 2)
    ds = data.Dataset(np.zeros((len(y), 1, 28, 28), np.float32), y, "letters")
    out = first_classes(ds)
    assert sorted(set(out.y.tolist())) == list(range(10)) and len(out) == 20
    # a split missing a class still maps like the train split when given its labels
    part = ds.subset(np.nonzero(y != 1)[0])
    mapped = first_classes(part, 10, first_labels(ds))
    assert sorted(set(mapped.y.tolist())) == list(range(1, 10))


def test_prepare_tops_up_the_test_split_from_unsampled_rows(tmp_path):
    y = np.repeat(np.arange(10), 50)
    x = (np.arange(len(y), dtype=np.float32) / len(y))[:, None, None, None] * np.ones((1, 1, 28, 28), np.float32)
    train, _ = data.train_test_split(data.balanced_sample(data.Dataset(x, y, "t"), 120, seed=3), 1 / 6, seed=3)
    f = tmp_path / "t.npz"
    np.savez(f, x=x[:, 0], y=y)
    tr, te = data.prepare(f"npz:{f}", samples=120, seed=3)
    tr2, te2 = data.prepare(f"npz:{f}", samples=120, seed=3, test_samples=300)
    _, te_all = data.prepare(f"npz:{f}", samples=120, seed=3, test_samples=10_000)
    assert np.array_equal(tr.x, tr2.x) and np.array_equal(tr.x, train.x)  # training split unchanged
    assert len(te) == 20 and len(te2) == 300 and np.array_equal(te2.x[:20], te.x)
    assert np.bincount(te2.y).min() >= 29  # class-balanced top-up
    ids = lambda d: set(np.round(d.x[:, 0, 0, 0] * len(y)).astype(int).tolist())
    assert not ids(tr2) & ids(te2) and len(ids(te2)) == 300  # disjoint, no repeats
    assert len(te_all) == 500 - 100  # everything outside the training split


def test_each_tl_config_retrains_with_its_own_optimizer(base, digits_splits, monkeypatch):
    from simex_ray.transfer import classifiers

    built, real = [], classifiers.make_classifier_optimizer

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(classifiers, "make_classifier_optimizer", spy)
    kinds = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
             "adagrad": torch.optim.Adagrad}
    s = {k: v[:48] for k, v in digits_splits.items()}
    for name, cfg in TL_CONFIGS.items():
        built.clear()
        r = transfer(base["state"], **s, config=name, max_epochs=1, patience=1)
        (opt,) = built
        group = opt.param_groups[0]
        assert type(opt) is kinds[cfg.optimizer] and group["lr"] == cfg.lr, name
        assert group.get("momentum", 0.0) == cfg.momentum and r["config"] == name, name
    assert len({(c.optimizer, c.lr, c.momentum) for c in TL_CONFIGS.values()}) == len(TL_CONFIGS)  # all differ
    with pytest.raises(ValueError, match="known: TL-1"):
        tl_config("TL-9")


def test_early_stopping_restores_the_best_validation_weights(digits_splits):
    seen = {}
    torch.manual_seed(0)
    model = LeNet5()

    def snapshot(epoch, metrics):
        seen[epoch] = ({k: v.clone() for k, v in model.state_dict().items()}, metrics["val_loss"])

    # Validating on the training images with shifted labels: the better the fit, the
    # higher the validation loss, so the minimum comes early and training goes past it.
    x, y = digits_splits["x_train"], digits_splits["y_train"]
    state, info = train_classifier(x, y, x[:48], (y[:48] + 1) % 10, max_epochs=8, patience=2,
                                   model=model, on_epoch=snapshot)
    losses = {e: v for e, (_, v) in seen.items()}
    best = min(losses, key=losses.get)
    assert info["best_epoch"] == best < info["epochs_run"] == len(seen) == best + 2  # stopped by patience
    assert info["val_loss"] == pytest.approx(losses[best])
    last = seen[info["epochs_run"]][0]
    assert any(not torch.equal(state[k], last[k]) for k in state)
    for k, v in seen[best][0].items():
        assert torch.equal(state[k], v) and torch.equal(model.state_dict()[k], v)
    assert 0 < info["seconds_to_best"] < info["seconds"]


def test_base_classifier_learns(base):
    assert base["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert set(base["state"]) == set(LeNet5().state_dict())


@pytest.mark.parametrize("fc_init,fc_layers", [("reinit", "all"), ("base", "last")])
def test_transfer_freezes_the_convolutions_and_retrains_fc(base, digits_splits, fc_init, fc_layers):
    x = data.load("rotated:digits").x[:240]
    y = data.load("rotated:digits").y[:240]
    r = transfer(base["state"], x[:160], y[:160], x[160:200], y[160:200], x[200:], y[200:],
                 config="TL-2", fc_init=fc_init, fc_layers=fc_layers, max_epochs=2, patience=1, return_state=True)
    before, after = base["state"], r["state"]
    for k in before:
        if k.startswith("features."):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["head.5.weight"], after["head.5.weight"])
    frozen_fc = torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert frozen_fc == (fc_layers == "last")
    assert 0 <= r["accuracy"] <= 1 and r["config"] == "TL-2" and r["epochs"] >= r["best_epoch"] >= 1


def test_transfer_is_deterministic(base, digits_splits):
    a = transfer(base["state"], **digits_splits, config="TL-1", max_epochs=1, seed=3)
    b = transfer(base["state"], **digits_splits, config="TL-1", max_epochs=1, seed=3)
    assert a["accuracy"] == b["accuracy"] and a["val_loss"] == b["val_loss"]


def test_labels_out_of_range_say_the_fix(digits_splits):
    with pytest.raises(ValueError, match="first_classes"):
        train_classifier(digits_splits["x_train"], digits_splits["y_train"] + 10, digits_splits["x_val"],
                         digits_splits["y_val"], max_epochs=1)


def test_accuracy_normalisations_known_answer():
    acc = np.array([[0.8, 0.4], [0.3, 0.6]])  # rows unknown X, columns base Y
    np.testing.assert_allclose(transfer_efficiency(acc), [[1.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(normalize_by_base(acc, [0.9, 0.75]), [[0.8 / 0.9, 0.4 / 0.75], [0.3 / 0.9, 0.8]])


@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_sample_distance_self_is_smaller_than_other(loss):
    digits = data.load("digits").x[:200]
    noisy = data.load("bgrand:digits").x[:200]
    same = sample_distance(digits, digits, loss, n_pairs=128)
    other = sample_distance(digits, noisy, loss, n_pairs=128)
    assert 0 <= same < other
    assert sample_distance(digits, noisy, loss, n_pairs=128) == other  # seeded
    x = digits[:1]
    assert sample_distance(x, x, loss, n_pairs=8) == pytest.approx(0, abs=1e-6)


def test_embedding_distance_self_is_smaller_than_other(tiny_fleet):
    fleet = Fleet.load(tiny_fleet)
    ae = fleet.models["digits"]
    train, test = data.prepare("digits", samples=300, seed=0)
    _, noisy = data.prepare("bgrand:digits", samples=300, seed=0)
    assert embedding_distance(ae, test.x, train.x) < embedding_distance(ae, noisy.x, train.x)
    assert embedding_distance(ae, train.x[:50], train.x) == pytest.approx(0, abs=1e-9)

"""Transfer learning, Ray-free: B(Y)'s convolutions frozen, its fully connected layers retrained on X.

The accuracy on X's test split is the paper's ground truth ("smaller Δ should mean higher accuracy").
:func:`transfer` is one unit of work (one unknown, base, config and seed); :func:`finetune` retrains
every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .classifiers import (CLASSIFIER_LRS, N_CLASSES, LeNet5, check_labels, evaluate_classifier, image_format_of,
                          n_classes_of, train_classifier)
from ..errors import UserError

@dataclass(frozen=True)
class TLConfig:
    """One transfer-learning configuration: how the FC layers are retrained."""

    name: str
    optimizer: str
    lr: float
    momentum: float = 0.0

    def __post_init__(self):
        if self.optimizer not in CLASSIFIER_LRS:
            raise UserError(f"unknown optimizer '{self.optimizer}'; known: {', '.join(CLASSIFIER_LRS)}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")


# The paper's TL-1..TL-5: TL-1 RMSprop at its default lr; TL-2..TL-4 three other
# optimizers at their default lr; TL-5 = TL-1 with a tenth of the lr. The three
# others are Adam (the common default), SGD with Nesterov-free momentum 0.9 at
# lr 1e-2 (plain SGD at 1e-2 barely moves in the few epochs early stopping
# allows on small data), and Adagrad at 1e-2.
TL_CONFIGS: dict[str, TLConfig] = {
    "TL-1": TLConfig("TL-1", "rmsprop", 1e-3),
    "TL-2": TLConfig("TL-2", "adam", 1e-3),
    "TL-3": TLConfig("TL-3", "sgd", 1e-2, momentum=0.9),
    "TL-4": TLConfig("TL-4", "adagrad", 1e-2),
    "TL-5": TLConfig("TL-5", "rmsprop", 1e-4),
}


def tl_config(config: str | TLConfig) -> TLConfig:
    """A TLConfig, or one of :data:`TL_CONFIGS` by name; an unknown name lists the valid ones."""
    if isinstance(config, TLConfig):
        return config
    try:
        return TL_CONFIGS[config]
    except KeyError:
        raise UserError(f"unknown transfer config '{config}'; known: {', '.join(TL_CONFIGS)}") from None


FC_INITS = ("reinit", "base")
FC_LAYERS = ("all", "last")


def transfer(base_state: dict[str, torch.Tensor], x_train, y_train, x_val, y_val, x_test, y_test, *,
             config: str | TLConfig = "TL-1", fc_init: str = "reinit", fc_layers: str = "all",
             max_epochs: int = 30, patience: int = 5, batch_size: int = 32, seed: int = 0,
             return_state: bool = False,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Unit of work "transfer B(Y) to X under config": accuracy on X's test split.

    The convolutions (``features``) are frozen from ``base_state``. With
    ``fc_layers="all"`` every FC layer is retrained, with ``"last"`` only the
    last one (the earlier FC layers stay frozen from the base too).
    ``fc_init="reinit"`` (the paper) re-initialises the retrained layers
    (seeded), ``"base"`` starts them from the base weights. Training stops at
    the minimum validation loss (see :func:`train_classifier`). B(Y) is a
    LeNet-5 for the format of X's images (B(Y) and X share one format).
    Returns config, accuracy, test_loss, seconds_to_best, seconds, epochs
    (run), best_epoch, val_loss, val_accuracy, sizes, and ``state`` when
    ``return_state``.
    """
    cfg = tl_config(config)
    if fc_init not in FC_INITS:
        raise UserError(f"unknown fc_init '{fc_init}'; known: {', '.join(FC_INITS)}")
    if fc_layers not in FC_LAYERS:
        raise UserError(f"unknown fc_layers '{fc_layers}'; known: {', '.join(FC_LAYERS)}")
    n_classes = n_classes_of(base_state)
    model = LeNet5(n_classes, image_format_of(x_train))
    load_base(model, base_state)
    retrained = model.fc_layers if fc_layers == "all" else model.fc_layers[-1:]
    if fc_init == "reinit":
        torch.manual_seed(seed)
        for layer in retrained:
            layer.reset_parameters()
    state, info = train_classifier(
        x_train, y_train, x_val, y_val, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        max_epochs=max_epochs, patience=patience, batch_size=batch_size, seed=seed, model=model,
        trainable="head" if fc_layers == "all" else "last", on_epoch=on_epoch)
    test_loss, acc = evaluate_classifier(model, x_test, check_labels(y_test, n_classes, "test labels"))
    out = {"config": cfg.name, "optimizer": cfg.optimizer, "lr": cfg.lr, "accuracy": acc,
           "test_loss": test_loss, "seconds_to_best": info["seconds_to_best"], "seconds": info["seconds"],
           "epochs": info["epochs_run"], "best_epoch": info["best_epoch"], "val_loss": info["val_loss"],
           "val_accuracy": info["val_accuracy"], "fc_init": fc_init, "fc_layers": fc_layers,
           "n_train": info["n_train"], "n_val": info["n_val"], "n_test": int(len(y_test))}
    if return_state:
        out["state"] = state
    return out


def finetune(base_state: dict[str, torch.Tensor] | None, x_train, y_train, x_val, y_val, x_test, y_test, *,
             config: str | TLConfig = "TL-2", epochs: int = 5, batch_size: int = 32, seed: int = 0,
             n_classes: int = N_CLASSES) -> dict[str, Any]:
    """Unit of work "fine-tune the whole of B(Y) on X for a fixed budget": accuracy on X's test split.

    Every layer starts from ``base_state`` except the last FC layer, which is
    re-initialised (seeded: X's classes are not Y's), and all of them train for
    ``epochs`` epochs (the weights of the lowest validation loss are kept).
    ``base_state=None`` trains the same network from scratch under the same
    budget and seed: the difference of the two accuracies is the transfer gain. The network is a
    LeNet-5 for the format of X's images.
    """
    cfg = tl_config(config)
    torch.manual_seed(seed)
    model = LeNet5(n_classes if base_state is None else n_classes_of(base_state), image_format_of(x_train))
    if base_state is not None:
        load_base(model, base_state)
        torch.manual_seed(seed)
        model.fc_layers[-1].reset_parameters()
    state, info = train_classifier(
        x_train, y_train, x_val, y_val, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        max_epochs=epochs, patience=epochs, batch_size=batch_size, seed=seed, model=model, trainable="all")
    n = model.fc_layers[-1].out_features
    test_loss, acc = evaluate_classifier(model, x_test, check_labels(y_test, n, "test labels"))
    return {"config": cfg.name, "accuracy": acc, "test_loss": test_loss, "seconds_to_best": info["seconds_to_best"],
            "seconds": info["seconds"], "epochs": info["epochs_run"], "best_epoch": info["best_epoch"],
            "from_scratch": base_state is None, "n_train": info["n_train"], "n_test": int(len(y_test))}


def load_base(model: LeNet5, base_state: dict[str, torch.Tensor]) -> None:
    """Load B(Y)'s weights into ``model``; a base of other channels than X's images fails in one line."""
    first = base_state.get("features.0.weight")
    if first is not None and first.shape[1] != model.image_format.channels:
        raise UserError(f"the base classifier takes {first.shape[1]}-channel images but X is "
                         f"{model.image_format}; load both in one format (data.prepare(..., fmt=))")
    model.load_state_dict(base_state)


def normalize_by_base(accuracy, base_accuracy) -> np.ndarray:
    """acc(X_i | B(Y_j)) / acc(Y_j | B(Y_j)): rows unknown X, columns base Y; (n, n)."""
    acc = np.asarray(accuracy, dtype=float)
    base = np.asarray(base_accuracy, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return acc / base[None, :]


def transfer_efficiency(accuracy) -> np.ndarray:
    """acc(X_i | B(Y_j)) / acc(X_i | B(X_i)): each row divided by its diagonal entry.

    Removes how hard X itself is: 1 means B(Y)'s features serve X as well as
    X's own (retrained the same way). Needs the references as both rows and
    columns in the same order.
    """
    acc = np.asarray(accuracy, dtype=float)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1]:
        raise UserError(f"transfer efficiency needs a square matrix, got shape {acc.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return acc / np.diag(acc)[:, None]


class LinearProbe(torch.nn.Module):
    """The fresh final Linear of a generic transfer: (N, D) features -> (N, C) logits."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, n_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    @property
    def fc_layers(self) -> list[torch.nn.Linear]:
        return [self.fc]


def transfer_head(base: dict[str, Any], x_train, y_train, x_val, y_val, x_test, y_test, *,
                  configs: Sequence[str | TLConfig] = ("TL-2",), max_epochs: int = 30, patience: int = 5,
                  batch_size: int = 32, seed: int = 0, feature_batch: int = 256) -> dict[str, Any]:
    """Unit of work "transfer any classifier B(Y) to X": its final Linear replaced by a fresh one for X's
    classes, trained on X's train split under each of ``configs``, the rest of B(Y) frozen; the mean
    accuracy on X's test split.

    ``base``: what :func:`simex_ray.transfer.zoo.build_network` needs (``architecture``, ``n_classes``,
    ``image_format``, ``weights`` (the weight file's bytes), ``suffix``) and the preprocessing (``mean``,
    ``std``, ``layer``). The frozen part runs in eval mode, so it runs once per split, whatever the number
    of configs: B(Y)'s features f (N, D) of the three splits, as
    :class:`~simex_ray.transfer.zoo.ZooModel` reads them. Per config a fresh Linear (D -> C, C = the largest
    label + 1, seeded with ``seed``) trains on them by :func:`train_classifier` (cross-entropy, the config's
    optimizer and lr, early stopping at the minimum validation loss). LeNet-5 bases take :func:`transfer`,
    the paper's protocol; this is the same idea (frozen features, retrained head) for any network. Cost:
    one forward pass of B(Y) per image, then O(epochs N D C) per config. Returns ``accuracy`` (mean over the
    configs), ``configs`` (per config: config, optimizer, lr, accuracy, test_loss, epochs, best_epoch,
    val_loss, val_accuracy), ``seconds`` (features included), sizes and ``feature_dim``.
    """
    import time

    from .zoo import ZooModel, build_network

    cfgs = [tl_config(c) for c in configs]
    if not cfgs:
        raise UserError("transfer_head needs at least one transfer config")
    t0 = time.perf_counter()
    network = build_network(base["architecture"], base["n_classes"], base["image_format"], base["weights"],
                            base["suffix"])
    model = ZooModel(network, mean=base.get("mean"), std=base.get("std"), layer=base.get("layer"),
                     blob=base["weights"])
    f_train, f_val, f_test = (model.forward(x, batch_size=feature_batch)[0] for x in (x_train, x_val, x_test))
    out = probe(f_train, y_train, f_val, y_val, f_test, y_test, configs=cfgs, max_epochs=max_epochs,
                patience=patience, batch_size=batch_size, seed=seed)
    return {**out, "seconds": time.perf_counter() - t0}


def pixel_probe(x_train, y_train, x_val, y_val, x_test, y_test, *, configs: Sequence[str | TLConfig] = ("TL-2",),
                max_epochs: int = 30, patience: int = 5, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Unit of work "no transfer": the head of :func:`transfer_head` trained the same way on the raw pixels
    (:func:`~simex_ray.transfer.selection.pixel_features`) instead of a source network's features. What
    ``--verify`` compares the transferred candidates with, to check the no-transfer warning."""
    import time

    from .features import pixel_features

    t0 = time.perf_counter()
    out = probe(*(pixel_features(np.asarray(x)) if i % 2 == 0 else x
                  for i, x in enumerate((x_train, y_train, x_val, y_val, x_test, y_test))),
                configs=[tl_config(c) for c in configs], max_epochs=max_epochs, patience=patience,
                batch_size=batch_size, seed=seed)
    return {**out, "seconds": time.perf_counter() - t0}


def probe(f_train, y_train, f_val, y_val, f_test, y_test, *, configs: Sequence[TLConfig], max_epochs: int,
          patience: int, batch_size: int, seed: int) -> dict[str, Any]:
    """A fresh Linear (D -> C, C = the largest label + 1, seeded) per config, trained on features ``f_*`` by
    :func:`train_classifier` (cross-entropy, the config's optimizer and lr, early stopping at the minimum
    validation loss): the mean test accuracy over the configs, and each config's run."""
    if not configs:
        raise UserError("a linear probe needs at least one transfer config")
    n_classes = int(max(np.max(y_train), np.max(y_val), np.max(y_test))) + 1
    y_test = check_labels(y_test, n_classes, "test labels")
    f_train, f_val, f_test = (np.asarray(f, dtype=np.float32) for f in (f_train, f_val, f_test))
    runs = []
    for cfg in configs:
        torch.manual_seed(seed)
        head = LinearProbe(f_train.shape[1], n_classes)
        _, info = train_classifier(
            f_train, y_train, f_val, y_val, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
            max_epochs=max_epochs, patience=patience, batch_size=batch_size, seed=seed, model=head,
            trainable="all")
        test_loss, acc = evaluate_classifier(head, f_test, y_test)
        runs.append({"config": cfg.name, "optimizer": cfg.optimizer, "lr": cfg.lr, "accuracy": acc,
                     "test_loss": test_loss, "epochs": info["epochs_run"], "best_epoch": info["best_epoch"],
                     "val_loss": info["val_loss"], "val_accuracy": info["val_accuracy"]})
    return {"accuracy": float(np.mean([r["accuracy"] for r in runs])), "configs": runs,
            "n_train": int(len(y_train)), "n_val": int(len(y_val)), "n_test": int(len(y_test)),
            "feature_dim": int(f_train.shape[1])}

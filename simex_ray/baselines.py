"""What SimEx is validated against, Ray-free: transfer learning and sample-space distances.

The paper (arXiv 2001.04893, section 5) checks that Δ(X | Y) orders unknown
datasets X the way transfer learning does: a LeNet-5 classifier B(Y) is trained
on reference Y, its convolutions are frozen, its fully connected layers are
retrained on X, and the accuracy on X's test split is the ground truth
("smaller Δ should mean higher accuracy"). It also compares Δ with cheaper
distances computed directly in sample space or in the autoencoder's code space.

Every expensive unit here is a plain top-level function taking and returning
picklable data (numpy arrays, state_dicts of CPU tensors, dicts), so a driver
can run units in parallel (e.g. on Ray) without this module knowing:

* :func:`train_base` trains B(Y) (one per reference and seed);
* :func:`transfer` transfers a base state to another dataset under one
  :class:`TLConfig` (one per unknown, base, config and seed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import data
from .losses import check_loss, per_sample_delta
from .models import Act, lenet_features
from .training import OPTIMIZERS as _AE_OPTIMIZERS
from .training import as_tensor

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_LRS",
    "CLASSIFIERS",
    "LeNet5",
    "ResNet18",
    "TLConfig",
    "TL_CONFIGS",
    "embedding_codes",
    "embedding_distance",
    "evaluate_classifier",
    "finetune",
    "first_classes",
    "first_labels",
    "leave_one_class_out",
    "make_classifier",
    "make_classifier_optimizer",
    "nearest_code_distance",
    "predict_proba",
    "normalize_by_base",
    "sample_distance",
    "train_base",
    "train_classifier",
    "transfer",
    "transfer_efficiency",
    "tl_config",
]

N_CLASSES = 10

# Default learning rates of the classifiers' optimizers. These are the Keras
# defaults the paper's "default learning rate" refers to (RMSprop 1e-3, not
# torch's 1e-2 which `simex_ray.training` uses for autoencoders).
CLASSIFIER_LRS: dict[str, float] = {
    "rmsprop": 1e-3,
    "adam": 1e-3,
    "adamw": 1e-3,
    "sgd": 1e-2,
    "adagrad": 1e-2,
    "adadelta": 1.0,
}


# --------------------------------------------------------------------------- model


class LeNet5(nn.Module):
    """LeNet-5 classifier for (N, 1, 28, 28) images, stages ``features`` and ``head``.

    conv5x5x6 (pad 2) -> act -> pool -> conv5x5x16 -> act -> pool -> FC120 ->
    act -> FC84 -> act -> FC n_classes (logits). ELU, like the autoencoders'
    LeNet-5 encoder (``simex_ray.models``): the classifier and the autoencoder
    then share one feature extractor design, and ELU has no dead units on the
    mostly-black digit images (ReLU units that die during a short, small-data
    run cannot recover once their layer is frozen for transfer).
    """

    def __init__(self, n_classes: int = N_CLASSES):
        super().__init__()
        self.n_classes = n_classes
        self.features = lenet_features()
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), Act(),
            nn.Linear(120, 84), Act(), nn.Linear(84, n_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) -> (N, 16, 5, 5)."""
        return self.features(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """(N, 16, 5, 5) -> logits (N, n_classes)."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def fc_layers(self) -> list[nn.Linear]:
        return [m for m in self.head if isinstance(m, nn.Linear)]


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for (N, 1, 28, 28) images, with a small-image stem.

    The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink 28x28 to 7x7
    before the first residual stage; here it is one 3x3 conv from 1 channel
    with ``stem_stride`` 1 (CIFAR-style: the residual stages see 28x28, then
    14, 7, 4) or 2 (they see 14x14, then 7, 4, 2: about 3.5x cheaper to train
    on a CPU), and no max-pool.
    """

    def __init__(self, n_classes: int = N_CLASSES, stem_stride: int = 1):
        super().__init__()
        import torchvision

        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.n_classes = n_classes
        self.net = torchvision.models.resnet18(num_classes=n_classes)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def fc_layers(self) -> list[nn.Linear]:
        return [self.net.fc]


# Classifier architectures by name (the per-class studies' ground truth trains both).
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lambda n_classes, **kw: LeNet5(n_classes),
    "resnet18": lambda n_classes, stem_stride=1, **kw: ResNet18(n_classes, stem_stride),
}


def make_classifier(architecture: str, n_classes: int, **kw: Any) -> nn.Module:
    """A classifier by name (:data:`CLASSIFIERS`); ``kw``: e.g. ``stem_stride`` for resnet18."""
    try:
        ctor = CLASSIFIERS[architecture]
    except KeyError:
        raise ValueError(f"unknown classifier '{architecture}'; known: {', '.join(CLASSIFIERS)}") from None
    return ctor(n_classes, **kw)


def _n_classes_of(state: dict[str, torch.Tensor]) -> int:
    last = [k for k in state if k.startswith("head.") and k.endswith(".weight")][-1]
    return int(state[last].shape[0])


# --------------------------------------------------------------------------- data


def first_classes(ds: data.Dataset, k: int = N_CLASSES, classes=None) -> data.Dataset:
    """Keep the ``k`` smallest labels and relabel them 0..k-1 (the paper: EMNIST letters a..j).

    Labels need not start at 0 (EMNIST letters files often use 1..26).
    ``classes``: the label values to keep, in order (pass the train split's
    ``first_labels`` so that test and validation splits map the same way).
    """
    if ds.y is None:
        raise data.SpecError(f"{ds.spec}: has no labels; transfer learning needs a labelled dataset")
    keep = np.asarray(first_labels(ds, k) if classes is None else classes)
    if np.array_equal(keep, np.arange(len(keep))) and int(ds.y.max(initial=-1)) < len(keep):
        return ds
    mask = np.isin(ds.y, keep)
    out = ds.subset(np.nonzero(mask)[0])
    names = None
    if ds.classes:
        names = tuple(ds.classes[i] if 0 <= i < len(ds.classes) else str(i) for i in keep.tolist())
    return data.Dataset(out.x, np.searchsorted(keep, out.y).astype(np.int64), out.spec, names)


def first_labels(ds: data.Dataset, k: int = N_CLASSES) -> np.ndarray:
    """The ``k`` smallest distinct label values of ``ds`` (sorted)."""
    if ds.y is None:
        raise data.SpecError(f"{ds.spec}: has no labels; transfer learning needs a labelled dataset")
    return np.unique(ds.y)[:k]


# --------------------------------------------------------------------------- training


def make_classifier_optimizer(name: str, params, lr: float | None = None,
                              momentum: float = 0.0) -> torch.optim.Optimizer:
    """Optimizer by name with the classifier default lr (:data:`CLASSIFIER_LRS`)."""
    if name not in CLASSIFIER_LRS:
        raise ValueError(f"unknown optimizer '{name}'; known: {', '.join(CLASSIFIER_LRS)}")
    ctor = _AE_OPTIMIZERS[name][0]
    lr = CLASSIFIER_LRS[name] if lr is None else lr
    if momentum:
        if name not in ("sgd", "rmsprop"):
            raise ValueError(f"momentum is only supported for sgd and rmsprop, not '{name}'")
        return ctor(params, lr=lr, momentum=momentum)
    return ctor(params, lr=lr)


def _set_trainable(model: LeNet5, trainable: str) -> list[nn.Parameter]:
    """Freeze everything except ``trainable`` ("all" | "head" | "last"); return the trained params."""
    if trainable == "all":
        keep = list(model.parameters())
    elif trainable == "head":
        keep = list(model.head.parameters())
    elif trainable == "last":
        keep = list(model.fc_layers[-1].parameters())
    else:
        raise ValueError(f"unknown trainable '{trainable}'; known: all, head, last")
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return keep


@torch.no_grad()
def predict_proba(model: nn.Module, x, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities of ``model`` on x (N, 1, 28, 28): (N, n_classes) float64."""
    model.eval()
    x = as_tensor(x)
    n = model.fc_layers[-1].out_features
    if len(x) == 0:
        return np.zeros((0, n))
    return torch.cat([F.softmax(model(b), dim=1) for b in torch.split(x, batch_size)]).double().numpy()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x, y, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on x (N, 1, 28, 28), y (N,)."""
    model.eval()
    x, y = as_tensor(x), torch.as_tensor(np.asarray(y), dtype=torch.long)
    if len(x) == 0:
        return float("nan"), float("nan")
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return loss / len(x), correct / len(x)


def _check_labels(y: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"{what}: need a non-empty 1-d label array, got shape {y.shape}")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"{what}: labels must be in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}; "
                         f"use first_classes() to keep the first {n_classes} classes")
    return y


def train_classifier(x_train, y_train, x_val, y_val, *, optimizer: str = "rmsprop",
                     lr: float | None = None, momentum: float = 0.0, max_epochs: int = 30,
                     patience: int = 5, batch_size: int = 32, seed: int = 0,
                     model: LeNet5 | None = None, n_classes: int = N_CLASSES, trainable: str = "all",
                     on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train to the minimum validation loss; return (best state_dict, info).

    Early stopping: training stops after ``patience`` epochs without a new
    minimum of the validation cross-entropy (or after ``max_epochs``) and the
    weights of the minimum are restored, into ``model`` too when given.
    ``trainable`` freezes the rest ("all", "head" = the FC layers, "last" =
    the last FC layer). ``info``: best_epoch, epochs_run, val_loss and
    val_accuracy (at the best epoch), seconds (whole run), seconds_to_best
    (wall time from the start until the end of the best epoch, its validation
    pass included, as an early-stopping run would measure it), history.
    """
    if max_epochs < 1 or patience < 1 or batch_size < 1:
        raise ValueError(f"max_epochs, patience and batch_size must be >= 1, got {max_epochs}, {patience}, {batch_size}")
    if model is None:
        torch.manual_seed(seed)
        model = LeNet5(n_classes)
    n_classes = model.fc_layers[-1].out_features
    y_train = _check_labels(y_train, n_classes, "training labels")
    y_val = _check_labels(y_val, n_classes, "validation labels")
    x, y = as_tensor(x_train), torch.as_tensor(y_train, dtype=torch.long)
    params = _set_trainable(model, trainable)
    opt = make_classifier_optimizer(optimizer, params, lr, momentum)
    best_loss, best_epoch, best_state, best_metrics = float("inf"), 0, None, {}
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seconds_to_best = 0.0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val_loss, val_acc = evaluate_classifier(model, x_val, y_val)
        elapsed = time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": total / len(x), "val_loss": val_loss,
                   "val_accuracy": val_acc, "elapsed_s": elapsed}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if val_loss < best_loss or best_state is None:  # NaN loss: keep the first epoch at least
            best_loss, best_epoch, seconds_to_best = val_loss, epoch, elapsed
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_metrics = metrics
        elif epoch - best_epoch >= patience:
            break
    seconds = time.perf_counter() - t0
    assert best_state is not None
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    info = {"best_epoch": best_epoch, "epochs_run": epoch, "val_loss": best_metrics["val_loss"],
            "val_accuracy": best_metrics["val_accuracy"], "seconds": seconds,
            "seconds_to_best": seconds_to_best, "optimizer": optimizer,
            "lr": CLASSIFIER_LRS.get(optimizer, float("nan")) if lr is None else float(lr),
            "trainable": trainable, "n_train": int(len(x)), "n_val": int(len(y_val)), "history": history}
    log.debug("classifier: best epoch %d/%d val loss %.4f acc %.3f", best_epoch, epoch,
              info["val_loss"], info["val_accuracy"])
    return best_state, info


def train_base(x_train, y_train, x_val, y_val, x_test, y_test, *, optimizer: str = "rmsprop",
               lr: float | None = None, max_epochs: int = 30, patience: int = 5, batch_size: int = 32,
               seed: int = 0, n_classes: int = N_CLASSES) -> dict[str, Any]:
    """Unit of work "train base classifier B(Y)": returns info + ``state`` + ``test_accuracy``."""
    state, info = train_classifier(x_train, y_train, x_val, y_val, optimizer=optimizer, lr=lr,
                                   max_epochs=max_epochs, patience=patience, batch_size=batch_size,
                                   seed=seed, n_classes=n_classes)
    model = LeNet5(n_classes)
    model.load_state_dict(state)
    test_loss, test_acc = evaluate_classifier(model, x_test, _check_labels(y_test, n_classes, "test labels"))
    return {**info, "state": state, "test_loss": test_loss, "test_accuracy": test_acc, "n_test": int(len(y_test))}


# --------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class TLConfig:
    """One transfer-learning configuration: how the FC layers are retrained."""

    name: str
    optimizer: str
    lr: float
    momentum: float = 0.0

    def __post_init__(self):
        if self.optimizer not in CLASSIFIER_LRS:
            raise ValueError(f"unknown optimizer '{self.optimizer}'; known: {', '.join(CLASSIFIER_LRS)}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")


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
        raise ValueError(f"unknown transfer config '{config}'; known: {', '.join(TL_CONFIGS)}") from None


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
    the minimum validation loss (see :func:`train_classifier`).
    Returns config, accuracy, test_loss, seconds_to_best, seconds, epochs
    (run), best_epoch, val_loss, val_accuracy, sizes, and ``state`` when
    ``return_state``.
    """
    cfg = tl_config(config)
    if fc_init not in FC_INITS:
        raise ValueError(f"unknown fc_init '{fc_init}'; known: {', '.join(FC_INITS)}")
    if fc_layers not in FC_LAYERS:
        raise ValueError(f"unknown fc_layers '{fc_layers}'; known: {', '.join(FC_LAYERS)}")
    n_classes = _n_classes_of(base_state)
    model = LeNet5(n_classes)
    model.load_state_dict(base_state)
    retrained = model.fc_layers if fc_layers == "all" else model.fc_layers[-1:]
    if fc_init == "reinit":
        torch.manual_seed(seed)
        for layer in retrained:
            layer.reset_parameters()
    state, info = train_classifier(
        x_train, y_train, x_val, y_val, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        max_epochs=max_epochs, patience=patience, batch_size=batch_size, seed=seed, model=model,
        trainable="head" if fc_layers == "all" else "last", on_epoch=on_epoch)
    test_loss, acc = evaluate_classifier(model, x_test, _check_labels(y_test, n_classes, "test labels"))
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
    budget and seed: the difference of the two accuracies is the transfer gain.
    """
    cfg = tl_config(config)
    torch.manual_seed(seed)
    model = LeNet5(n_classes if base_state is None else _n_classes_of(base_state))
    if base_state is not None:
        model.load_state_dict(base_state)
        torch.manual_seed(seed)
        model.fc_layers[-1].reset_parameters()
    state, info = train_classifier(
        x_train, y_train, x_val, y_val, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        max_epochs=epochs, patience=epochs, batch_size=batch_size, seed=seed, model=model, trainable="all")
    n = model.fc_layers[-1].out_features
    test_loss, acc = evaluate_classifier(model, x_test, _check_labels(y_test, n, "test labels"))
    return {"config": cfg.name, "accuracy": acc, "test_loss": test_loss, "seconds_to_best": info["seconds_to_best"],
            "seconds": info["seconds"], "epochs": info["epochs_run"], "best_epoch": info["best_epoch"],
            "from_scratch": base_state is None, "n_train": info["n_train"], "n_test": int(len(y_test))}


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
        raise ValueError(f"transfer efficiency needs a square matrix, got shape {acc.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return acc / np.diag(acc)[:, None]


# --------------------------------------------------------------------------- sample-space baselines


def sample_distance(x_a, x_b, loss: str = "mse", n_pairs: int = 512, seed: int = 0) -> float:
    """Mean δ(a, b) over ``n_pairs`` random pairs, a from ``x_a``, b from ``x_b`` (N, 1, 28, 28).

    Pairs are drawn with replacement (seeded), so the cost is O(n_pairs)
    whatever the set sizes; the same sets and seed give the same value.
    """
    check_loss(loss)
    if len(x_a) == 0 or len(x_b) == 0:
        raise ValueError("sample_distance needs two non-empty sets")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(x_a), size=n_pairs)
    ib = rng.integers(0, len(x_b), size=n_pairs)
    a, b = as_tensor(np.asarray(x_a)[ia]), as_tensor(np.asarray(x_b)[ib])
    with torch.no_grad():
        return float(per_sample_delta(a, b, loss).double().mean())


@torch.no_grad()
def _codes(autoencoder: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    autoencoder.eval()
    x = as_tensor(x)
    return torch.cat([autoencoder.encode(b) for b in torch.split(x, batch_size)]).double()


def embedding_codes(autoencoder: nn.Module, x, *, max_samples: int = 1000,
                    rng: np.random.Generator | None = None) -> torch.Tensor:
    """A(Y)'s bottleneck codes of ``x`` (subsampled to ``max_samples`` with ``rng``): (n, code) float64."""
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("embedding_distance needs two non-empty sets")
    if len(x) > max_samples:
        rng = rng if rng is not None else np.random.default_rng(0)
        x = x[np.sort(rng.choice(len(x), size=max_samples, replace=False))]
    return _codes(autoencoder, x)


def nearest_code_distance(codes_unknown: torch.Tensor, codes_reference: torch.Tensor) -> float:
    """Mean over unknown codes of the L2 distance to the closest reference code."""
    d = torch.cdist(codes_unknown, codes_reference, compute_mode="donot_use_mm_for_euclid_dist")
    return float(d.min(dim=1).values.mean())


def embedding_distance(autoencoder: nn.Module, x_unknown, x_reference, *, max_samples: int = 1000,
                       seed: int = 0) -> float:
    """Mean nearest-code distance from the unknown to the reference, in A(Y)'s bottleneck.

    Each unknown sample is encoded by the reference autoencoder; its distance
    is the L2 distance to the closest code of a reference sample; the result
    is the mean over unknown samples. Nearest-code rather than
    distance-between-mean-codes: two sets with the same mean code but
    different spread (digits vs digits on noise) would otherwise look
    identical. Both sets are subsampled to ``max_samples`` (seeded) so the
    cost stays O(max_samples²).
    """
    rng = np.random.default_rng(seed)
    cu = embedding_codes(autoencoder, x_unknown, max_samples=max_samples, rng=rng)
    cr = embedding_codes(autoencoder, x_reference, max_samples=max_samples, rng=rng)
    return nearest_code_distance(cu, cr)


def leave_one_class_out(architecture: str, left_out: int, x_train, y_train, x_val, y_val, x_eval, y_eval, *,
                        n_classes: int, optimizer: str = "adam", lr: float | None = None, max_epochs: int = 15,
                        patience: int = 3, batch_size: int = 64, seed: int = 0,
                        model_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Unit of work "C_k": train a classifier on every class but ``left_out``; where do its samples go?

    Labels are 0..n_classes-1. The (n_classes - 1)-class classifier never sees
    class k = ``left_out``; applied to k's evaluation samples, its outputs say
    which of the other classes k is confused with (the paper's inter-class
    ground truth, section 5.4). Returns, indexed by the original labels (NaN
    at k): ``probability`` (mean softmax over k's samples) and ``votes``
    (share of k's samples predicted as each class); plus ``accuracy`` (on the
    other classes' evaluation samples), the training info and ``seconds``.
    """
    y_train, y_val, y_eval = (np.asarray(a) for a in (y_train, y_val, y_eval))
    if not 0 <= left_out < n_classes:
        raise ValueError(f"left_out must be in 0..{n_classes - 1}, got {left_out}")
    kept = np.array([c for c in range(n_classes) if c != left_out])
    relabel = np.full(n_classes, -1)
    relabel[kept] = np.arange(len(kept))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = make_classifier(architecture, len(kept), **(model_kw or {}))
    tr, va, ev = y_train != left_out, y_val != left_out, y_eval != left_out
    _, info = train_classifier(np.asarray(x_train)[tr], relabel[y_train[tr]], np.asarray(x_val)[va],
                               relabel[y_val[va]], optimizer=optimizer, lr=lr, max_epochs=max_epochs,
                               patience=patience, batch_size=batch_size, seed=seed, model=model)
    x_eval = np.asarray(x_eval)
    mine = predict_proba(model, x_eval[~ev])
    if len(mine) == 0:
        raise ValueError(f"class {left_out} has no evaluation samples")
    _, acc = evaluate_classifier(model, x_eval[ev], relabel[y_eval[ev]])
    probability = np.full(n_classes, np.nan)
    votes = np.full(n_classes, np.nan)
    probability[kept] = mine.mean(axis=0)
    votes[kept] = np.bincount(mine.argmax(axis=1), minlength=len(kept)) / len(mine)
    return {"architecture": architecture, "left_out": int(left_out), "probability": probability.tolist(),
            "votes": votes.tolist(), "accuracy": acc, "val_accuracy": info["val_accuracy"],
            "best_epoch": info["best_epoch"], "epochs": info["epochs_run"], "n_train": info["n_train"],
            "seconds": time.perf_counter() - t0}

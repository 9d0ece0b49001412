"""The classifiers of the transfer ground truth, Ray-free: LeNet-5 and ResNet-18, trained, evaluated,
and the leave-one-class-out classifiers of the inter-class study.

The paper (arXiv 2001.04893, section 5) trains a LeNet-5 classifier B(Y) on each reference Y
(:func:`train_base`). Every expensive unit here is a plain top-level function taking and returning
picklable data (numpy arrays, state_dicts of CPU tensors, dicts), so a driver can run units in
parallel (e.g. on Ray) without this module knowing.

Both classifiers take images of any :class:`~simex_ray.formats.ImageFormat`; a unit that builds one
from images builds it for the images' own format (:func:`image_format_of`), so data converted once
at load (``data.prepare(..., fmt=)``) is all a colour ground truth needs. A 1×28×28 classifier is
exactly the paper's (same parameters, same outputs for the same seed).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import data
from ..formats import LEGACY, FormatError, ImageFormat, format_of, resize_matrix
from ..models import Act, lenet_features
from ..training import OPTIMIZERS as AE_OPTIMIZERS
from ..training import as_tensor
from ..errors import UserError

log = logging.getLogger("simex_ray.baselines")

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


LENET_SIDE = 32  # LeNet-5's own input side (LeCun et al. 1998): 28×28 digits zero-padded to 32×32


def image_format_of(x, image_format: ImageFormat | str | None = None) -> ImageFormat:
    """The format a classifier for images ``x`` (N, C, H, W) is built for: ``image_format`` when given
    (a one-line :class:`FormatError` when ``x`` is not in it), else the images' own."""
    found = format_of(np.asarray(x) if not torch.is_tensor(x) else x)
    if image_format is not None and ImageFormat.parse(image_format) != found:
        raise FormatError(f"images are {found} but the classifier takes {ImageFormat.parse(image_format)}; "
                          f"load them with data.prepare(..., fmt=) or convert them with simex_ray.formats.convert")
    return found


class Resize(nn.Module):
    """(N, C, H, W) -> (N, C, h, w) by the conversion rule of :mod:`simex_ray.formats` (area when shrinking,
    bilinear when growing, per axis), as two fixed matrix products: differentiable and on the input's
    device. Its matrices are not parameters and not in the state_dict."""

    def __init__(self, src: ImageFormat, height: int, width: int):
        super().__init__()
        self.register_buffer("rows", torch.from_numpy(resize_matrix(src.height, height)), persistent=False)
        self.register_buffer("cols", torch.from_numpy(resize_matrix(src.width, width)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,ncjk,lk->ncil", self.rows, x, self.cols)


class LeNet5(nn.Module):
    """LeNet-5 classifier for (N, C, H, W) images of ``image_format``, stages ``features`` and ``head``.

    conv5x5x6 -> act -> pool -> conv5x5x16 -> act -> pool -> FC120 -> act -> FC84 -> act ->
    FC n_classes (logits). ELU, like the autoencoders' LeNet-5 encoder (``simex_ray.models``): the
    classifier and the autoencoder then share one feature extractor design, and ELU has no dead units
    on the mostly-black digit images (ReLU units that die during a short, small-data run cannot recover
    once their layer is frozen for transfer).

    Every format reaches the convolutions at LeNet-5's original 32×32, so the features are
    (N, 16, 5, 5) and the head is the same at every format: 1×28×28 (the paper's) by padding the
    first convolution by 2, exactly as before formats existed; any other format by resizing to
    32×32 inside the module (:class:`Resize`, the rule of :mod:`simex_ray.formats`), its first
    convolution taking all C channels, unpadded.
    """

    def __init__(self, n_classes: int = N_CLASSES, image_format: ImageFormat | str = LEGACY):
        super().__init__()
        fmt = ImageFormat.parse(image_format)
        self.n_classes, self.image_format = n_classes, fmt
        if fmt == LEGACY:
            self.resize = nn.Identity()
            self.features = lenet_features()
        else:
            same = (fmt.height, fmt.width) == (LENET_SIDE, LENET_SIDE)
            self.resize = nn.Identity() if same else Resize(fmt, LENET_SIDE, LENET_SIDE)
            self.features = nn.Sequential(
                nn.Conv2d(fmt.channels, 6, 5), Act(), nn.MaxPool2d(2),  # (N, 6, 14, 14)
                nn.Conv2d(6, 16, 5), Act(), nn.MaxPool2d(2),  # (N, 16, 5, 5)
            )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), Act(),
            nn.Linear(120, 84), Act(), nn.Linear(84, n_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 16, 5, 5)."""
        return self.features(self.resize(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """(N, 16, 5, 5) -> logits (N, n_classes)."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def fc_layers(self) -> list[nn.Linear]:
        return [m for m in self.head if isinstance(m, nn.Linear)]


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for (N, C, H, W) images of ``image_format``, with a small-image stem.

    The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink 28x28 to 7x7
    before the first residual stage; here it is one 3x3 conv from C channels
    with ``stem_stride`` 1 (CIFAR-style: at 1×28×28 the residual stages see
    28x28, then 14, 7, 4) or 2 (they see 14x14, then 7, 4, 2: about 3.5x
    cheaper to train on a CPU), and no max-pool. The global average pool takes
    any height and width; the images are not resized.
    """

    def __init__(self, n_classes: int = N_CLASSES, stem_stride: int = 1, image_format: ImageFormat | str = LEGACY):
        super().__init__()
        import torchvision

        if stem_stride not in (1, 2):
            raise UserError(f"stem_stride must be 1 or 2, got {stem_stride}")
        fmt = ImageFormat.parse(image_format)
        self.n_classes, self.image_format = n_classes, fmt
        self.net = torchvision.models.resnet18(num_classes=n_classes)
        self.net.conv1 = nn.Conv2d(fmt.channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def fc_layers(self) -> list[nn.Linear]:
        return [self.net.fc]


# Classifier architectures by name (the per-class studies' ground truth trains both).
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lambda n_classes, image_format=LEGACY, **kw: LeNet5(n_classes, image_format),
    "resnet18": lambda n_classes, image_format=LEGACY, stem_stride=1, **kw: ResNet18(n_classes, stem_stride,
                                                                                      image_format),
}


def make_classifier(architecture: str, n_classes: int, image_format: ImageFormat | str = LEGACY,
                    **kw: Any) -> nn.Module:
    """A classifier by name (:data:`CLASSIFIERS`) for ``image_format``; ``kw``: e.g. ``stem_stride`` for
    resnet18."""
    try:
        ctor = CLASSIFIERS[architecture]
    except KeyError:
        raise UserError(f"unknown classifier '{architecture}'; known: {', '.join(CLASSIFIERS)}") from None
    return ctor(n_classes, image_format=ImageFormat.parse(image_format), **kw)


def n_classes_of(state: dict[str, torch.Tensor]) -> int:
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
                              momentum: float = 0.0, **options) -> torch.optim.Optimizer:
    """Optimizer by name with the classifier default lr (:data:`CLASSIFIER_LRS`); ``options``: the
    optimizer's implementation switches (``foreach``, ``fused``), never its hyperparameters."""
    if name not in CLASSIFIER_LRS:
        raise UserError(f"unknown optimizer '{name}'; known: {', '.join(CLASSIFIER_LRS)}")
    ctor = AE_OPTIMIZERS[name][0]
    lr = CLASSIFIER_LRS[name] if lr is None else lr
    if momentum:
        if name not in ("sgd", "rmsprop"):
            raise UserError(f"momentum is only supported for sgd and rmsprop, not '{name}'")
        return ctor(params, lr=lr, momentum=momentum, **options)
    return ctor(params, lr=lr, **options)


def set_trainable(model: LeNet5, trainable: str) -> list[nn.Parameter]:
    """Freeze everything except ``trainable`` ("all" | "head" | "last"); return the trained params."""
    if trainable == "all":
        keep = list(model.parameters())
    elif trainable == "head":
        keep = list(model.head.parameters())
    elif trainable == "last":
        keep = list(model.fc_layers[-1].parameters())
    else:
        raise UserError(f"unknown trainable '{trainable}'; known: all, head, last")
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return keep


@torch.no_grad()
def predict_proba(model: nn.Module, x, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities of ``model`` on x (N, C, H, W): (N, n_classes) float64."""
    model.eval()
    x = as_tensor(x)
    n = model.fc_layers[-1].out_features
    if len(x) == 0:
        return np.zeros((0, n))
    return torch.cat([F.softmax(model(b), dim=1) for b in torch.split(x, batch_size)]).double().numpy()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x, y, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on x (N, C, H, W), y (N,)."""
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


def check_labels(y: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise UserError(f"{what}: need a non-empty 1-d label array, got shape {y.shape}")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise UserError(f"{what}: labels must be in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}; "
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
    the last FC layer). Without ``model``, a LeNet-5 for the images' format is
    built (seeded). ``info``: best_epoch, epochs_run, val_loss and
    val_accuracy (at the best epoch), seconds (whole run), seconds_to_best
    (wall time from the start until the end of the best epoch, its validation
    pass included, as an early-stopping run would measure it), history.
    """
    if max_epochs < 1 or patience < 1 or batch_size < 1:
        raise UserError(f"max_epochs, patience and batch_size must be >= 1, got {max_epochs}, {patience}, {batch_size}")
    if model is None:
        torch.manual_seed(seed)
        model = LeNet5(n_classes, image_format_of(x_train))
    n_classes = model.fc_layers[-1].out_features
    y_train = check_labels(y_train, n_classes, "training labels")
    y_val = check_labels(y_val, n_classes, "validation labels")
    x, y = as_tensor(x_train), torch.as_tensor(y_train, dtype=torch.long)
    params = set_trainable(model, trainable)
    opt = make_classifier_optimizer(optimizer, params, lr, momentum)
    best = BestEpoch(patience)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
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
        if best.update(model, metrics, elapsed):
            break
    seconds = time.perf_counter() - t0
    assert best.state is not None
    model.load_state_dict(best.state)
    for p in model.parameters():
        p.requires_grad_(True)
    info = best.info(epoch, seconds, optimizer, lr, trainable, len(x), len(y_val), history)
    log.debug("classifier: best epoch %d/%d val loss %.4f acc %.3f", best.epoch, epoch,
              info["val_loss"], info["val_accuracy"])
    return best.state, info


class BestEpoch:
    """Early stopping as :func:`train_classifier` does it: the epoch of minimum validation loss, its weights
    and metrics, and when ``patience`` epochs without a new minimum end training (also used by the fused
    base classifiers, :mod:`simex_ray.transfer.fused_bases`)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.loss, self.epoch, self.seconds = float("inf"), 0, 0.0
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, float] = {}

    def update(self, model: nn.Module, metrics: dict[str, float], seconds: float) -> bool:
        """Record one finished epoch (``metrics``: its epoch and val_loss; ``seconds``: time so far); True when
        training should stop: ``patience`` epochs since the minimum."""
        if metrics["val_loss"] < self.loss or self.state is None:  # NaN loss: keep the first epoch at least
            self.loss, self.epoch, self.seconds = metrics["val_loss"], metrics["epoch"], seconds
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.metrics = metrics
            return False
        return metrics["epoch"] - self.epoch >= self.patience

    def info(self, epochs_run: int, seconds: float, optimizer: str, lr: float | None, trainable: str,
             n_train: int, n_val: int, history: list[dict[str, float]]) -> dict[str, Any]:
        """:func:`train_classifier`'s ``info``."""
        return {"best_epoch": self.epoch, "epochs_run": epochs_run, "val_loss": self.metrics["val_loss"],
                "val_accuracy": self.metrics["val_accuracy"], "seconds": seconds, "seconds_to_best": self.seconds,
                "optimizer": optimizer, "lr": CLASSIFIER_LRS.get(optimizer, float("nan")) if lr is None else float(lr),
                "trainable": trainable, "n_train": int(n_train), "n_val": int(n_val), "history": history}


def tested_base(state: dict[str, torch.Tensor], info: dict[str, Any], model: LeNet5, x_test, y_test,
                image_format: ImageFormat) -> dict[str, Any]:
    """:func:`train_base`'s result from a trained ``model`` holding ``state``: info + state + its test metrics."""
    n_classes = model.fc_layers[-1].out_features
    test_loss, test_acc = evaluate_classifier(model, x_test, check_labels(y_test, n_classes, "test labels"))
    return {**info, "state": state, "test_loss": test_loss, "test_accuracy": test_acc, "n_test": int(len(y_test)),
            "image_format": str(image_format)}


def train_base(x_train, y_train, x_val, y_val, x_test, y_test, *, optimizer: str = "rmsprop",
               lr: float | None = None, max_epochs: int = 30, patience: int = 5, batch_size: int = 32,
               seed: int = 0, n_classes: int = N_CLASSES) -> dict[str, Any]:
    """Unit of work "train base classifier B(Y)", a LeNet-5 for the images' format: returns info + ``state``
    + ``test_accuracy`` + ``image_format`` (e.g. ``"3x32x32"``)."""
    fmt = image_format_of(x_train)
    state, info = train_classifier(x_train, y_train, x_val, y_val, optimizer=optimizer, lr=lr,
                                   max_epochs=max_epochs, patience=patience, batch_size=batch_size,
                                   seed=seed, n_classes=n_classes)
    model = LeNet5(n_classes, fmt)
    model.load_state_dict(state)
    return tested_base(state, info, model, x_test, y_test, fmt)


def leave_one_class_out(architecture: str, left_out: int, x_train, y_train, x_val, y_val, x_eval, y_eval, *,
                        n_classes: int, optimizer: str = "adam", lr: float | None = None, max_epochs: int = 15,
                        patience: int = 3, batch_size: int = 64, seed: int = 0,
                        model_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Unit of work "C_k": train a classifier on every class but ``left_out``; where do its samples go?

    Labels are 0..n_classes-1. The (n_classes - 1)-class classifier never sees
    class k = ``left_out``; applied to k's evaluation samples, its outputs say
    which of the other classes k is confused with (the paper's inter-class
    ground truth, section 5.4). The classifier is built for the images' format. Returns, indexed by the original labels (NaN
    at k): ``probability`` (mean softmax over k's samples) and ``votes``
    (share of k's samples predicted as each class); plus ``accuracy`` (on the
    other classes' evaluation samples), the training info and ``seconds``.
    """
    y_train, y_val, y_eval = (np.asarray(a) for a in (y_train, y_val, y_eval))
    if not 0 <= left_out < n_classes:
        raise UserError(f"left_out must be in 0..{n_classes - 1}, got {left_out}")
    kept = np.array([c for c in range(n_classes) if c != left_out])
    relabel = np.full(n_classes, -1)
    relabel[kept] = np.arange(len(kept))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    kw = dict(model_kw or {})
    model = make_classifier(architecture, len(kept), image_format_of(x_train, kw.pop("image_format", None)), **kw)
    tr, va, ev = y_train != left_out, y_val != left_out, y_eval != left_out
    _, info = train_classifier(np.asarray(x_train)[tr], relabel[y_train[tr]], np.asarray(x_val)[va],
                               relabel[y_val[va]], optimizer=optimizer, lr=lr, max_epochs=max_epochs,
                               patience=patience, batch_size=batch_size, seed=seed, model=model)
    x_eval = np.asarray(x_eval)
    mine = predict_proba(model, x_eval[~ev])
    if len(mine) == 0:
        raise UserError(f"class {left_out} has no evaluation samples")
    _, acc = evaluate_classifier(model, x_eval[ev], relabel[y_eval[ev]])
    probability = np.full(n_classes, np.nan)
    votes = np.full(n_classes, np.nan)
    probability[kept] = mine.mean(axis=0)
    votes[kept] = np.bincount(mine.argmax(axis=1), minlength=len(kept)) / len(mine)
    return {"architecture": architecture, "left_out": int(left_out), "probability": probability.tolist(),
            "votes": votes.tolist(), "accuracy": acc, "val_accuracy": info["val_accuracy"],
            "best_epoch": info["best_epoch"], "epochs": info["epochs_run"], "n_train": info["n_train"],
            "seconds": time.perf_counter() - t0}

"""Ray-free training of one autoencoder (one fleet member).

``train_member`` is the worker function; a driver (plain Python, or the Ray
Train adapter in ``simex_ray.distributed``) passes callbacks to checkpoint and
report. Shuffling is seeded per epoch so a run resumed from an epoch
checkpoint follows exactly the same path as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .device import prefetch
from .losses import check_loss, per_sample_delta
from .formats import LEGACY, ImageFormat
from .models import architectures, create_autoencoder, refusal
from .choices import AUTO_MAX_EPOCHS, AUTO_MIN_GAIN, AUTO_PATIENCE, DEFAULT_PRECISION, PRECISIONS, TRAIN_DEFAULTS
from .errors import UserError

log = logging.getLogger(__name__)

# name (one of choices.OPTIMIZERS, in that order) -> (constructor, default learning rate)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], float]] = {
    "adam": (torch.optim.Adam, 1e-3),
    "adamw": (torch.optim.AdamW, 1e-3),
    "rmsprop": (torch.optim.RMSprop, 1e-2),
    "sgd": (torch.optim.SGD, 1e-3),
    "adagrad": (torch.optim.Adagrad, 1e-2),
    "adadelta": (torch.optim.Adadelta, 1.0),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one member's training; saved in the manifest."""

    architecture: str = "lenet"
    loss: str = TRAIN_DEFAULTS["loss"]
    epochs: int = TRAIN_DEFAULTS["epochs"]
    batch_size: int = TRAIN_DEFAULTS["batch_size"]
    optimizer: str = TRAIN_DEFAULTS["optimizer"]
    lr: float | None = TRAIN_DEFAULTS["lr"]  # None: the optimizer's default
    seed: int = 0
    image_format: str = str(LEGACY)  # CxHxW of the images the member takes
    precision: str = DEFAULT_PRECISION  # "bf16": forward passes under bfloat16 autocast (the weights and the optimizer stay fp32)
    patience: int | None = None  # `--epochs auto`: stop after this many epochs without a better held-out Δ

    def __post_init__(self):
        check_loss(self.loss)
        object.__setattr__(self, "image_format", str(ImageFormat.parse(self.image_format)))
        if self.architecture not in architectures():
            raise UserError(
                f"unknown architecture '{self.architecture}'; known: {', '.join(architectures())}"
            )
        why = refusal(self.architecture, self.image_format)
        if why:
            raise UserError(why)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{self.optimizer}'; known: {', '.join(OPTIMIZERS)}")
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"patience must be >= 1, got {self.patience}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}'; known: {', '.join(PRECISIONS)}")

    @classmethod
    def auto(cls, **kwargs) -> "TrainConfig":
        """`--epochs auto`: up to :data:`AUTO_MAX_EPOCHS`, stopping by :func:`auto_stop_epoch`."""
        return cls(**{**kwargs, "epochs": AUTO_MAX_EPOCHS, "patience": AUTO_PATIENCE})

    @property
    def epochs_label(self) -> str:
        return "auto" if self.patience is not None else str(self.epochs)

    def finished(self, history: list[dict]) -> bool:
        """Whether a member with this per-epoch ``history`` has trained enough: ``epochs`` epochs, or, with a
        ``patience``, when :func:`auto_stop_epoch` says its held-out Δ stopped improving (the same answer on
        every path and after every resume: it depends on the history alone)."""
        if len(history) >= self.epochs:
            return True
        if self.patience is None:
            return False
        return auto_stop_epoch([h["test_delta"] for h in history], self.epochs, self.patience) is not None

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer][1]

    @property
    def format(self) -> ImageFormat:
        return ImageFormat.parse(self.image_format)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record; the legacy 1×28×28 format and fp32 are implied, not written, so a 28×28
        fleet's manifest (and its run keys) are the same as before formats existed."""
        d = dataclasses.asdict(self)
        d["lr"] = self.resolved_lr
        if d["image_format"] == str(LEGACY):
            del d["image_format"]
        if d["precision"] == "fp32":  # implied, like the legacy format: older manifests and run keys unchanged
            del d["precision"]
        if d["patience"] is None:  # a fixed number of epochs, as before `--epochs auto`
            del d["patience"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def make_optimizer(name: str, params, lr: float | None = None, **options) -> torch.optim.Optimizer:
    """``options``: the optimizer's implementation switches (``foreach``), never its hyperparameters."""
    try:
        ctor, default_lr = OPTIMIZERS[name]
    except KeyError:
        raise UserError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}") from None
    return ctor(params, lr=default_lr if lr is None else lr, **options)


def as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x).to(device)


def autocast(precision: str, device) -> Any:
    """The forward passes' precision: a bfloat16 autocast context for ``bf16``, a no-op for ``fp32``."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, batch: torch.Tensor, optimizer, loss: str, precision: str = "fp32") -> float:
    """One optimizer step on ``batch`` (B, C, H, W); returns the batch's summed delta (δ in fp32 always)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, batch.device):
        recon = model(batch)
    d = per_sample_delta(batch, recon.float(), loss)
    d.mean().backward()
    optimizer.step()
    return float(d.detach().sum())


def train_one_epoch(model, x: torch.Tensor, optimizer, loss: str, batch_size: int,
                    generator: torch.Generator, precision: str = "fp32") -> float:
    """One pass over ``x`` (N, C, H, W) in a seeded random order; returns mean delta."""
    model.train()
    order = torch.randperm(len(x), generator=generator)
    total = 0.0
    for start in range(0, len(x), batch_size):
        total += train_step(model, x[order[start:start + batch_size]], optimizer, loss, precision)
    return total / len(x)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, loss: str, batch_size: int = 512) -> float:
    """Mean delta of ``x`` (N, C, H, W) through ``model``."""
    model.eval()
    total = 0.0
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        total += float(per_sample_delta(batch, model(batch), loss).sum())
    return total / len(x)


@torch.no_grad()
def evaluate_blocks(model, blocks, loss: str, device="cpu", batch_size: int = 512) -> float:
    """Mean delta of images arriving in blocks (arrays (n, C, H, W)) through ``model``; nan when there are none."""
    model.eval()
    total, n = 0.0, 0
    pieces = (block[start:start + batch_size] for block in blocks for start in range(0, len(block), batch_size))
    for batch in prefetch(pieces, device):  # on CUDA the next batch's copy overlaps this one's pass
        total += float(per_sample_delta(batch, model(batch), loss).sum())
        n += len(batch)
    return total / n if n else float("nan")


# `--epochs auto`: the rule's constants are in :mod:`simex_ray.choices`, with why.


def auto_stop_epoch(test_deltas, max_epochs: int = AUTO_MAX_EPOCHS, patience: int = AUTO_PATIENCE,
                    min_gain: float = AUTO_MIN_GAIN) -> int | None:
    """The epoch at which `--epochs auto` stops, given the held-out Δ after each epoch so far; None: go on.

    An epoch without a held-out Δ (NaN: no test split) never improves, and patience only counts from a first
    improving epoch: a member without a test split trains to ``max_epochs``."""
    deltas = [float(v) for v in test_deltas]
    if len(deltas) >= max_epochs:
        return len(deltas)
    best, last_gain = float("inf"), 0
    for epoch, v in enumerate(deltas, start=1):
        if np.isfinite(v) and v < best * (1.0 - min_gain):
            best, last_gain = v, epoch
    if last_gain and len(deltas) - last_gain >= patience:
        return len(deltas)
    return None


EpochCallback = Callable[[int, dict[str, float], dict[str, Any]], None]


def initial_model(config: TrainConfig, device="cpu") -> torch.nn.Module:
    """A member's autoencoder before training: seeded by the model seed, so every path starts alike."""
    torch.manual_seed(config.seed)
    return create_autoencoder(config.architecture, config.image_format).to(device)


def initial_state(config: TrainConfig, device="cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = initial_model(config, device)
    return model, make_optimizer(config.optimizer, model.parameters(), config.resolved_lr)


def resumed_state(config: TrainConfig, resume: dict[str, Any] | None, device="cpu"
                  ) -> tuple[torch.nn.Module, torch.optim.Optimizer, int, list[dict]]:
    """(model, optimizer, last epoch done, history): fresh (:func:`initial_state`), or restored from ``resume``
    (a state handed to ``on_epoch``)."""
    model, optimizer = initial_state(config, device)
    if resume is None:
        return model, optimizer, 0, []
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    log.info("resuming after epoch %d of %d", int(resume["epoch"]), config.epochs)
    return model, optimizer, int(resume["epoch"]), list(resume["history"])


def record_epoch(history: list[dict], metrics: dict, model, optimizer, on_epoch: EpochCallback | None,
                 epochs: int) -> None:
    """Append an epoch's metrics to ``history`` and hand ``on_epoch`` the checkpoint state (model, optimizer,
    epoch, history: what ``resume`` takes back)."""
    history.append(metrics)
    log.debug("epoch %d/%d %s", metrics["epoch"], epochs, metrics)
    if on_epoch is not None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": metrics["epoch"], "history": history}
        on_epoch(metrics["epoch"], metrics, state)


def train_member(x_train, x_test, config: TrainConfig, *, resume: dict[str, Any] | None = None,
                 on_epoch: EpochCallback | None = None, device="cpu") -> tuple[torch.nn.Module, list[dict]]:
    """Train one autoencoder; returns (model, per-epoch history).

    ``resume`` is a state previously handed to ``on_epoch`` (model, optimizer,
    epoch, history); training continues after that epoch. ``on_epoch(epoch,
    metrics, state)`` is called after every epoch (1-based) so a caller can
    checkpoint ``state`` and report ``metrics``.
    """
    x_train, x_test = as_tensor(x_train, device), as_tensor(x_test, device)
    if len(x_train) == 0:
        raise UserError("no training samples")
    model, optimizer, start, history = resumed_state(config, resume, device)
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)  # the clock goes on
    for epoch in range(start + 1, config.epochs + 1):
        if config.finished(history):
            break
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        train_delta = train_one_epoch(model, x_train, optimizer, config.loss, config.batch_size, g, config.precision)
        metrics = {
            "epoch": epoch,
            "train_delta": train_delta,
            "test_delta": evaluate(model, x_test, config.loss) if len(x_test) else float("nan"),
            "elapsed_s": time.perf_counter() - t0,
        }
        record_epoch(history, metrics, model, optimizer, on_epoch, config.epochs)
    return model, history


def train_member_streamed(reference, config: TrainConfig, *, resume: dict[str, Any] | None = None,
                          on_epoch: EpochCallback | None = None, device="cpu") -> tuple[torch.nn.Module, list[dict]]:
    """:func:`train_member` on a :class:`~simex_ray.data.streamed.StreamedReference`, read slice by slice here.

    The same steps, checkpoint state and callbacks; batches come in the reference's seeded order per epoch
    (a bounded shuffle buffer, not one permutation of everything) and the test Δ is that of its streamed
    held-out split. The first epoch's metrics also carry ``ref_mean_l2``, the training split's mean L2 norm
    (the paper's normaliser), measured on the way.
    """
    model, optimizer, start, history = resumed_state(config, resume, device)
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)  # the clock goes on
    for epoch in range(start + 1, config.epochs + 1):
        if config.finished(history):
            break
        model.train()
        total, n, norms = 0.0, 0, 0.0
        for batch in prefetch(reference.train_batches(epoch, config.batch_size, order_seed=config.seed), device):
            total += train_step(model, batch, optimizer, config.loss, config.precision)
            n += len(batch)
            if epoch == 1:
                norms += float(batch.detach().flatten(1).double().norm(dim=1).sum())
        if n == 0:
            raise UserError(f"{reference.spec}: no training samples")
        metrics = {
            "epoch": epoch,
            "train_delta": total / n,
            "test_delta": evaluate_blocks(model, reference.test_blocks(), config.loss, device),
            "elapsed_s": time.perf_counter() - t0,
        }
        if epoch == 1:
            metrics["ref_mean_l2"] = norms / n
        record_epoch(history, metrics, model, optimizer, on_epoch, config.epochs)
    return model, history

"""Base classifiers B(Y) trained K at a time, one fused forward and backward pass per step (Ray-free).

:func:`train_bases` is ``[train_base(**u) for u in units]``, to float tolerance: classifiers of one
:func:`base_key` (optimizer, learning rate, batch size, classes, image format) train side by side, as
:mod:`simex_ray.fused_training` trains autoencoders:

* each keeps its own LeNet-5 (seeded as :func:`~simex_ray.transfer.classifiers.train_classifier` seeds it),
  its own data, its own seeded order per epoch, its own early stopping (``max_epochs``, ``patience``) and
  the weights of its own minimum validation loss;
* a step runs every member's batch in one pass (:data:`PASSES`: grouped convolutions and batched matmuls for
  LeNet-5, else ``torch.func.vmap`` of the module); the loss is the sum over members of each one's batch mean
  cross-entropy, so each member's gradient is its own;
* one optimizer over every member's parameters: the optimizers are element-wise with per-parameter state, so
  this is K separate ones; a member without a batch (its epoch is over, or it has stopped) has no gradient
  and is skipped.

A member's ``seconds`` are its share of the fused steps (each step's time split among the members in it) plus
its own validation passes: what it cost, not the wall time of the group.

How many share a pass is bounded by memory (:func:`bases_per_pass`, the bound of the fused autoencoder
passes); ``per_pass=1`` is exactly today's one-after-another :func:`train_base`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..fused_training import IMPLEMENTATION, members_within, module_activation_floats, vmap_pass
from ..errors import UserError
from ..protocol import MapFn, Progress, run_units
from ..training import as_tensor
from .classifiers import (CLASSIFIER_LRS, BestEpoch, LeNet5, check_labels, evaluate_classifier, image_format_of,
                          make_classifier_optimizer, tested_base, train_base)


def lenet5_pass(models: Sequence[LeNet5], x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """K LeNet-5 classifiers, each on its own batch: x (K, B, C, H, W) -> logits (K, B, n_classes).

    Members are channel groups: both convolutions grouped, the three linear layers batched matmuls;
    max-pool before ELU (ELU is increasing: the same values and argmax); activations ``channels_last``
    (oneDNN's grouped convolutions, as in the fused autoencoder pass).
    """
    k, n = x.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def cat(get):
        return torch.cat([get(a) for a in models])

    def fc(h, i):  # (K, B, in) -> (K, B, out)
        w = torch.stack([a.head[i].weight for a in models]).transpose(1, 2)
        return torch.baddbmm(torch.stack([a.head[i].bias for a in models]).unsqueeze(1), h, w)

    h = models[0].resize(x.reshape(k * n, *x.shape[2:]))  # every member's resize is the same fixed matrices
    c, side = h.shape[1], h.shape[-1]
    h = h.view(k, n, c, side, side).transpose(0, 1).reshape(n, k * c, side, side).contiguous(memory_format=fmt)
    conv1, conv2 = models[0].features[0], models[0].features[3]
    h = F.conv2d(h, cat(lambda a: a.features[0].weight), cat(lambda a: a.features[0].bias),
                 padding=conv1.padding, groups=k)
    h = F.elu(F.max_pool2d(h, 2))  # (B, 6K, 14, 14)
    h = F.conv2d(h, cat(lambda a: a.features[3].weight), cat(lambda a: a.features[3].bias),
                 padding=conv2.padding, groups=k)
    h = F.elu(F.max_pool2d(h, 2))  # (B, 16K, 5, 5)
    h = h.reshape(n, k, 400).transpose(0, 1)  # (K, B, 400), each member's flatten order
    h = F.elu(fc(F.elu(fc(h, 1)), 3))  # (K, B, 84)
    return fc(h, 5)


# The fused pass of a classifier class; any other class takes vmap_pass. Kept where bench/training.py
# --classifiers measured it faster (docs/results.md, "Fused training").
PASSES: dict[type, Callable[[Sequence[nn.Module], torch.Tensor], torch.Tensor]] = {LeNet5: lenet5_pass}


def fused_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every member on its own batch: x (K, B, C, H, W) -> logits (K, B, n_classes)."""
    if len(models) == 1:
        return models[0](x[0]).unsqueeze(0)
    return PASSES.get(type(models[0]), vmap_pass)(models, x)


def base_key(unit: dict[str, Any]) -> tuple:
    """Units (:func:`train_base` kwargs) with one key train in one pass: all settings but the seed, the
    epochs and the patience."""
    opt, lr = unit.get("optimizer", "rmsprop"), unit.get("lr")
    return (opt, CLASSIFIER_LRS.get(opt) if lr is None else float(lr), unit.get("batch_size", 32),
            unit.get("n_classes", 10), str(image_format_of(unit["x_train"])))


def bases_per_pass(unit: dict[str, Any], members: int, budget: int | None = None) -> int:
    """How many of ``members`` classifiers like ``unit`` one fused pass trains on the CPU: as many as keep its
    activations within the fused autoencoder passes' bound (``budget`` bytes instead, where given)."""
    fmt = image_format_of(unit["x_train"])
    floats = module_activation_floats(LeNet5(unit.get("n_classes", 10), fmt), fmt.shape)
    return members_within(4 * unit.get("batch_size", 32) * floats, members, "cpu", budget)


def plan_bases(units: Sequence[dict[str, Any]], per_pass: int | None = None, parallel: int = 1
               ) -> list[list[int]]:
    """Indices of ``units`` grouped into fused passes: units of one :func:`base_key`, at most ``per_pass`` at a
    time (None: :func:`bases_per_pass`), and, where ``parallel`` groups run at once, small enough that every
    one of them gets a group; in the order given."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(base_key(u), []).append(i)
    spread = math.ceil(len(units) / max(1, parallel))
    passes = []
    for group in groups.values():
        step = min(per_pass or bases_per_pass(units[group[0]], len(group)), spread)
        passes += [group[i:i + step] for i in range(0, len(group), step)]
    return passes


class _Base:
    """One member of a fused group: train_classifier's state, spelled out."""

    def __init__(self, unit: dict[str, Any]):
        self.unit = unit
        n_classes = unit.get("n_classes", 10)
        self.seed, self.batch_size = unit.get("seed", 0), unit.get("batch_size", 32)
        self.max_epochs, self.patience = unit.get("max_epochs", 30), unit.get("patience", 5)
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise UserError(f"max_epochs, patience and batch_size must be >= 1, got {self.max_epochs}, "
                            f"{self.patience}, {self.batch_size}")
        self.format = image_format_of(unit["x_train"])
        torch.manual_seed(self.seed)
        self.model = LeNet5(n_classes, self.format)
        self.y_val = check_labels(unit["y_val"], n_classes, "validation labels")
        self.x = as_tensor(unit["x_train"])
        self.y = torch.as_tensor(check_labels(unit["y_train"], n_classes, "training labels"), dtype=torch.long)
        self.best = BestEpoch(self.patience)
        self.history: list[dict[str, float]] = []
        self.epoch, self.stopped = 0, False
        self.seconds = self.total = 0.0

    def end_epoch(self) -> None:
        t0 = time.perf_counter()
        val_loss, val_acc = evaluate_classifier(self.model, self.unit["x_val"], self.y_val)
        self.seconds += time.perf_counter() - t0
        metrics = {"epoch": self.epoch, "train_loss": self.total / len(self.x), "val_loss": val_loss,
                   "val_accuracy": val_acc, "elapsed_s": self.seconds}
        self.history.append(metrics)
        self.stopped = self.best.update(self.model, metrics, self.seconds) or self.epoch >= self.max_epochs

    def result(self) -> dict[str, Any]:
        """What :func:`train_base` returns."""
        u = self.unit
        self.model.load_state_dict(self.best.state)
        info = self.best.info(self.epoch, self.seconds, u.get("optimizer", "rmsprop"), u.get("lr"), "all",
                              len(self.x), len(self.y_val), self.history)
        return tested_base(self.best.state, info, self.model, u["x_test"], u["y_test"], self.format)


def train_base_group(units: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unit of work "train these base classifiers in fused passes": :func:`train_base`'s result per unit, in
    order. The units share one :func:`base_key`; one unit alone is :func:`train_base` itself."""
    units = list(units)
    if len(units) <= 1:
        return [train_base(**u) for u in units]
    if len({base_key(u) for u in units}) > 1:
        raise UserError("train_base_group needs classifiers of one optimizer, learning rate, batch size, class "
                        "count and image format; group them with plan_bases()")
    members = [_Base(u) for u in units]
    first = units[0]
    name = first.get("optimizer", "rmsprop")
    optimizer = make_classifier_optimizer(name, [p for m in members for p in m.model.parameters()],
                                          first.get("lr"), **IMPLEMENTATION.get(name, {}))
    while active := [m for m in members if not m.stopped]:
        t0 = time.perf_counter()
        _fused_epoch(active, optimizer)
        share = (time.perf_counter() - t0) / len(active)
        for m in active:
            m.seconds += share
            m.end_epoch()
    return [m.result() for m in members]


def _fused_epoch(members: list[_Base], optimizer: torch.optim.Optimizer) -> None:
    """One epoch of every member, each in its own seeded order (``train_classifier``'s), in fused steps."""
    orders = []
    for m in members:
        m.epoch += 1
        g = torch.Generator().manual_seed(m.seed * 100_003 + m.epoch)
        orders.append(torch.randperm(len(m.x), generator=g))
        m.model.train()
        m.total = 0.0
    batch = members[0].batch_size
    for step in range(max(math.ceil(len(m.x) / batch) for m in members)):
        lo = step * batch
        by_size: dict[int, list[tuple[_Base, torch.Tensor]]] = {}
        for m, order in zip(members, orders):
            if lo < len(order):
                idx = order[lo:lo + batch]
                by_size.setdefault(len(idx), []).append((m, idx))
        optimizer.zero_grad(set_to_none=True)
        for group in by_size.values():
            x = torch.stack([m.x[idx] for m, idx in group])  # (K, B, C, H, W)
            y = torch.stack([m.y[idx] for m, idx in group])  # (K, B)
            logits = fused_logits([m.model for m, _ in group], x)  # (K, B, n_classes)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
            loss.sum().backward()
            for (m, idx), value in zip(group, loss.detach().tolist()):
                m.total += value * len(idx)
        optimizer.step()


def train_bases(units: Sequence[dict[str, Any]], *, per_pass: int | None = None, groups: list[list[int]] | None = None,
                map_fn: MapFn | None = None, on_progress: Progress | None = None,
                stage: str = "base-classifiers") -> list[dict[str, Any]]:
    """:func:`train_base` of every unit (its kwargs), results in order; the units alike trained in fused passes
    of at most ``per_pass`` (None: :func:`bases_per_pass`'s memory bound; 1: one after another, exactly as
    before), or in the given ``groups`` (from :func:`plan_bases`).

    ``map_fn`` runs the groups (one :func:`train_base_group` unit each; :func:`train_base` units where every
    group is one classifier); a ``map_fn`` that runs several units at once says how many by a
    ``concurrency(total)`` attribute, and the groups are cut small enough to keep every one of them busy.
    ``on_progress(stage, done, total)`` counts classifiers (the ``map_fn``'s own progress, if any, its units).
    """
    units = list(units)
    if groups is None:
        concurrency = getattr(map_fn, "concurrency", None)
        groups = plan_bases(units, per_pass, concurrency(len(units)) if concurrency and units else 1)
    if all(len(g) == 1 for g in groups):
        done = run_units(train_base, [units[g[0]] for g in groups], stage=stage, map_fn=map_fn,
                         on_progress=on_progress)
        results = [[r] for r in done]
    else:
        ends = np.cumsum([0] + [len(g) for g in groups]).tolist()

        def counted(stage_: str, done_groups: int, _total: int) -> None:  # in classifiers, not groups
            if on_progress is not None:
                on_progress(stage_, ends[done_groups], len(units))
        results = run_units(train_base_group, [{"units": [units[i] for i in g]} for g in groups], stage=stage,
                            map_fn=map_fn, on_progress=counted)
    out: list[dict[str, Any] | None] = [None] * len(units)
    for group, got in zip(groups, results):
        for i, r in zip(group, got):
            out[i] = r
    return out  # type: ignore[return-value]


__all__ = ["PASSES", "base_key", "bases_per_pass", "fused_logits", "lenet5_pass", "plan_bases",
           "train_base_group", "train_bases"]

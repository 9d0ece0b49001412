"""Many fleet members trained at once on one worker: one fused forward and backward pass per step (Ray-free).

:func:`train_members` trains K autoencoders of one architecture, loss, image format, optimizer, learning rate
and batch size side by side. It is the arithmetic of K separate :func:`~simex_ray.training.train_member` runs:

* each member keeps its own parameters (the leaves of its own module), its own data, its own seeded order per
  epoch and so its own batches;
* a step concatenates the members' parameters and runs one forward and one backward pass for all of them
  (grouped convolutions, batched matmuls: :data:`FORWARDS`); the loss is the sum over members of each one's
  batch mean, so each member's gradient is the gradient of its own loss;
* one optimizer over every member's parameters steps them all. Adam, AdamW, RMSprop, SGD, Adagrad and Adadelta
  are element-wise with per-parameter state (the step count included), so this is K separate optimizers. A
  member without a batch in a step (its epoch, or its training, has ended) has no gradient and is skipped;
* members whose last batches differ in size run as one pass per size within the step.

The results equal separate training to float tolerance (tests, for every optimizer and both losses), and a
member's checkpoint has :func:`train_member`'s format, so either path resumes the other's.

How many members share a pass is bounded by memory (:func:`members_per_pass`), as the scoring engine's passes
are. Each choice in the fused LeNet pass was kept only where ``bench/training.py`` measured it faster
(docs/results.md, "Fused training").
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .losses import per_sample_delta
from .models import LeNetAutoencoder, create_autoencoder
from .scoring import polyphase_weights
from .training import TrainConfig, as_tensor, autocast, evaluate, initial_model, make_optimizer
from .errors import UserError

log = logging.getLogger(__name__)

# The activations a fused pass keeps for its backward, all members together, at most (bytes). On the CPU this
# bounds a worker's memory; on a GPU it is only a guard (one pass holds every member that fits it).
PASS_BYTES = {"cpu": 1 << 28, "cuda": 1 << 33}


# The fastest of torch's implementations of each optimizer over many members' parameters on the CPU
# (bench/training.py --optimizer; all compute the same element-wise update).
IMPLEMENTATION: dict[str, dict[str, bool]] = {
    "adam": {"fused": True}, "adamw": {"fused": True}, "adagrad": {"fused": True},
    "sgd": {"foreach": True}, "rmsprop": {"foreach": True}, "adadelta": {"foreach": True},
}


def fusable(config: TrainConfig) -> tuple:
    """Members whose configs give the same key train in one pass: all but the epochs and the model seed."""
    d = config.to_dict()
    return tuple(sorted((k, v) for k, v in d.items() if k not in ("epochs", "seed")))


@functools.lru_cache(maxsize=None)
def activation_floats(architecture: str, image_format: str) -> int:
    """Floats that one image's training pass through one member keeps for the backward (every layer's output)."""
    model = create_autoencoder(architecture, image_format)
    return module_activation_floats(model, model.image_format.shape)


def module_activation_floats(model: nn.Module, shape: Sequence[int]) -> int:
    """Floats that one input of ``shape`` (C, H, W) keeps for ``model``'s backward (every leaf layer's output,
    twice: what its backward saves beside it)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return 2 * total  # each layer's output and what its backward saves beside it (pool indices, pre-activations)


def members_per_pass(config: TrainConfig, members: int, device: torch.device | str = "cpu",
                     budget: int | None = None) -> int:
    """How many of ``members`` alike one fused pass trains: as many as keep its activations within
    :data:`PASS_BYTES` (``budget`` bytes instead, where given) at ``config.batch_size``."""
    per_member = 4 * config.batch_size * activation_floats(config.architecture, config.image_format)
    return members_within(per_member, members, device, budget)


def members_within(per_member: int, members: int, device: torch.device | str = "cpu",
                   budget: int | None = None) -> int:
    """How many of ``members`` fit one fused pass when each keeps ``per_member`` bytes of activations: the
    pass bound of :data:`PASS_BYTES` for the device's kind (``budget`` bytes instead, where given); at least 1."""
    kind = torch.device(device).type
    budget = budget if budget is not None else PASS_BYTES.get(kind, PASS_BYTES["cpu"])
    return max(1, min(members, budget // max(1, per_member)))


# --------------------------------------------------------------------------- the fused forward passes


def _up_conv_weights(t: Sequence[nn.ConvTranspose2d]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Members' ×2 upsample + stride-1 ``ConvTranspose2d`` as one polyphase convolution of the low-resolution
    input, differentiable in the members' weights: (4·out·K, in, kk, kk) weights, (4·out·K,) biases, padding.

    ``ConvTranspose2d(W, padding p)`` is ``Conv2d(flip(W)ᵀ, padding k - 1 - p)``, and a convolution after a
    nearest ×2 upsample is ``pixel_shuffle`` of a convolution of the input with the four phase kernels.
    """
    k, p = t[0].kernel_size[0], t[0].padding[0]
    w = torch.cat([c.weight.flip(-1, -2).transpose(0, 1) for c in t])  # (out·K, in, k, k)
    w4, pad = polyphase_weights(w, k - 1 - p)  # channels (out, a, b), as pixel_shuffle reads
    return w4, torch.cat([c.bias for c in t]).repeat_interleave(4), pad


def grouped_conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, padding: int) -> torch.Tensor:
    return F.conv2d(h, w, b, padding=padding, groups=groups)


def per_member_conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, padding: int) -> torch.Tensor:
    if groups == 1:
        return F.conv2d(h, w, b, padding=padding)
    parts = zip(h.chunk(groups, 1), w.chunk(groups, 0), b.chunk(groups, 0))
    return torch.cat([F.conv2d(hk, wk, bk, padding=padding) for hk, wk, bk in parts], 1)


@dataclass(frozen=True)
class LeNetPass:
    """K LeNet autoencoders, each on its own batch: x (K, B, 1, 28, 28) -> reconstructions of that shape.

    Members are channels: (B, K, 28, 28) in. conv1 and conv2 are grouped convolutions (``conv``), the four
    linear layers batched matmuls over members, and each upsample + transposed convolution one polyphase
    convolution (``polyphase``; 2.8x fewer multiply-adds in the last layer) run as ``decoder``; activations
    ``channels_last`` (oneDNN's grouped convolutions measured up to 3x faster on them).
    """

    conv: Callable = grouped_conv
    decoder: Callable = grouped_conv
    polyphase: bool = True
    channels_last: bool = True

    def __call__(self, models: Sequence[LeNetAutoencoder], x: torch.Tensor) -> torch.Tensor:
        k, n = x.shape[:2]

        def cat(get):
            return torch.cat([get(a) for a in models])

        def fc(h, get):  # (K, B, in) -> (K, B, out)
            w = torch.stack([get(a).weight for a in models]).transpose(1, 2)
            return torch.baddbmm(torch.stack([get(a).bias for a in models]).unsqueeze(1), h, w)

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        h = x.transpose(0, 1).reshape(n, k, 28, 28).contiguous(memory_format=fmt)
        # ELU is increasing, so pooling first keeps the values, the argmax and so the gradients
        h = F.conv2d(h, cat(lambda a: a.features[0].weight), cat(lambda a: a.features[0].bias), padding=2, groups=k)
        h = F.elu(F.max_pool2d(h, 2))  # (B, 6K, 14, 14)
        h = self.conv(h, cat(lambda a: a.features[3].weight), cat(lambda a: a.features[3].bias), k, 0)
        h = F.elu(F.max_pool2d(h, 2))  # (B, 16K, 5, 5)
        h = h.reshape(n, k, 400).transpose(0, 1)  # (K, B, 400)
        h = fc(F.elu(fc(h, lambda a: a.bottleneck[1])), lambda a: a.bottleneck[3])  # (K, B, 84): the codes
        h = F.elu(fc(F.elu(fc(F.elu(h), lambda a: a.expand[1])), lambda a: a.expand[3]))  # (K, B, 400)
        h = h.transpose(0, 1).reshape(n, 16 * k, 5, 5).contiguous(memory_format=fmt)
        h = F.elu(self._up(h, [a.reconstruct[1] for a in models], k))  # (B, 6K, 14, 14)
        h = torch.sigmoid(self._up(h, [a.reconstruct[4] for a in models], k))  # (B, K, 28, 28)
        return h.transpose(0, 1).unsqueeze(2)  # (K, B, 1, 28, 28)

    def _up(self, h: torch.Tensor, t: Sequence[nn.ConvTranspose2d], k: int) -> torch.Tensor:
        if self.polyphase:
            w, b, pad = _up_conv_weights(t)
            return F.pixel_shuffle(self.decoder(h, w, b, k, pad), 2)
        w = torch.cat([c.weight.flip(-1, -2).transpose(0, 1) for c in t])
        b = torch.cat([c.bias for c in t])
        return self.decoder(F.interpolate(h, scale_factor=2), w, b, k, t[0].kernel_size[0] - 1 - t[0].padding[0])


def vmap_pass(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Any architecture: ``torch.func.vmap`` of the module over the members' stacked parameters
    (its convolutions become grouped convolutions, its linear layers batched matmuls)."""
    from torch.func import functional_call, vmap

    # torch.stack, not torch.func.stack_module_state: that one returns new leaves, and the members' own
    # parameters would get no gradient
    named = [dict(m.named_parameters()) for m in models]
    params = {n: torch.stack([p[n] for p in named]) for n in named[0]}
    return vmap(lambda p, xk: functional_call(models[0], p, (xk,)))(params, x)


FORWARDS: dict[type, Callable[[Sequence[nn.Module], torch.Tensor], torch.Tensor]] = {LeNetAutoencoder: LeNetPass()}


def fused_forward(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every member on its own batch: x (K, B, C, H, W) -> reconstructions (K, B, C, H, W)."""
    if len(models) == 1:
        return models[0](x[0]).unsqueeze(0)
    return FORWARDS.get(type(models[0]), vmap_pass)(models, x)


def fused_delta(models: Sequence[nn.Module], x: torch.Tensor, loss: str) -> torch.Tensor:
    """δ of each member's batch through that member: x (K, B, C, H, W) -> (K, B)."""
    return delta_of(x, fused_forward(models, x), loss)


def delta_of(x: torch.Tensor, recon: torch.Tensor, loss: str) -> torch.Tensor:
    """δ of K members' batches: x and recon (K, B, C, H, W) -> (K, B)."""
    k, n = x.shape[:2]
    if loss == "mse":
        return (recon - x).pow(2).flatten(2).mean(-1)
    return per_sample_delta(x.reshape(k * n, *x.shape[2:]), recon.reshape(k * n, *x.shape[2:]), loss).view(k, n)


# --------------------------------------------------------------------------- training


@dataclass
class MemberJob:
    """One member to train in a fused pass: its config (fusable with the others'), data and resume state."""

    name: str
    config: TrainConfig
    x_train: Any  # (N, C, H, W) float array in [0, 1]
    x_test: Any
    resume: dict[str, Any] | None = None


# after each round of epochs: (name, metrics, state) of every member that trained one; the states are the live
# tensors of that moment (save or copy them before returning)
RoundCallback = Callable[[list[tuple[str, dict[str, float], dict[str, Any]]]], None]


class _Member:
    def __init__(self, job: MemberJob, device):
        self.job, self.config = job, job.config
        self.x_train, self.x_test = as_tensor(job.x_train, device), as_tensor(job.x_test, device)
        if len(self.x_train) == 0:
            raise UserError(f"{job.name}: no training samples")
        self.model = initial_model(self.config, device)  # train_member's initial weights
        self.params = list(self.model.parameters())
        self.epoch, self.history = 0, []
        self.t0 = self.train_total = 0.0  # when its clock started; its epoch's summed δ
        if job.resume is not None:
            self.model.load_state_dict(job.resume["model"])
            self.epoch, self.history = int(job.resume["epoch"]), list(job.resume["history"])

    def own_optimizer(self) -> torch.optim.Optimizer:
        """An optimizer of this member alone, as ``train_member`` makes it (its state format)."""
        return make_optimizer(self.config.optimizer, self.params, self.config.resolved_lr)

    @property
    def done(self) -> bool:
        return self.config.finished(self.history)


def train_members(jobs: Sequence[MemberJob], *, on_round: RoundCallback | None = None, device="cpu"
                  ) -> list[tuple[nn.Module, list[dict]]]:
    """Train members of one :func:`fusable` config together; returns (model, history) per job, in order.

    Each member resumes from its own ``resume`` state (members may stand at different epochs) and trains to its
    own ``config.epochs``. ``on_round(reports)`` is called after every round of epochs with ``train_member``'s
    metrics and checkpoint state (model, optimizer, epoch, history) of each member that trained in it.
    One member alone is exactly ``train_member`` (the same operations, in the same order).
    """
    jobs = list(jobs)
    if not jobs:
        return []
    if len({fusable(j.config) for j in jobs}) > 1:
        raise UserError("train_members needs members of one architecture, format, loss, optimizer, learning "
                         "rate and batch size; group them with fusable()")
    members = [_Member(j, device) for j in jobs]
    first = members[0].config
    options = IMPLEMENTATION.get(first.optimizer, {}) if len(members) > 1 else {}
    optimizer = make_optimizer(first.optimizer, [p for m in members for p in m.params], first.resolved_lr,
                               **options)
    for m in members:
        if m.job.resume is not None:
            own = m.own_optimizer()
            own.load_state_dict(m.job.resume["optimizer"])
            optimizer.state.update({p: own.state[p] for p in m.params if p in own.state})
    t0 = time.perf_counter()
    for m in members:
        m.t0 = t0 - (m.history[-1]["elapsed_s"] if m.history else 0.0)
    while active := [m for m in members if not m.done]:
        for m in active:
            m.epoch += 1
        _fused_epoch(active, optimizer, first.loss, first.batch_size, first.precision)
        reports = []
        for m in active:
            metrics = {
                "epoch": m.epoch,
                "train_delta": m.train_total / len(m.x_train),
                "test_delta": evaluate(m.model, m.x_test, m.config.loss) if len(m.x_test) else float("nan"),
                "elapsed_s": time.perf_counter() - m.t0,
            }
            m.history.append(metrics)
            if on_round is not None:
                own = m.own_optimizer()
                own.state.update({p: optimizer.state[p] for p in m.params if p in optimizer.state})
                reports.append((m.job.name, metrics, {"model": m.model.state_dict(), "optimizer": own.state_dict(),
                                                      "epoch": m.epoch, "history": m.history}))
        if on_round is not None:
            on_round(reports)
    return [(m.model, m.history) for m in members]


def _fused_epoch(members: list[_Member], optimizer: torch.optim.Optimizer, loss: str, batch_size: int,
                 precision: str = "fp32") -> None:
    """One epoch of every member, each in its own seeded order (``train_one_epoch``'s), in fused steps."""
    orders = []
    for m in members:
        g = torch.Generator().manual_seed(m.config.seed * 100_003 + m.epoch)
        orders.append(torch.randperm(len(m.x_train), generator=g))
        m.model.train()
        m.train_total = 0.0
    steps = max(math.ceil(len(m.x_train) / batch_size) for m in members)
    for step in range(steps):
        lo = step * batch_size
        by_size: dict[int, list[tuple[_Member, torch.Tensor]]] = {}
        for m, order in zip(members, orders):
            if lo < len(order):
                batch = m.x_train[order[lo:lo + batch_size]]
                by_size.setdefault(len(batch), []).append((m, batch))
        optimizer.zero_grad(set_to_none=True)
        for group in by_size.values():
            x = torch.stack([b for _, b in group])  # (K, B, C, H, W)
            with autocast(precision, x.device):
                recon = fused_forward([m.model for m, _ in group], x)
            d = delta_of(x, recon.float(), loss)  # (K, B), in fp32 always
            d.mean(1).sum().backward()
            for (m, _), total in zip(group, d.detach().sum(1).tolist()):
                m.train_total += total
        optimizer.step()


def plan_passes(configs: Sequence[TrainConfig], per_pass: int | None = None, device="cpu") -> list[list[int]]:
    """Indices of ``configs`` grouped into fused passes: members of one :func:`fusable` config, at most
    ``per_pass`` at a time (None: :func:`members_per_pass`'s memory bound), in the order given."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(fusable(c), []).append(i)
    passes = []
    for group in groups.values():
        step = per_pass or members_per_pass(configs[group[0]], len(group), device)
        passes += [group[i:i + step] for i in range(0, len(group), step)]
    return passes


__all__ = ["FORWARDS", "IMPLEMENTATION", "LeNetPass", "MemberJob", "activation_floats", "fused_delta",
           "fused_forward", "fusable", "members_per_pass", "members_within", "module_activation_floats",
           "plan_passes", "train_members", "vmap_pass"]

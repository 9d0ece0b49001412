"""Fleet training throughput, step by step, against the float32 matmul ceiling measured in the same run.

    python bench/training.py [--members 26] [--batch-size 16] [--images 320] [--threads 1]
    python bench/training.py --image-format 3x32x32 [--arch conv] ...
    python bench/training.py --classifiers --optimizer rmsprop --batch-size 32 [--epochs 1] ...

Trains K members (each its own slice of the digits, one epoch of ``--images`` images) two ways: one after
another with ``train_member`` (what a Train worker did before fused passes), and together with
``train_members`` (one fused forward and backward pass per step), the fused LeNet pass one change at a time.
Prints member-images/s of each step and its share of the ceiling: member-images/s x the model's nominal
training FLOP per image (forward and backward, torch's FLOP counter, on the layers as written) / matmul
FLOP/s. LeNet's polyphase decoder does fewer multiply-adds than the nominal count, so the steps that use it
report effective throughput. Every step's first-epoch test Δ is checked against separate training first.
``--classifiers`` does the same for base classifiers (``train_base`` one after another, ``fused_bases``'
passes), their test accuracy and validation loss checked first.
Each step's time is its best of ``--rounds`` turns, the steps taking turns (a busy spell on a shared
machine hits every step), and the ceiling is the best of bursts before and after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scoring import images, matmul_ceiling  # noqa: E402

from simex_ray import fused_training as ft  # noqa: E402
from simex_ray.formats import LEGACY, ImageFormat  # noqa: E402
from simex_ray.losses import per_sample_delta  # noqa: E402
from simex_ray.models import LeNetAutoencoder, create_autoencoder, default_architecture  # noqa: E402
from simex_ray.training import TrainConfig, train_member  # noqa: E402


def train_flops_per_image(config: TrainConfig) -> float:
    """Forward + backward FLOP per image of one member's training step (input needs no gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_autoencoder(config.architecture, config.image_format)
    x = torch.rand(config.batch_size, *config.format.shape)
    with FlopCounterMode(display=False) as counter:
        per_sample_delta(x, model(x), config.loss).mean().backward()
    return counter.get_total_flops() / config.batch_size


def separate(jobs):
    return [train_member(j.x_train, j.x_test, j.config)[1] for j in jobs]


def fused_with(forward):
    def run(jobs):
        old = ft.FORWARDS.get(LeNetAutoencoder)
        ft.FORWARDS[LeNetAutoencoder] = forward
        try:
            return [h for _, h in ft.train_members(jobs)]
        finally:
            ft.FORWARDS[LeNetAutoencoder] = old
    return run


LENET_STEPS = [
    ("members one after another (train_member)", separate),
    ("fused: vmap of the module", fused_with(ft.vmap_pass)),
    ("fused LeNet: grouped convs, upsample + conv",
     fused_with(ft.LeNetPass(conv=ft.grouped_conv, decoder=ft.grouped_conv, polyphase=False, channels_last=False))),
    ("+ polyphase decoder, grouped",
     fused_with(ft.LeNetPass(conv=ft.grouped_conv, decoder=ft.grouped_conv, channels_last=False))),
    ("+ polyphase decoder, per member",
     fused_with(ft.LeNetPass(conv=ft.grouped_conv, decoder=ft.per_member_conv, channels_last=False))),
    ("  conv2 per member too", fused_with(ft.LeNetPass(conv=ft.per_member_conv, decoder=ft.per_member_conv,
                                                         channels_last=False))),
    ("+ channels_last, decoder grouped", fused_with(ft.LeNetPass(conv=ft.grouped_conv, decoder=ft.grouped_conv))),
    ("+ channels_last, decoder per member", fused_with(ft.LeNetPass(conv=ft.grouped_conv, decoder=ft.per_member_conv))),
    ("as shipped (train_members)", fused_with(ft.FORWARDS[LeNetAutoencoder])),
]
OTHER_STEPS = [
    ("members one after another (train_member)", separate),
    ("as shipped (train_members: vmap)", lambda jobs: [h for _, h in ft.train_members(jobs)]),
]


def fused_bases_with(forward):
    from simex_ray.transfer import fused_bases as fb
    from simex_ray.transfer.classifiers import LeNet5

    def run(units):
        old = fb.PASSES[LeNet5]
        fb.PASSES[LeNet5] = forward
        try:
            return fb.train_base_group(units)
        finally:
            fb.PASSES[LeNet5] = old
    return run


def classifier_steps():
    from simex_ray.transfer import fused_bases as fb
    from simex_ray.transfer.classifiers import train_base

    return [
        ("classifiers one after another (train_base)", lambda units: [train_base(**u) for u in units]),
        ("fused: vmap of the module", fused_bases_with(ft.vmap_pass)),
        ("fused LeNet-5: grouped convs", fused_bases_with(lambda m, x: fb.lenet5_pass(m, x, channels_last=False))),
        ("+ channels_last (as shipped)", fused_bases_with(fb.lenet5_pass)),
    ]


def classifiers(args) -> None:
    """``--classifiers``: K base classifiers (LeNet-5, cross-entropy) one after another and fused."""
    from torch.utils.flop_counter import FlopCounterMode

    from simex_ray import data
    from simex_ray.transfer.classifiers import LeNet5

    ds = data.load("digits", fmt=args.image_format)
    rng = np.random.default_rng(0)
    units = []
    for k in range(args.members):  # each classifier its own images: a shuffled slice, and its own seed
        idx = rng.permutation(len(ds.x))
        tr, va, te = idx[:args.images], idx[args.images:args.images + 64], idx[args.images + 64:args.images + 128]
        units.append(dict(x_train=ds.x[tr], y_train=ds.y[tr], x_val=ds.x[va], y_val=ds.y[va], x_test=ds.x[te],
                          y_test=ds.y[te], optimizer=args.optimizer, lr=None, max_epochs=args.epochs,
                          patience=args.epochs, batch_size=args.batch_size, seed=k))
    model, xb = LeNet5(10, args.image_format), torch.as_tensor(ds.x[:args.batch_size])
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(xb), torch.as_tensor(ds.y[:args.batch_size])).backward()
    per_image = counter.get_total_flops() / args.batch_size
    steps = classifier_steps()
    ceiling = matmul_ceiling()
    print(f"torch {torch.__version__}, {args.threads} thread(s); float32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s; "
          f"LeNet-5 classifier at {args.image_format}, batch {args.batch_size}, {args.optimizer}: "
          f"{per_image / 1e6:.2f} MFLOP per training image")
    print(f"{args.members} classifiers x {args.images} images, {args.epochs} epoch(s) each (validation of 64 "
          f"images after each included); best of {args.rounds} rounds\n")
    reference = [(r["test_accuracy"], r["val_loss"]) for r in steps[0][1](units)]
    for name, fn in steps[1:]:
        got = [(r["test_accuracy"], r["val_loss"]) for r in fn(units)]
        assert np.allclose(got, reference, rtol=1e-3), f"{name}: accuracy / val loss differ from separate training"
    best = {name: float("inf") for name, _ in steps}
    for _ in range(args.rounds):
        for name, fn in steps:
            t0 = time.perf_counter()
            fn(units)
            best[name] = min(best[name], time.perf_counter() - t0)
    ceiling = max(ceiling, matmul_ceiling())
    total = args.members * args.images * args.epochs
    base = total / best[steps[0][0]]
    print(f"{'step':<44} {'seconds':>8} {'member-img/s':>13} {'of ceiling':>10} {'vs separate':>11}")
    for name, secs in best.items():
        rate = total / secs
        print(f"  {name:<42} {secs:>8.3f} {rate:>13,.0f} {rate * per_image / ceiling:>9.1%} {rate / base:>10.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifiers", action="store_true",
                   help="base classifiers (LeNet-5) instead of autoencoders: --optimizer rmsprop --batch-size 32 "
                        "are the protocol's")
    p.add_argument("--epochs", type=int, default=1, help="with --classifiers: epochs per classifier")
    p.add_argument("--image-format", type=ImageFormat.parse, default=LEGACY, help="CxHxW (default 1x28x28)")
    p.add_argument("--arch", choices=("lenet", "conv", "mlp"), help="default: lenet at 1x28x28, conv elsewhere")
    p.add_argument("--members", type=int, default=26)
    p.add_argument("--batch-size", type=int, default=16, help="(the paper's 16)")
    p.add_argument("--images", type=int, default=320, help="training images per member (one epoch)")
    p.add_argument("--loss", choices=("mse", "issim"), default="mse")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.classifiers:
        torch.set_num_threads(args.threads)
        return classifiers(args)
    fmt = args.image_format
    arch = args.arch or default_architecture(fmt)
    torch.set_num_threads(args.threads)
    config = TrainConfig(architecture=arch, image_format=str(fmt), epochs=1, batch_size=args.batch_size,
                         loss=args.loss, optimizer=args.optimizer)
    x = images(args.members * args.images + 64, fmt)
    rng = np.random.default_rng(0)
    jobs = []
    for k in range(args.members):  # each member its own images: a shuffled slice
        own = x[rng.permutation(len(x))[:args.images]]
        jobs.append(ft.MemberJob(f"m{k}", config, own, x[-64:]))
    steps = LENET_STEPS if arch == "lenet" else OTHER_STEPS
    ceiling = matmul_ceiling()
    per_image = train_flops_per_image(config)
    print(f"torch {torch.__version__}, {args.threads} thread(s); float32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s; "
          f"{arch} at {fmt}, batch {args.batch_size}, {args.optimizer}, δ = {args.loss}: "
          f"{per_image / 1e6:.2f} MFLOP per training image -> ceiling {ceiling / per_image:,.0f} member-images/s")
    print(f"{args.members} members x {args.images} images, one epoch; best of {args.rounds} rounds\n")
    reference = [h[0]["test_delta"] for h in separate(jobs)]
    for name, fn in steps:
        got = [h[0]["test_delta"] for h in fn(jobs)]
        assert np.allclose(got, reference, rtol=1e-3), f"{name}: test Δ differs from separate training"
    best = {name: float("inf") for name, _ in steps}
    for _ in range(args.rounds):
        for name, fn in steps:
            t0 = time.perf_counter()
            fn(jobs)
            best[name] = min(best[name], time.perf_counter() - t0)
    ceiling = max(ceiling, matmul_ceiling())
    total = args.members * args.images
    base = total / best[steps[0][0]]
    print(f"{'step':<44} {'seconds':>8} {'member-img/s':>13} {'of ceiling':>10} {'vs today':>9}"
          f"   (ceiling {ceiling / 1e9:.1f} GFLOP/s)")
    for name, secs in best.items():
        rate = total / secs
        print(f"  {name:<42} {secs:>8.3f} {rate:>13,.0f} {rate * per_image / ceiling:>9.1%} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()

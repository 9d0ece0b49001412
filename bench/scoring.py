"""Scoring throughput, step by step, against the float32 matmul ceiling measured in the same run.

    python bench/scoring.py [--images 10000] [--members 5,26] [--loss mse] [--threads 2]
    python bench/scoring.py --image-format 3x32x32 [--arch conv] [--images 4000] ...

Prints, for each fleet size, member-images per second of each step (the old
naive loop, then one change at a time, then the engine as shipped) and the
share of the ceiling: member-images/s x the model's nominal FLOP per image /
matmul FLOP/s. (LeNet's polyphase rewrite does fewer multiply-adds than the
nominal count, so its later steps report effective throughput.) Every step is
checked against the naive path first. The shipped engine is also timed in new
processes, with and without its allocator setting (process-wide, so it cannot
be undone inside one run).

``--image-format`` (default 1x28x28) scores images in that format (the digits,
converted; coloured by the ``colour:`` variant at three channels) with the
format's default architecture (``lenet`` at 1x28x28, ``conv`` elsewhere) or
``--arch``. Each step's time is its best of ``--rounds`` rounds, the steps taking
turns, and the ceiling is the best of short bursts before and after: on a
shared machine the best of each is what the code can do, and the same noise
hits every step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simex_ray import data
from simex_ray.formats import LEGACY, ImageFormat
from simex_ray.losses import per_sample_delta
from simex_ray.models import create_autoencoder, default_architecture
from simex_ray.scoring import FusedConv, FusedLeNet, ScoringEngine, delta_per_member, pass_rows


def matmul_ceiling(n: int = 2048, seconds: float = 2.0, bursts: int = 10) -> float:
    """Float32 GEMM rate (FLOP/s) on this machine with the current thread count: the best of
    ``bursts`` bursts of ``seconds / bursts`` each (other work on a shared machine only lowers a burst)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(bursts):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / bursts:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def flops_per_image(arch: str = "lenet", fmt: ImageFormat = LEGACY) -> float:
    """Forward FLOP per image (2 per multiply-add), from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_autoencoder(arch, fmt).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *fmt.shape))
    return float(counter.get_total_flops())


def images(n: int, fmt: ImageFormat = LEGACY) -> np.ndarray:
    x = data.load("colour:digits" if fmt.colour else "digits", fmt=fmt).x
    return np.concatenate([x] * (n // len(x) + 1))[:n]


def timed(fn, reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------- the steps


def naive(models, x, loss):
    """What Fleet.per_sample_delta did: member after member, batches of 512, no_grad, the nn modules."""
    with torch.no_grad():
        t = torch.from_numpy(x)
        return [torch.cat([per_sample_delta(b, m(b), loss) for b in torch.split(t, 512)]) for m in models]


def one_by_one(models, x, loss, chunk=256, **kw):
    """Each member on its own through FusedLeNet([member]) with the given rewrites."""
    nets = [FusedLeNet([m], **kw) for m in models]
    with torch.inference_mode():
        t = torch.from_numpy(x)
        return [torch.cat([delta_per_member(b, f(b), loss)[:, 0] for b in torch.split(t, chunk)]) for f in nets]


def fused(models, x, loss, chunk=256, channels_last=False, **kw):
    f = FusedLeNet(models, **kw)
    with torch.inference_mode():
        out = []
        for b in torch.split(torch.from_numpy(x), chunk):
            out.append(delta_per_member(b, f(b.contiguous(memory_format=torch.channels_last) if channels_last else b),
                                        loss))
        return torch.cat(out)


def conv_one_by_one(models, x, loss, chunk=256, whole=False, **kw):
    """Each member on its own through FusedConv([member]): whole chunks, or the engine's passes."""
    nets = [FusedConv([m], **kw) for m in models]
    with torch.inference_mode():
        t = torch.from_numpy(x)
        return [torch.cat([delta_per_member(r, f(r), loss)[:, 0] for b in torch.split(t, chunk)
                           for r in torch.split(b, chunk if whole else pass_rows(f, chunk))]) for f in nets]


def conv_fused(models, x, loss, chunk=256, whole=False, scale=1.0, **kw):
    """All members through one FusedConv, chunks of ``chunk``: whole, or in the engine's passes (× ``scale``)."""
    f = FusedConv(models, **kw)
    rows = chunk if whole else pass_rows(f, chunk, scale)
    with torch.inference_mode():
        return torch.cat([delta_per_member(r, f(r), loss) for b in torch.split(torch.from_numpy(x), chunk)
                          for r in torch.split(b, rows)])


def engine(models, x, loss, chunk=256, keep_memory=True):
    names = [f"m{i}" for i in range(len(models))]
    e = ScoringEngine(dict(zip(names, models)), {n: loss for n in names}, chunk=chunk, keep_memory=keep_memory)
    return e.per_sample(x)


FRESH = """
import sys, time, torch
sys.path.insert(0, {bench!r})
from scoring import engine, images
from simex_ray.formats import ImageFormat
from simex_ray.models import create_autoencoder
torch.set_num_threads({threads}); torch.manual_seed(0)
fmt = ImageFormat.parse({fmt!r})
models = [create_autoencoder({arch!r}, fmt).eval() for _ in range({k})]
x = images({n}, fmt)
engine(models, x[:512], {loss!r}, keep_memory={keep})
best = min(_t for _t in [(lambda t0: (engine(models, x, {loss!r}, keep_memory={keep}), time.perf_counter() - t0)[1])(
    time.perf_counter()) for _ in range(3)])
print(best)
"""


def fresh_process(k: int, n: int, loss: str, threads: int, keep: bool, arch: str = "lenet",
                  fmt: ImageFormat = LEGACY) -> float:
    """Seconds of the shipped engine in a new process: the allocator setting is process-wide, and a
    process that already ran other steps has had glibc adapt its thresholds, hiding the effect."""
    import subprocess
    import sys
    from pathlib import Path

    code = FRESH.format(bench=str(Path(__file__).parent), threads=threads, k=k, n=n, loss=loss, keep=keep,
                        arch=arch, fmt=str(fmt))
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                 .stdout.split()[-1])


SLOW = dict(polyphase=False, fast_ops=False)
STEPS = [
    ("naive loop (before)", naive),
    ("ConvTranspose2d as Conv2d, chunk 256", lambda m, x, l: one_by_one(m, x, l, **SLOW)),
    ("+ upsample folded (polyphase)", lambda m, x, l: one_by_one(m, x, l, polyphase=True, fast_ops=False)),
    ("+ pool before ELU, fast ELU/pool", lambda m, x, l: one_by_one(m, x, l)),
    ("+ members fused (conv1, FC)", fused),
    ("  fused, grouped convolutions", lambda m, x, l: fused(m, x, l, grouped=True)),
    ("  fused, channels-last input", lambda m, x, l: fused(m, x, l, channels_last=True)),
    ("  fused, chunk 64", lambda m, x, l: fused(m, x, l, chunk=64)),
    ("  fused, chunk 1024", lambda m, x, l: fused(m, x, l, chunk=1024)),
]
CONV_STEPS = [
    ("naive loop (before)", naive),
    ("each member alone, chunk 256", lambda m, x, l: conv_one_by_one(m, x, l, whole=True, **SLOW)),
    ("+ members fused (block 1, linear maps)", lambda m, x, l: conv_fused(m, x, l, whole=True, **SLOW)),
    ("+ ELU in place, vectorised kernels", lambda m, x, l: conv_fused(m, x, l, whole=True, polyphase=False)),
    ("+ transposed conv as 4 phase convs", lambda m, x, l: conv_fused(m, x, l, whole=True)),
    ("+ passes of <= 2 MB per member, thread", conv_fused),
    ("  fused, passes 4x larger", lambda m, x, l: conv_fused(m, x, l, scale=4)),
    ("  fused, passes 4x smaller", lambda m, x, l: conv_fused(m, x, l, scale=0.25)),
    ("  each member alone, all rewrites", conv_one_by_one),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-format", type=ImageFormat.parse, default=LEGACY, help="CxHxW (default 1x28x28)")
    p.add_argument("--arch", choices=("lenet", "conv"), help="default: lenet at 1x28x28, conv elsewhere")
    p.add_argument("--images", type=int, help="default 10,000 at 1x28x28, fewer for larger formats (same pixels)")
    p.add_argument("--members", default="5,26")
    p.add_argument("--loss", choices=("mse", "issim"), default="mse")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3, help="each step's time is its best of this many turns")
    args = p.parse_args()
    fmt = args.image_format
    arch = args.arch or default_architecture(fmt)
    n = args.images or max(500, 10_000 * LEGACY.pixels // fmt.pixels)
    torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling()
    per_image = flops_per_image(arch, fmt)
    x = images(n, fmt)
    steps = STEPS if arch == "lenet" else CONV_STEPS
    print(f"torch {torch.__version__}, {args.threads} thread(s); float32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s; "
          f"{arch} autoencoder at {fmt} {per_image / 1e6:.2f} MFLOP/image -> ceiling "
          f"{ceiling / per_image:,.0f} member-images/s")
    print(f"{n} images, δ = {args.loss}, best of {args.rounds} rounds\n")
    for k in (int(v) for v in args.members.split(",")):
        torch.manual_seed(0)
        models = [create_autoencoder(arch, fmt).eval() for _ in range(k)]
        reference = np.stack([d.double().numpy() for d in naive(models, x[:256], args.loss)])
        for name, fn in steps:
            out = fn(models, x[:256], args.loss)
            got = np.asarray(out.double().numpy().T if torch.is_tensor(out) else
                             (np.stack([o.double().numpy() for o in out]) if isinstance(out, list) else out))
            assert np.allclose(got, reference, rtol=1e-4, atol=1e-6), f"{name}: differs from the naive path"
        best = {name: float("inf") for name, _ in steps}
        for _ in range(args.rounds):  # the steps take turns, so a busy spell on a shared machine hits all
            for name, fn in steps:
                t0 = time.perf_counter()
                fn(models, x, args.loss)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, keep in (("engine, new process, default allocator", False), ("engine as shipped, new process", True)):
            best[name] = fresh_process(k, len(x), args.loss, args.threads, keep, arch, fmt)
        ceiling = max(ceiling, matmul_ceiling())  # the best of before and after
        print(f"{k} members{'':<31} {'seconds':>8} {'member-img/s':>13} {'of ceiling':>10} {'vs naive':>9}"
              f"   (ceiling {ceiling / 1e9:.1f} GFLOP/s)")
        base = k * len(x) / best[steps[0][0]]
        for name, secs in best.items():
            rate = k * len(x) / secs
            print(f"  {name:<38} {secs:>8.3f} {rate:>13,.0f} {rate * per_image / ceiling:>9.1%} {rate / base:>8.1f}x")
        print()


if __name__ == "__main__":
    main()

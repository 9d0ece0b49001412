"""Scoring throughput, step by step, against the float32 matmul ceiling measured in the same run.

    python bench/scoring.py [--images 10000] [--members 5,26] [--loss mse] [--threads 2]

Prints, for each fleet size, member-images per second of each step (the old
naive loop, then one change at a time, then the engine as shipped) and the
share of the ceiling: member-images/s x the model's nominal FLOP per image /
matmul FLOP/s. (The polyphase rewrite does fewer multiply-adds than the
nominal count, so later steps report effective throughput.) Every step is
checked against the naive path first. The shipped engine is also timed in new
processes, with and without its allocator setting (process-wide, so it cannot
be undone inside one run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simex_ray import data
from simex_ray.losses import per_sample_delta
from simex_ray.models import create_autoencoder
from simex_ray.scoring import FusedLeNet, ScoringEngine, delta_per_member


def matmul_ceiling(n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained float32 GEMM rate (FLOP/s) on this machine with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_image() -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_autoencoder("lenet").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 1, 28, 28))
    return float(counter.get_total_flops())


def images(n: int) -> np.ndarray:
    x = data.load("digits").x
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


def engine(models, x, loss, chunk=256, keep_memory=True):
    names = [f"m{i}" for i in range(len(models))]
    e = ScoringEngine(dict(zip(names, models)), {n: loss for n in names}, chunk=chunk, keep_memory=keep_memory)
    return e.per_sample(x)


FRESH = """
import sys, time, torch
sys.path.insert(0, {bench!r})
from scoring import engine, images
from simex_ray.models import create_autoencoder
torch.set_num_threads({threads}); torch.manual_seed(0)
models = [create_autoencoder("lenet").eval() for _ in range({k})]
x = images({n})
engine(models, x[:512], {loss!r}, keep_memory={keep})
best = min(_t for _t in [(lambda t0: (engine(models, x, {loss!r}, keep_memory={keep}), time.perf_counter() - t0)[1])(
    time.perf_counter()) for _ in range(3)])
print(best)
"""


def fresh_process(k: int, n: int, loss: str, threads: int, keep: bool) -> float:
    """Seconds of the shipped engine in a new process: the allocator setting is process-wide, and a
    process that already ran other steps has had glibc adapt its thresholds, hiding the effect."""
    import subprocess
    import sys
    from pathlib import Path

    code = FRESH.format(bench=str(Path(__file__).parent), threads=threads, k=k, n=n, loss=loss, keep=keep)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--members", default="5,26")
    p.add_argument("--loss", choices=("mse", "issim"), default="mse")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling()
    per_image = flops_per_image()
    x = images(args.images)
    print(f"torch {torch.__version__}, {args.threads} thread(s); float32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s; "
          f"LeNet autoencoder {per_image / 1e6:.2f} MFLOP/image -> ceiling {ceiling / per_image:,.0f} member-images/s")
    print(f"{args.images} images, δ = {args.loss}\n")
    for k in (int(v) for v in args.members.split(",")):
        torch.manual_seed(0)
        models = [create_autoencoder("lenet").eval() for _ in range(k)]
        reference = np.stack([d.double().numpy() for d in naive(models, x[:256], args.loss)])
        print(f"{k} members{'':<31} {'seconds':>8} {'member-img/s':>13} {'of ceiling':>10} {'vs naive':>9}")
        base = None
        for name, fn in STEPS:
            out = fn(models, x[:256], args.loss)
            got = np.asarray(out.double().numpy().T if torch.is_tensor(out) else
                             (np.stack([o.double().numpy() for o in out]) if isinstance(out, list) else out))
            assert np.allclose(got, reference, rtol=1e-4, atol=1e-6), f"{name}: differs from the naive path"
            secs = timed(lambda: fn(models, x, args.loss), reps=2 if k > 10 else 3)
            rate = k * len(x) / secs
            base = base or rate
            print(f"  {name:<38} {secs:>8.3f} {rate:>13,.0f} {rate * per_image / ceiling:>9.1%} {rate / base:>8.1f}x")
        for name, keep in (("engine, new process, default allocator", False), ("engine as shipped, new process", True)):
            secs = fresh_process(k, len(x), args.loss, args.threads, keep)
            rate = k * len(x) / secs
            print(f"  {name:<38} {secs:>8.3f} {rate:>13,.0f} {rate * per_image / ceiling:>9.1%} {rate / base:>8.1f}x")
        print()


if __name__ == "__main__":
    main()

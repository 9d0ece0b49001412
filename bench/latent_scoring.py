"""What the latent distance z costs at scoring time: the fused engine with and without it, same process.

    python bench/latent_scoring.py [--images 2048] [--members 5,30] [--repeats 5]

Per architecture (lenet at 1x28x28, conv at 3x32x32) and fleet size: the best of ``--repeats`` of
``ScoringEngine.per_sample(x)`` (δ only) and ``per_sample(x, latent=True)`` (δ and z from the same pass's codes,
one batched float64 matmul per fused group), untrained members with Ledoit-Wolf moments of random codes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simex_ray.fleet.latent import encode_all, fit_moments
from simex_ray.formats import ImageFormat
from simex_ray.models import create_autoencoder
from simex_ray.scoring import ScoringEngine


def best(fn, repeats: int) -> float:
    fn()  # warm-up: plans, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--members", default="5,30")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, {args.images} images")
    print(f"{'arch':<6} {'format':<8} {'members':>7} {'δ only s':>9} {'δ + z s':>9} {'ratio':>6}")
    for arch, fmt in (("lenet", "1x28x28"), ("conv", "3x32x32")):
        f = ImageFormat.parse(fmt)
        rng = np.random.default_rng(0)
        x = rng.random((args.images, *f.shape)).astype(np.float32)
        for m in map(int, args.members.split(",")):
            torch.manual_seed(0)
            models = {f"m{i}": create_autoencoder(arch, f).eval() for i in range(m)}
            moments = {n: fit_moments(encode_all(a, x[:512])) for n, a in models.items()}
            engine = ScoringEngine(models, {n: "mse" for n in models}, device=args.device, moments=moments)
            plain = best(lambda: engine.per_sample(x), args.repeats)
            both = best(lambda: engine.per_sample(x, latent=True), args.repeats)
            print(f"{arch:<6} {fmt:<8} {m:>7} {plain:>9.3f} {both:>9.3f} {both / plain:>6.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Training and scoring throughput on the current device (a GPU if there is one), against its matmul peak.

    python bench/gpu.py                 # on a GPU machine: the full set
    python bench/gpu.py --quick         # small sizes (a CPU smoke run)

Ray-free: only torch, numpy and simex_ray's core (a GPU machine without Ray or a package index runs it with
``PYTHONPATH=.``). Prints, for the device it finds:

* the matmul peak, float32 (TF32 off) and bfloat16, measured here (8192² products on a GPU);
* training: a fused LeNet fleet of 10 and 100 members (batch 16 each, the paper's) and one ``conv`` member at
  3×32×32 and 3×64×64 (batch 128), each in float32 and under bfloat16 autocast: member-images/s and the share
  of the matching peak (nominal training FLOP per image from torch's FLOP counter);
* scoring: the engine on 100 LeNet members and on one conv member at 3×64×64, member-images/s and share,
  its chunks copied to the device by ``simex_ray.device.prefetch`` (pinned, overlapped) and plainly;
* the choices a GPU session is to make: training (float32) of LeNet (10 and 100 members) and conv (3×32×32,
  3×64×64) with the weights and activations ``channels_last`` or not, fed from batches already on the device,
  copied from host memory each step plainly, or by ``prefetch`` (the next copy overlapping this step).

Synthetic images (uniform noise): throughput does not depend on the pixels. Each figure is the best of
``--rounds`` timed runs after a warm-up, with the device synchronised.
"""

from __future__ import annotations

import argparse
import time

import torch

from simex_ray import fused_training as ft
from simex_ray.device import float_batch, prefetch
from simex_ray.fused_training import fused_delta
from simex_ray.losses import per_sample_delta
from simex_ray.models import create_autoencoder
from simex_ray.scoring import ScoringEngine, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device, rounds: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, rounds: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 2
    secs = best_of(lambda: [torch.mm(a, b) for _ in range(reps)], device, rounds)
    return 2 * n**3 * reps / secs


def train_flops(arch: str, fmt: str, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_autoencoder(arch, fmt)
    x = torch.rand(batch, *model.image_format.shape)
    with FlopCounterMode(display=False) as counter:
        per_sample_delta(x, model(x), "mse").mean().backward()
    return counter.get_total_flops() / batch


FEEDS = ("on device", "from host", "from host, prefetched")


def training(arch: str, fmt: str, members: int, batch: int, steps: int, device, bf16: bool, rounds: int,
             channels_last: bool | None = None, feed: str = "on device") -> float:
    """Member-images/s of ``steps`` fused training steps (Adam) of ``members`` members, each its own batch.

    ``channels_last`` (None: on a GPU only): the weights and the activations in that memory format (LeNet:
    the fused pass's activations; one member: its weights and input). ``feed``: the batches already on the
    device, or copied from host memory each step, plainly (``.to(device)``) or by
    :func:`simex_ray.device.prefetch` (pinned, the next copy overlapping this step)."""
    torch.manual_seed(0)
    cl = device.type == "cuda" if channels_last is None else channels_last
    fmt_ = torch.channels_last if cl else torch.contiguous_format
    models = [create_autoencoder(arch, fmt).to(device).to(memory_format=fmt_) for _ in range(members)]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.Adam(params, 1e-3, **({"fused": True} if device.type == "cuda" else {}))
    shape = (members, batch, *models[0].image_format.shape)
    host = [torch.rand(shape).numpy() for _ in range(steps)]  # distinct batches: every copy is a real one
    on_device = torch.rand(shape, device=device)
    lenet = ft.LeNetPass(channels_last=cl)

    def delta(x):
        if members == 1:
            x0 = x[0].contiguous(memory_format=fmt_)
            return per_sample_delta(x0, models[0](x0).float(), "mse").unsqueeze(0)
        if arch == "lenet":
            return ft.delta_of(x, lenet(models, x).float(), "mse")
        return fused_delta(models, x, "mse")

    def batches():
        if feed == "on device":
            return (on_device for _ in range(steps))
        if feed == "from host":
            return (float_batch(h, device) for h in host)
        return prefetch(host, device)

    def run():
        for x in batches():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                d = delta(x)
            d.float().mean(1).sum().backward()
            opt.step()

    return members * batch * steps / best_of(run, device, rounds)


def scoring_fed(arch: str, fmt: str, members: int, images: int, device, rounds: int, overlap: bool) -> float:
    """:func:`scoring` with the engine's chunks copied by :func:`prefetch` (``overlap``) or plainly."""
    if overlap:
        return scoring(arch, fmt, members, images, device, rounds)
    import simex_ray.scoring as engine

    kept = engine.prefetch
    engine.prefetch = lambda blocks, dev: (float_batch(b, dev) for b in blocks)
    try:
        return scoring(arch, fmt, members, images, device, rounds)
    finally:
        engine.prefetch = kept


def scoring(arch: str, fmt: str, members: int, images: int, device, rounds: int) -> float:
    torch.manual_seed(0)
    models = {f"m{k}": create_autoencoder(arch, fmt) for k in range(members)}
    engine = ScoringEngine(models, {n: "mse" for n in models}, device=device, chunk=1024 if device.type == "cuda"
                           else 256)
    x = torch.rand(images, *next(iter(models.values())).image_format.shape).numpy()
    return members * images / best_of(lambda: engine.per_sample(x), device, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    quick = args.quick or device.type == "cpu"
    n = 1024 if quick else 8192
    fp32, bf16 = matmul_peak(device, torch.float32, n, args.rounds), matmul_peak(device, torch.bfloat16, n, args.rounds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}: matmul peak float32 {fp32 / 1e12:.2f} TFLOP/s, "
          f"bfloat16 {bf16 / 1e12:.2f} TFLOP/s{' (quick sizes)' if quick else ''}")
    print(f"\n{'training':<36} {'precision':>9} {'member-img/s':>13} {'of peak':>8}")
    steps = 3 if quick else 20
    cases = [("lenet", "1x28x28", 10, 16), ("lenet", "1x28x28", 100, 16), ("conv", "3x32x32", 1, 128),
             ("conv", "3x64x64", 1, 128)]
    if quick:
        cases = [("lenet", "1x28x28", 10, 16), ("conv", "3x32x32", 1, 32)]
    for arch, fmt, members, batch in cases:
        per_image = train_flops(arch, fmt, batch)
        for label, half in (("float32", False), ("bfloat16", True)):
            rate = training(arch, fmt, members, batch, steps, device, half, args.rounds)
            peak = bf16 if half else fp32
            print(f"  {arch} {fmt}, {members} member(s), batch {batch:<4} {label:>9} {rate:>13,.0f} "
                  f"{rate * per_image / peak:>7.1%}", flush=True)
    print(f"\n{'scoring (engine, float32)':<36} {'':>9} {'member-img/s':>13} {'of peak':>8}")
    from torch.utils.flop_counter import FlopCounterMode

    for arch, fmt, members, images in ([("lenet", "1x28x28", 10, 512)] if quick else
                                       [("lenet", "1x28x28", 100, 8192), ("conv", "3x64x64", 1, 8192)]):
        model = create_autoencoder(arch, fmt)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.rand(1, *model.image_format.shape))
        for overlap in (True, False):
            rate = scoring_fed(arch, fmt, members, images, device, args.rounds, overlap)
            print(f"  {arch} {fmt}, {members} member(s){'':<12} {'':>9} {rate:>13,.0f} "
                  f"{rate * counter.get_total_flops() / fp32:>7.1%}   "
                  f"chunks {'prefetched' if overlap else 'copied plainly'}", flush=True)

    print(f"\n{'memory format and host copies (fp32)':<36} {'layout':>14} {'feed':>22} {'member-img/s':>13}")
    cases = ([("lenet", "1x28x28", 10, 16), ("conv", "3x32x32", 1, 32)] if quick else
             [("lenet", "1x28x28", 10, 16), ("lenet", "1x28x28", 100, 16), ("conv", "3x32x32", 1, 128),
              ("conv", "3x64x64", 1, 128)])
    for arch, fmt, members, batch in cases:
        for cl in (False, True):
            for feed in FEEDS:
                rate = training(arch, fmt, members, batch, steps, device, False, args.rounds, cl, feed)
                print(f"  {arch} {fmt}, {members} member(s), batch {batch:<4} "
                      f"{'channels_last' if cl else 'contiguous':>14} {feed:>22} {rate:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()

"""What bfloat16 autocast does to Δ: a fleet trained in fp32 and in bf16, each scored in fp32 and in bf16.

    python bench/precision.py [--refs digits,rotated:digits,bgrand:digits] [--samples 600] [--epochs 3]

Trains the fleet of ``--refs`` twice in this process (``precision`` fp32, bf16; the same seeds), then scores
every reference's held-out test split with both fleets, each with the engine in fp32 and in bf16. Prints the
Δ matrices' largest relative difference to the all-fp32 one, and for each unknown the reference ranked first
(raw Δ) by each combination. On a GPU bf16 is about speed; here (a CPU) only its effect on Δ is measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from simex_ray import data
from simex_ray.fleet import Fleet
from simex_ray.fleet.build import train_fleet_local
from simex_ray.fleet.plan import plan_fleet
from simex_ray.training import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", default="digits,rotated:digits,bgrand:digits")
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    refs = data.split_specs(args.refs)
    tests = {r: data.prepare(r, samples=args.samples)[1].x for r in refs}
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for train in ("fp32", "bf16"):
            t0 = time.perf_counter()
            train_fleet_local(plan_fleet(refs, TrainConfig(epochs=args.epochs, precision=train),
                                         samples=args.samples), f"{tmp}/{train}")
            seconds[train] = time.perf_counter() - t0
            for score in ("fp32", "bf16"):
                fleet = Fleet.load(f"{tmp}/{train}")
                fleet.precision = score
                results[train, score] = np.array([[fleet.score(x).delta[r] for r in refs] for x in tests.values()])
    base = results["fp32", "fp32"]
    print(f"{len(refs)} references, {args.samples} samples, {args.epochs} epochs; training wall s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"{'train / score':<14} {'largest rel. diff of Δ':>23}   first-ranked reference per unknown")
    for (train, score), delta in results.items():
        rel = np.abs(delta / base - 1).max()
        firsts = [refs[i] for i in delta.argmin(1)]
        own = sum(f == r for f, r in zip(firsts, refs))
        print(f"{train + ' / ' + score:<14} {rel:>23.2e}   own first {own}/{len(refs)}: {', '.join(firsts)}")


if __name__ == "__main__":
    main()

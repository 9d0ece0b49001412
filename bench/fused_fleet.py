"""A per-class fleet trained with and without fused passes, in one run: time, test Δ per member, rankings.

    python bench/fused_fleet.py [--refs digits,rotated:digits,bgrand:digits] [--samples 600] [--epochs 3]
    python bench/fused_fleet.py --refs npz:letters.npz --epochs 5   # e.g. 26 letter classes

Trains the per-class fleet of ``--refs`` in this process twice: ``--members-per-pass 1`` (one member after
another, what training did before fused passes) and the default (members alike in fused passes), each
``--threads`` threads. Prints the wall time of each and their ratio, the largest relative difference of a
member's final test Δ, and for every member's held-out test split the reference each fleet ranks first
(raw Δ), so the two fleets' answers can be compared one by one.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from simex_ray import data
from simex_ray.fleet import Fleet
from simex_ray.fleet.build import train_fleet_local
from simex_ray.fleet.plan import plan_fleet
from simex_ray.training import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", default="digits,rotated:digits,bgrand:digits")
    p.add_argument("--samples", type=int, default=None, help="per class (default: every image)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    refs = data.split_specs(args.refs)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)
    plans = plan_fleet(refs, config, samples=args.samples, per_class=True, seed=0)
    images = sum(len(pl.x_train) for pl in plans)
    print(f"{len(plans)} members ({', '.join(refs)} per class), {images:,} training images, {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.threads} thread(s)")
    fleets, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, per_pass in (("one after another", 1), ("fused passes", None)):
            t0 = time.perf_counter()
            train_fleet_local(plans, f"{tmp}/{per_pass}", members_per_pass=per_pass)
            seconds[label] = time.perf_counter() - t0
            fleets[label] = Fleet.load(f"{tmp}/{per_pass}")
    for label, secs in seconds.items():
        rate = images * args.epochs / secs
        print(f"  {label:<18} {secs:8.1f} s  {rate:10,.0f} member-images/s")
    a, b = fleets.values()
    print(f"  fused / one after another: {seconds['one after another'] / seconds['fused passes']:.2f}x faster")
    rel = [abs(a.members[n].metrics["test_delta"] / b.members[n].metrics["test_delta"] - 1) for n in a.members]
    print(f"  final test Δ per member: largest relative difference {max(rel):.2e}, median {np.median(rel):.2e}")
    same = 0
    for pl in plans:
        first = [f.score(pl.x_test).ranking[0] for f in (a, b)]
        same += first[0] == first[1]
        own = "own" if first[0] == pl.name else first[0]
        print(f"    {pl.name:<28} first: {own:<24} {'same' if first[0] == first[1] else 'DIFFERS: ' + first[1]}")
    print(f"  held-out test splits ranked first the same by both fleets: {same} / {len(plans)}")


if __name__ == "__main__":
    main()

"""A per-class fleet trained with and without fused passes, in one run: time, test Δ per member, rankings.

    python bench/fused_fleet.py [--refs digits,rotated:digits,bgrand:digits] [--samples 600] [--epochs 3]
    python bench/fused_fleet.py --refs npz:letters.npz --epochs 5   # e.g. 26 letter classes

Trains the per-class fleet of ``--refs`` in this process twice: ``--members-per-pass 1`` (one member after
another, what training did before fused passes) and the default (members alike in fused passes), each
``--threads`` threads. Prints the wall time of each and their ratio, the largest relative difference of a
member's final test Δ, and for every member's held-out test split the reference each fleet ranks first
(raw Δ), so the two fleets' answers can be compared one by one.

    python bench/fused_fleet.py --bases [--refs ...] [--seeds 3] [--protocol default] [--samples 600]

trains the base classifiers B(Y) of ``--refs`` (× ``--seeds``, under the protocol's classifier settings,
early stopping included) the same two ways (``simex train-bases --members-per-pass 1`` and the default) and
prints the wall time (best of ``--rounds`` turns, taken in alternation), member-images/s (each classifier's
training images × the epochs it ran) and each classifier's epochs and test accuracy both ways.
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
    p.add_argument("--bases", action="store_true", help="base classifiers instead of a per-class fleet")
    p.add_argument("--seeds", type=int, default=1, help="with --bases: classifier seeds per reference")
    p.add_argument("--protocol", default="default", help="with --bases: preset or JSON file")
    p.add_argument("--rounds", type=int, default=1, help="with --bases: best of this many turns each")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.bases:
        return bases(args)
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


def bases(args) -> None:
    from simex_ray.protocol import load_protocol, load_splits
    from simex_ray.transfer.fused_bases import plan_bases, train_bases

    protocol = load_protocol(args.protocol)
    refs = data.split_specs(args.refs)
    units, names = [], []
    for ref in refs:
        sp = load_splits(ref, samples=args.samples, data_seed=0, protocol=protocol)
        for seed in range(args.seeds):
            names.append(f"{ref}@s{seed}")
            units.append(dict(**sp.clf_kwargs(), optimizer=protocol.base_optimizer, lr=protocol.base_lr,
                              max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
                              batch_size=protocol.clf_batch_size, seed=seed, n_classes=protocol.n_classes))
    print(f"{len(units)} base classifiers ({', '.join(refs)} x {args.seeds} seed(s)), protocol {args.protocol}: "
          f"{protocol.base_optimizer}, batch {protocol.clf_batch_size}, up to {protocol.clf_max_epochs} epochs, "
          f"patience {protocol.clf_patience}; {args.threads} thread(s); fused passes: {plan_bases(units)}")
    results, seconds = {}, {"one after another": float("inf"), "fused passes": float("inf")}
    for _ in range(args.rounds):  # the two take turns: a busy spell on a shared machine hits both
        for label, per_pass in (("one after another", 1), ("fused passes", None)):
            t0 = time.perf_counter()
            results[label] = train_bases(units, per_pass=per_pass)
            seconds[label] = min(seconds[label], time.perf_counter() - t0)
    for label, secs in seconds.items():
        images = sum(r["n_train"] * r["epochs_run"] for r in results[label])
        print(f"  {label:<18} {secs:8.1f} s  {images / secs:10,.0f} member-images/s")
    print(f"  fused / one after another: {seconds['one after another'] / seconds['fused passes']:.2f}x faster")
    a, b = results.values()
    for name, ra, rb in zip(names, a, b):
        print(f"    {name:<28} epochs {ra['epochs_run']:>2} / {rb['epochs_run']:>2}  test accuracy "
              f"{ra['test_accuracy']:.4f} / {rb['test_accuracy']:.4f}")
    same = sum(ra["test_accuracy"] == rb["test_accuracy"] for ra, rb in zip(a, b))
    print(f"  same test accuracy both ways: {same} / {len(a)}; largest difference "
          f"{max(abs(ra['test_accuracy'] - rb['test_accuracy']) for ra, rb in zip(a, b)):.4f}")


if __name__ == "__main__":
    main()

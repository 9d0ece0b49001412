"""One member trained on one Train worker and data-parallel on two, in one run: images/s and test Δ.

    python bench/data_parallel.py [--cases lenet:1x28x28:16,conv:3x32x32:64] [--epochs 4] [--address auto]

Each case is ``architecture:format:batch``; the reference is the UCI digits (coloured by ``colour:`` at three
channels), whole. Each worker gets one CPU (the 2-core machine: one worker, then two). Images/s is the
training split's size over the member's fastest epoch after the first (its ``elapsed_s`` history, which
includes the epoch's test Δ). With several workers each step's batch is split among them, so the steps are
one worker's and the test Δ should agree to float rounding; the table shows both.
"""

from __future__ import annotations

import argparse
import tempfile

from simex_ray.distributed.runtime import ray_session
from simex_ray.distributed.train import Resources, train_fleet
from simex_ray.fleet.plan import plan_fleet
from simex_ray.training import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="lenet:1x28x28:16,conv:3x32x32:64")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--address", default=None)
    args = p.parse_args()
    print(f"{'case':<24} {'workers':>7} {'images/s':>9} {'speed-up':>8} {'final test Δ':>13}")
    with ray_session(args.address), tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            arch, fmt, batch = case.split(":")
            config = TrainConfig(architecture=arch, image_format=fmt, epochs=args.epochs, batch_size=int(batch))
            spec = "colour:digits" if fmt.startswith("3x") else "digits"
            base = None
            for w in (int(v) for v in args.workers.split(",")):
                plans = plan_fleet([spec], config, seed=0)
                writer = train_fleet(plans, f"{tmp}/{case.replace(':', '-')}-{w}",
                                     resources=Resources(cpus_per_worker=1, workers_per_member=w))
                member = writer.members[plans[0].name]
                times = [h["elapsed_s"] for h in member.history]
                epoch_s = min(b - a for a, b in zip(times, times[1:]))
                rate = member.n_train / epoch_s
                base = base or rate
                print(f"{case:<24} {w:>7} {rate:>9,.0f} {rate / base:>7.2f}x {member.metrics['test_delta']:>13.6f}",
                      flush=True)


if __name__ == "__main__":
    main()

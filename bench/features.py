"""Classifier outputs (features, softmax, logits) per second per CPU, against the float32 matmul ceiling
measured in the same run.

    python bench/features.py [--images 4000] [--threads 1] [--rounds 3]

For LeNet-5 (1x28x28, the library's classifier) and torchvision's ResNet-18 (3x32x32, ImageNet stem,
random init): images/s of

* ``record``: :func:`~simex_ray.transfer.features.compute_outputs`, what `simex select` computes per
  classifier (``Library.outputs``: one forward pass gives features, softmax and logits);
* ``hash``: the data fingerprint's per-image sha256 (:func:`~simex_ray.transfer.features.row_digests`);
* ``cache hit``: a record read back from a :class:`~simex_ray.transfer.features.FeatureCache` (checked).

and the share of the ceiling: forward passes/s x the model's FLOP per image (torch's counter) / matmul
FLOP/s. Each figure is the best of ``--rounds`` (a shared machine only slows a round down).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import matmul_ceiling, timed as best  # noqa: E402  (bench/scoring.py: the one ceiling and timer)

from simex_ray.transfer.classifiers import LeNet5  # noqa: E402
from simex_ray.transfer.features import FeatureCache, compute_outputs, data_fingerprint, row_digests  # noqa: E402
from simex_ray.transfer.library import Classifier, Library, LibraryWriter  # noqa: E402
from simex_ray.transfer.zoo import ZooModel  # noqa: E402


def flops_per_image(model: torch.nn.Module, shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *shape))
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPUs) (default 1: per-CPU rates)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ceiling = matmul_ceiling()
    print(f"float32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s on {args.threads} thread(s)")
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        LibraryWriter(tmp).add(Classifier(name="lenet@s0", spec="digits", seed=0, n_classes=10, fingerprint="-"),
                               LeNet5(10).state_dict())
        lib = Library.load(tmp)
        x = rng.random((args.images, 1, 28, 28), dtype=np.float32)
        model = lib.model("lenet@s0")
        flop = flops_per_image(model, x.shape[1:])
        t_rec = best(lambda: compute_outputs(lib, "lenet@s0", x), args.rounds)
        t_hash = best(lambda: row_digests(x), args.rounds)
        cache = FeatureCache(Path(tmp) / "features")
        fp = data_fingerprint(row_digests(x), x.shape[1:])
        cache.put(lib.classifiers["lenet@s0"].sha256, fp, compute_outputs(lib, "lenet@s0", x))
        t_hit = best(lambda: cache.get(lib.classifiers["lenet@s0"].sha256, fp, None, len(x)), args.rounds)
        rows += [("LeNet-5 1x28x28", "record (1 pass)", args.images / t_rec, flop),
                 ("LeNet-5 1x28x28", "hash", args.images / t_hash, 0.0),
                 ("LeNet-5 1x28x28", "cache hit", args.images / t_hit, 0.0)]

    import torchvision

    net = torchvision.models.resnet18(num_classes=10).eval()
    n = max(args.images // 8, 256)
    x = rng.random((n, 3, 32, 32), dtype=np.float32)
    flop = flops_per_image(net, x.shape[1:])
    runner = ZooModel(net)  # as the library runs a torchvision classifier (features hooked at the final Linear)
    t_one = best(lambda: runner.forward(x, batch_size=256), args.rounds)
    t_hash = best(lambda: row_digests(x), args.rounds)
    rows += [("ResNet-18 3x32x32", "record (1 pass)", n / t_one, flop),
             ("ResNet-18 3x32x32", "hash", n / t_hash, 0.0)]

    print(f"{'model':<18} {'step':<18} {'images/s/CPU':>13} {'MFLOP/image':>12} {'of ceiling':>11}")
    for model_name, step, rate, f in rows:
        per_cpu = rate / args.threads
        share = f"{rate * f / ceiling:>10.1%}" if f else f"{'-':>10}"
        print(f"{model_name:<18} {step:<18} {per_cpu:>13,.0f} {f / 1e6 if f else 0:>12.2f} {share:>11}")


if __name__ == "__main__":
    main()

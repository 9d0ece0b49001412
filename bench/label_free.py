"""Label-free variants for "which classifier to transfer from", measured against the same ground truth.

    python bench/label_free.py runs/source-selection [SEEDS...]

Reads what bench/source_selection.sh wrote (per data seed: the iSSIM fleet, the few-shot ground truth with
its classifier library, the inter-dataset result) and scores every (X, B(Y)) pair with a few label-free
variants that are cheap at query time, beside the label-free scores the product already has:

- feature-delta: Δ in the base classifier's feature space, -E||f(x) - f(A(Y)(x))||^2 / E||f(x)||^2
  (f = B(Y)'s penultimate features, A(Y) the reference's autoencoder);
- simex+silhouette: the mean of the two ranks (Δ through A(Y), and the k-means silhouette of X in B(Y)'s
  features), per unknown X;
- simex x nuclear-norm: -Δ scaled by the nuclear norm of B(Y)'s softmax on X;
- simex-calibrated: -Δ(X | A(Y)) / Δ(Y_test | A(Y)), each autoencoder on the scale of its own held-out
  data (the `calibrated` ranking of `simex score`), and the same scaled by the nuclear norm.

Each is reported as ρ (paper), ρ strict and ρ per unknown against the ground truth's accuracy, for each
data seed, next to simex, silhouette, entropy, nuclear-norm and the best label-using estimator.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from scipy.stats import rankdata

from simex_ray.fleet import Fleet
from simex_ray.protocol import ProtocolConfig, load_splits
from simex_ray.ranking import agreement
from simex_ray.training import as_tensor
from simex_ray.transfer.ground_truth import GroundTruth
from simex_ray.transfer.library import Library


@torch.no_grad()
def reconstruct(model, x, batch=512):
    return torch.cat([model(b) for b in torch.split(as_tensor(x), batch)]).numpy()


def variants(out: str, seed: str) -> dict[str, np.ndarray]:
    gt = GroundTruth.load(f"{out}/gt-s{seed}")
    inter = json.load(open(f"{out}/inter-s{seed}/inter_dataset.json"))
    refs = gt.references
    protocol = ProtocolConfig.from_dict(gt.protocol)
    lib = Library.load(gt.library)
    fleet = Fleet.load(f"{out}/fleet-s{seed}")
    bases = [lib.for_reference(y, seed=gt.model_seed + protocol.seeds[0]).name for y in refs]
    n = len(refs)
    feat_delta = np.zeros((n, n))
    for i, x_spec in enumerate(refs):
        split = load_splits(x_spec, samples=gt.samples, data_seed=gt.data_seed, protocol=protocol)
        x = split.clf_kwargs(protocol.transfer_samples)["x_train"]
        for j, (y, b) in enumerate(zip(refs, bases)):
            f = lib.features(b, x)
            fr = lib.features(b, reconstruct(fleet.models[y], x))
            feat_delta[i, j] = -np.mean(np.sum((f - fr) ** 2, axis=1)) / np.mean(np.sum(f ** 2, axis=1))
    simex = -np.asarray(inter["delta"])  # higher = better, as every estimator
    own = np.array([fleet.members[y].calibration["mean"] for y in refs])  # Δ(Y_test | A(Y))
    calibrated = simex / own[None, :]  # -Δ / Δ(Y_test | A(Y)): each autoencoder on its own scale
    est = {k: np.asarray(v["matrix"]) for k, v in inter["estimators"].items()}
    ranks = lambda m: np.vstack([rankdata(row) for row in m])  # per unknown X, over bases
    out_m = {"simex": simex, "feature-delta": feat_delta,
             "simex+silhouette": (ranks(simex) + ranks(est["silhouette"])) / 2,
             "simex x nuclear-norm": simex / est["nuclear-norm"],
             "simex-calibrated": calibrated,
             "simex-calibrated x nuclear-norm": calibrated / est["nuclear-norm"]}
    for k in ("silhouette", "entropy", "nuclear-norm", "logme", "knn"):
        out_m[k] = est[k]
    return out_m, gt


def main(out: str, seeds: list[str]) -> None:
    rows: dict[str, list[str]] = {}
    for seed in seeds:
        mats, gt = variants(out, seed)
        for name, m in mats.items():
            a = agreement(-m, gt.targets(), gt.references)
            rows.setdefault(name, []).append(f"{a['rho_mean']:>6.2f} {a['rho_mean_strict']:>6.2f} "
                                             f"{a['rho_mean_per_unknown']:>6.2f}")
    print(f"{'score':<32}" + "".join(f" | {'ρ':>6} {'strict':>6} {'/unkn':>6}" for _ in seeds)
          + f"   (data seeds {', '.join(seeds)})")
    for name, cells in rows.items():
        print(f"{name:<32}" + "".join(f" | {c}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["0", "1"])

"""Paper protocol I: does Δ order datasets the way transfer learning does?

For references Y_1..Y_n (each also used as an unknown X):

1. one autoencoder A(Y) per reference (the fleet), Δ(X | Y) of X's held-out
   test split through A(Y): the matrix ``delta`` (rows unknown X, columns Y);
2. the transfer-learning ground truth (``simex_ray.ground_truth``): computed
   here, or a cached one reused (checked against the references, samples,
   data seed, protocol and data fingerprints);
3. per base Y, Spearman ρ between Δ(·|Y) and acc(·|B(Y)) (``simex_ray.ranking``:
   the paper's definition with the base included, and the strict X ≠ Y one),
   the same against transfer efficiency (and gain), and for the sample-space
   and embedding baselines.

Every unknown is evaluated on its test split, topped up with held-out images
to ``ProtocolConfig.test_samples``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..distances import embedding_distance, sample_distance
from ..transfer.learning import normalize_by_base
from ..fleet import Fleet
from ..transfer.ground_truth import GroundTruth, compute_ground_truth
from ..losses import check_loss
from ..protocol import (DEFAULT, MapFn, Progress, ProtocolConfig, Splits, canonical_refs, jsonable, load_splits)
from ..ranking import agreement
from ..transfer.library import Library
from ..transfer.selection import METHODS, SIMEX, needs_labels, select
from .fleets import FleetTrainer, local_trainer, provide_fleet
from ..errors import UserError
from ..results import write_json, write_table

log = logging.getLogger(__name__)


def resolve_fleet(refs: list[str], *, fleet, loss: str, samples: int | None, epochs: int | None,
                  data_seed: int, model_seed: int, data_dir, protocol: ProtocolConfig,
                  splits: dict[str, Splits] | None = None, on_progress: Progress | None = None,
                  fleet_dir=None, trainer: FleetTrainer | None = None) -> tuple[Fleet, dict[str, Any]]:
    """A Fleet covering ``refs``: the given one, the one in a given directory, or a newly trained one.

    ``fleet`` (a Fleet, or a directory with a manifest) is used as it is, never retrained. Without
    it, the fleet is trained, or resumed, into ``fleet_dir`` (None: a temporary directory) by
    ``trainer`` (default: here, in this process); see :func:`.fleets.provide_fleet`.
    Returns (fleet, info) where info holds ``trained`` and ``train_seconds`` (wall time of this
    call's training, else the members' recorded ``elapsed_s`` sum).

    With ``splits``, a given fleet's members must have been trained on exactly
    those splits' training images (data fingerprints): a fleet trained on
    other samples would be scored on its own training images.
    """
    if isinstance(fleet, Fleet):
        f = fleet
    elif fleet is not None and (Path(fleet) / "manifest.json").is_file():
        f = Fleet.load(fleet)
    else:
        cfg = protocol.ae_config(loss, epochs, model_seed)
        trainer = trainer or local_trainer(data_seed=data_seed, data_dir=data_dir, on_progress=on_progress,
                                           extra={"experiment": "inter_dataset"})
        f, seconds, trained = provide_fleet(refs, fleet if fleet is not None else fleet_dir, cfg, samples=samples,
                                            trainer=trainer)
        if trained:
            return _check_covers(f, refs), {"trained": True, "train_seconds": seconds, "config": cfg.to_dict()}
    f = _check_covers(f, refs)
    if splits is not None:
        check_fingerprints(f, splits)
    seconds = sum(float(f.members[r].metrics.get("elapsed_s", float("nan"))) for r in refs)
    return f, {"trained": False, "train_seconds": seconds,
               "config": {r: f.members[r].config for r in refs}}


def _check_covers(f: Fleet, refs: list[str]) -> Fleet:
    missing = [r for r in refs if r not in f.members]
    if missing:
        raise UserError(f"fleet has no member(s) {', '.join(missing)}; it has: {', '.join(f.names)}")
    return f


def check_fingerprints(f: Fleet, splits: dict[str, Splits]) -> None:
    """Every member ``r`` of ``splits`` was trained on ``splits[r].ae_train``, or a one-line error."""
    for ref, sp in splits.items():
        member = f.members[ref]
        if member.fingerprint != sp.ae_train_fingerprint:
            seed = member.data_seed if member.data_seed is not None else "?"
            raise UserError(
                f"fleet member '{ref}' was trained on other images than this experiment's training split "
                f"(member: {member.n_train} images, data seed {seed}); its test split could contain the member's "
                f"training images. Pass the --samples/--data-seed the fleet was trained with, or let the "
                f"experiment train its own fleet")


def delta_matrix_of(f: Fleet, refs: list[str], splits: dict[str, Splits], loss: str,
                    on_progress: Progress | None = None) -> np.ndarray:
    """Δ(X_i | Y_j) of X_i's held-out test split through A(Y_j): (n, n)."""
    n = len(refs)
    delta = np.zeros((n, n))
    for i, x in enumerate(refs):
        delta[i] = f.engine.per_sample(splits[x].ae_test, refs, loss).mean(axis=1)
        if on_progress is not None:
            on_progress("delta", i + 1, n)
    return delta


def baseline_matrices(f: Fleet, refs: list[str], splits: dict[str, Splits], protocol: ProtocolConfig, *,
                      seed: int = 0, on_progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Sample-space and code-space distances: X_i's test split against Y_j's training split."""
    n = len(refs)
    out: dict[str, np.ndarray] = {}
    for k, name in enumerate(protocol.baselines):
        m = np.zeros((n, n))
        for i, x in enumerate(refs):
            for j, y in enumerate(refs):
                if name == "embeddings":
                    m[i, j] = embedding_distance(f.models[y], splits[x].ae_test, splits[y].ae_train,
                                                 max_samples=protocol.embedding_samples, seed=seed)
                else:
                    m[i, j] = sample_distance(splits[x].ae_test, splits[y].ae_train, name.split("-", 1)[1],
                                              n_pairs=protocol.n_pairs, seed=seed)
        out[name] = m
        if on_progress is not None:
            on_progress("baselines", k + 1, len(protocol.baselines))
    return out


def inter_dataset(refs: list[str], *, loss: str = "mse", samples: int | None = None,
                  epochs: int | None = None, data_seed: int = 0, model_seed: int = 0, data_dir=None,
                  protocol: ProtocolConfig = DEFAULT, map_fn: MapFn | None = None,
                  base_map_fn: MapFn | None = None, on_progress: Progress | None = None,
                  fleet=None, ground_truth: GroundTruth | None = None,
                  save_ground_truth=None, fleet_dir=None, trainer: FleetTrainer | None = None) -> dict[str, Any]:
    """Run paper protocol I on ``refs``; see the module docstring.

    ``samples``: class-balanced samples per dataset before the 5:1 split (None:
    all). ``epochs``: autoencoder epochs (None: ``protocol.ae_epochs``).
    ``data_seed`` draws samples, splits and variants; ``model_seed``
    initialises autoencoders and classifiers. ``fleet``: a trained
    :class:`Fleet` or fleet directory to use instead of training one (its
    members must be named like the canonical refs and trained on these
    splits). ``ground_truth``: a cached ground truth to reuse (no classifier
    is trained); it must match refs, samples, data seed and protocol. Without ``fleet``, one is trained
    (or resumed) into ``fleet_dir`` by ``trainer`` (see :func:`resolve_fleet`).
    ``save_ground_truth``: a directory to write a newly computed one to.
    ``map_fn`` runs the transfer units, ``base_map_fn`` the base classifiers.
    All matrices: rows = unknown X, columns = reference / base Y, both in
    ``references`` order.
    """
    check_loss(loss)
    refs = canonical_refs(refs)
    if len(refs) < 3:
        log.warning("with %d references each per-base ρ has %d point(s); use 3 or more", len(refs), len(refs))
    if ground_truth is not None:  # fail before any slow work
        ground_truth = ground_truth.check(refs=refs, samples=samples, data_seed=data_seed, protocol=protocol)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    splits = {r: load_splits(r, samples=samples, data_seed=data_seed, data_dir=data_dir, protocol=protocol)
              for r in refs}
    timings["data_s"] = time.perf_counter() - t0
    if ground_truth is not None:
        ground_truth.check(fingerprints={r: splits[r].fingerprints() for r in refs})

    t0 = time.perf_counter()
    f, fleet_info = resolve_fleet(refs, fleet=fleet, loss=loss, samples=samples, epochs=epochs,
                                  data_seed=data_seed, model_seed=model_seed, data_dir=data_dir,
                                  protocol=protocol, splits=splits, on_progress=on_progress,
                                  fleet_dir=fleet_dir, trainer=trainer)
    timings["autoencoders_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    delta = delta_matrix_of(f, refs, splits, loss, on_progress)
    if protocol.delta_normalization == "self":
        delta_used = delta / np.diag(delta)[None, :]
    elif protocol.delta_normalization == "l2":
        delta_used = delta / np.array([f.members[y].metrics.get("ref_mean_l2", 1.0) for y in refs])[None, :]
    else:
        delta_used = delta.copy()
    timings["delta_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    baseline_mats = baseline_matrices(f, refs, splits, protocol, seed=data_seed, on_progress=on_progress)
    timings["baselines_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reused = ground_truth is not None
    if ground_truth is None:
        ground_truth = compute_ground_truth(refs, samples=samples, data_seed=data_seed, model_seed=model_seed,
                                            data_dir=data_dir, protocol=protocol, splits=splits, map_fn=map_fn,
                                            base_map_fn=base_map_fn, on_progress=on_progress)
        if save_ground_truth is not None:
            ground_truth.save(save_ground_truth)
    timings["ground_truth_s"] = time.perf_counter() - t0
    gt = ground_truth
    targets = gt.targets()
    main = agreement(delta_used, targets, refs)
    baselines = {name: {"matrix": m.tolist(), **agreement(m, targets, refs)} for name, m in baseline_mats.items()}
    t0 = time.perf_counter()
    estimators = estimator_matrices(gt, refs, splits, protocol, on_progress=on_progress)
    for e in estimators.values():  # higher = better transfer: as a distance, its negative
        e.update(agreement(-np.asarray(e["matrix"]), targets, refs))
    timings["estimators_s"] = time.perf_counter() - t0
    table = selection_table(main, timings["delta_s"], baselines, timings["baselines_s"], estimators)
    timings["total_s"] = time.perf_counter() - t_all
    log.info("inter_dataset %s: rho_mean %.3f (strict %.3f), normalized %.3f (%.0fs)", loss, main["rho_mean"],
             main["rho_mean_strict"], main["rho_mean_normalized"], timings["total_s"])
    base_acc = np.array([gt.base_accuracy[r] for r in refs])
    return {
        "experiment": "inter_dataset",
        "references": refs,
        "loss": loss,
        "samples": samples,
        "epochs": fleet_info["config"].get("epochs") if fleet_info["trained"] else None,
        "data_seed": data_seed,
        "model_seed": model_seed,
        "classifier_seeds": [gt.model_seed + s for s in gt.protocol["seeds"]],
        "protocol": protocol.to_dict(),
        "fleet": fleet_info,
        "ground_truth": {"path": None if gt.path is None else str(gt.path), "reused": reused,
                         "target": gt.target_name, "snr": gt.snr()},
        "delta": delta.tolist(),
        "delta_normalized": delta_used.tolist(),
        "transfer_accuracy": gt.accuracy.tolist(),
        "transfer_accuracy_normalized": normalize_by_base(gt.accuracy, base_acc).tolist(),
        "transfer_efficiency": gt.efficiency.tolist(),
        **({"transfer_gain": gt.gain.tolist()} if gt.gain is not None else {}),
        "transfer_accuracy_per_config": {c: np.asarray(m).tolist() for c, m in gt.accuracy_per_config.items()},
        "transfer_accuracy_per_seed": {s: np.asarray(m).tolist() for s, m in gt.accuracy_per_seed.items()},
        "transfer_seconds_to_best_per_config": {c: np.asarray(m).tolist()
                                                for c, m in gt.transfer_seconds_to_best_per_config.items()},
        "base_accuracy": dict(gt.base_accuracy),
        "base_seconds": dict(gt.base_seconds),
        **main,
        "baselines": baselines,
        "estimators": estimators,
        "selection_table": table,
        "sizes": {r: splits[r].sizes() for r in refs},
        "timings": timings,
    }


def estimator_matrices(gt: GroundTruth, refs: list[str], splits: dict[str, Splits], protocol: ProtocolConfig, *,
                       on_progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Every transferability estimator for every (X, B(Y)): {method: {matrix, needs_labels, seconds}}.

    B(Y) is the ground truth's base classifier of its first classifier seed (from its library, or the
    ones it just trained); X is X's labelled transfer-training split, the images and labels the
    transfer itself learns from (never the evaluation split). Empty for a ground truth without a library.
    """
    if gt.bases:
        library = Library.in_memory(gt.bases)
    elif gt.library is not None:
        library = Library.load(gt.library)
    else:
        log.info("the ground truth has no classifier library (written before libraries existed): no estimators")
        return {}
    seed = gt.model_seed + gt.protocol["seeds"][0]
    bases = [library.for_reference(y, seed=seed).name for y in refs]
    methods = [m for m in METHODS if m != SIMEX]
    n = len(refs)
    out = {m: {"matrix": np.zeros((n, n)), "needs_labels": needs_labels(m), "seconds": 0.0} for m in methods}
    for i, x in enumerate(refs):
        kw = splits[x].clf_kwargs(protocol.transfer_samples)
        sel = select(library, kw["x_train"], kw["y_train"], methods=methods, classifiers=bases, baseline=False)
        for m in methods:
            out[m]["matrix"][i] = [sel.scores[m][b] for b in bases]
            out[m]["seconds"] += sel.seconds[m]
        if on_progress is not None:
            on_progress("estimators", i + 1, n)
    for e in out.values():
        e["matrix"] = e["matrix"].tolist()
    return out


def selection_table(main: dict[str, Any], delta_seconds: float, baselines: dict[str, dict[str, Any]],
                    baseline_seconds: float, estimators: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: needs labels, ρ (paper and strict, per base and per unknown), seconds for the matrix."""
    def row(method, r, labels, seconds):
        return {"method": method, "needs_labels": labels, "rho_mean": r["rho_mean"],
                "rho_mean_strict": r["rho_mean_strict"], "rho_mean_per_unknown": r["rho_mean_per_unknown"],
                "seconds": seconds}

    rows = [row("simex", main, False, delta_seconds)]
    # The paper's baselines share one timer; each gets an equal share.
    rows += [row(name, b, False, baseline_seconds / max(1, len(baselines))) for name, b in baselines.items()]
    rows += [row(name, e, e["needs_labels"], e["seconds"]) for name, e in estimators.items()]
    return rows


def format_selection_table(table: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<14} {'labels':>6} {'ρ':>7} {'ρ strict':>9} {'ρ/unknown':>10} {'seconds':>9}"]
    for r in table:
        lines.append(f"{r['method']:<14} {'yes' if r['needs_labels'] else 'no':>6} {r['rho_mean']:>7.3f} "
                     f"{r['rho_mean_strict']:>9.3f} {r['rho_mean_per_unknown']:>10.3f} {r['seconds']:>9.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


def rho_bars(result: dict[str, Any], path) -> Path:
    """Grouped bars of ρ per base (and the mean) for Δ and each baseline, vs accuracy and efficiency."""
    from ..names import display_names
    from ..plots import pyplot, save_figure

    plt = pyplot()
    refs = result["references"]
    methods = {f"SimEx Δ ({result['loss']})": result, **result["baselines"]}
    groups = list(display_names(refs).values()) + ["mean"]
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.3 * len(groups) * 2, 4.2), dpi=120, sharey=True)
    width = 0.8 / len(methods)
    for ax, suffix, what in zip(axes, ("", "_normalized"), ("transfer accuracy", "transfer efficiency")):
        for k, (name, r) in enumerate(methods.items()):
            vals = [r[f"rho_per_base{suffix}"][y] for y in refs] + [r[f"rho_mean{suffix}"]]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width, vals, width, label=name)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), labels=groups, rotation=30, ha="right")
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"Spearman ρ vs {what}")
        ax.set_xlabel("base dataset Y (all X ranked, the base included: the paper's ρ)")
    axes[0].set_ylabel("ρ (+1 = smaller distance ↔ higher accuracy)")
    axes[1].legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def write_inter_dataset(result: dict[str, Any], out_dir) -> dict[str, Path]:
    """Write inter_dataset.json, inter_dataset.parquet (long table) and the PNG figures (paper Fig. 4)."""
    from ..plots import heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inter_dataset.json", "parquet": out / "inter_dataset.parquet",
             "delta_png": out / "delta.png", "accuracy_png": out / "transfer_accuracy.png",
             "efficiency_png": out / "transfer_efficiency.png", "rho_png": out / "rho.png"}
    write_json(paths["json"], jsonable(result))
    refs = result["references"]
    rows = []
    for i, x in enumerate(refs):
        for j, y in enumerate(refs):
            row = {"unknown": x, "base": y, "delta": result["delta"][i][j],
                   "delta_normalized": result["delta_normalized"][i][j],
                   "transfer_accuracy": result["transfer_accuracy"][i][j],
                   "transfer_accuracy_normalized": result["transfer_accuracy_normalized"][i][j],
                   "transfer_efficiency": result["transfer_efficiency"][i][j]}
            for name, b in result["baselines"].items():
                row[name] = b["matrix"][i][j]
            if "transfer_gain" in result:
                row["transfer_gain"] = result["transfer_gain"][i][j]
            for c, m in result["transfer_accuracy_per_config"].items():
                row[f"accuracy_{c}"] = m[i][j]
            rows.append(row)
    write_table(paths["parquet"], rows)
    heatmap(result["delta"], refs, refs, paths["delta_png"],
            title=f"Δ(X | Y), {result['loss']} (box = most similar)",
            xlabel="reference autoencoder Y", ylabel="unknown data X")
    heatmap(result["transfer_accuracy"], refs, refs, paths["accuracy_png"], cmap="viridis", mark_row_min=False,
            title="acc(X | frozen B(Y)), mean over TL configs", xlabel="base classifier Y", ylabel="unknown data X")
    heatmap(result["transfer_efficiency"], refs, refs, paths["efficiency_png"], cmap="viridis",
            mark_row_min=False, title="transfer efficiency acc(X | B(Y)) / acc(X | B(X))",
            xlabel="base classifier Y", ylabel="unknown data X")
    rho_bars(result, paths["rho_png"])
    return paths

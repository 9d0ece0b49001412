"""Paper protocol I: does Δ order datasets the way transfer learning does?

For references Y_1..Y_n (each also used as an unknown X):

1. one autoencoder A(Y) per reference (the fleet), Δ(X | Y) of X's held-out
   test split through A(Y): the matrix ``delta`` (rows unknown X, columns Y);
2. one LeNet-5 base classifier B(Y) per reference (first 10 classes, a
   validation split carved from the training split);
3. B(Y) transferred to every X (X == Y included) with frozen convolutions and
   retrained FC layers, under each configured TL-k config, averaged over the
   configured seeds and configs: the matrix ``transfer_accuracy``;
4. per base Y, Spearman ρ between Δ(·|Y) and acc(·|B(Y)) over X ≠ Y, signed so
   +1 = perfect agreement (smaller Δ ↔ higher accuracy); the same against the
   difficulty-normalised ``transfer_efficiency`` and for the sample-space and
   embedding baselines.

Units 2 and 3 go through ``map_fn(fn, list_of_kwargs) -> list`` (default: one
after another in this process) so a driver can run them in parallel; the CLI
trains the base classifiers in Ray Train runs and transfers as Ray tasks
(``simex_ray.distributed.map``). Every unknown is evaluated on its test split,
topped up with held-out images to ``ProtocolConfig.test_samples``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import rankdata

from .. import data
from ..baselines import (FC_INITS, FC_LAYERS, N_CLASSES, TL_CONFIGS, embedding_distance, first_classes,
                         first_labels, normalize_by_base, sample_distance, tl_config, train_base,
                         transfer, transfer_efficiency)
from ..fleet import Fleet
from ..losses import check_loss
from ..training import TrainConfig

log = logging.getLogger(__name__)

MapFn = Callable[[Callable[..., Any], list[dict[str, Any]]], Sequence[Any]]
Progress = Callable[[str, int, int], None]

DELTA_NORMALIZATIONS = ("none", "self", "l2")
BASELINES = ("sample-mse", "sample-issim", "embeddings")


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class ProtocolConfig:
    """The knobs of the protocol, resolved once and saved with the result.

    ``seeds`` are offsets added to the experiment seed for classifier
    initialisation and shuffling (data sampling and splits use the experiment
    seed only); results are averaged over them. ``delta_normalization``:
    ``none``; ``self`` divides each column Y by Δ(Y | Y); ``l2`` by the
    reference's mean L2 sample norm (paper section 5.3). Column scaling does
    not change a per-base ρ, only the per-unknown one (``rho_per_unknown``).
    """

    # autoencoders (paper: RMSprop, lr 2e-4, 30 epochs)
    ae_epochs: int = 30
    ae_optimizer: str = "rmsprop"
    ae_lr: float | None = 2e-4
    ae_batch_size: int = 16
    ae_architecture: str = "lenet"
    # classifiers and transfer
    tl_configs: tuple[str, ...] = tuple(TL_CONFIGS)
    fc_init: str = "reinit"
    fc_layers: str = "all"
    seeds: tuple[int, ...] = (0,)
    base_optimizer: str = "rmsprop"
    base_lr: float | None = 1e-3
    clf_max_epochs: int = 30
    clf_patience: int = 5
    clf_batch_size: int = 32
    val_fraction: float = 0.2
    n_classes: int = N_CLASSES
    # evaluation: every unknown's test split (Δ, baselines, classifier accuracy)
    # topped up to this many held-out images; None = the 5:1 split's sixth
    test_samples: int | None = None
    # transfer: FC layers retrained on at most this many of X's training images
    # (class-balanced; None = all of them, as the base classifiers)
    transfer_samples: int | None = None
    # scoring and baselines
    delta_normalization: str = "none"
    n_pairs: int = 512
    embedding_samples: int = 1000
    baselines: tuple[str, ...] = BASELINES

    def __post_init__(self):
        for name in self.tl_configs:
            tl_config(name)
        if not self.tl_configs:
            raise ValueError("tl_configs is empty; pick some of " + ", ".join(TL_CONFIGS))
        if not self.seeds:
            raise ValueError("seeds is empty; use e.g. (0,)")
        if self.fc_init not in FC_INITS:
            raise ValueError(f"unknown fc_init '{self.fc_init}'; known: {', '.join(FC_INITS)}")
        if self.fc_layers not in FC_LAYERS:
            raise ValueError(f"unknown fc_layers '{self.fc_layers}'; known: {', '.join(FC_LAYERS)}")
        if self.delta_normalization not in DELTA_NORMALIZATIONS:
            raise ValueError(f"unknown delta_normalization '{self.delta_normalization}'; "
                             f"known: {', '.join(DELTA_NORMALIZATIONS)}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for k in ("test_samples", "transfer_samples"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1 or None, got {getattr(self, k)}")
        for k in ("ae_epochs", "clf_max_epochs", "clf_patience", "clf_batch_size", "ae_batch_size",
                  "n_pairs", "embedding_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        self.ae_config()  # validates optimizer / architecture

    def ae_config(self, loss: str = "mse", epochs: int | None = None, seed: int = 0) -> TrainConfig:
        return TrainConfig(architecture=self.ae_architecture, loss=loss, epochs=epochs or self.ae_epochs,
                           batch_size=self.ae_batch_size, optimizer=self.ae_optimizer, lr=self.ae_lr, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tl_configs_resolved"] = {n: dataclasses.asdict(tl_config(n)) for n in self.tl_configs}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProtocolConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)


PAPER = ProtocolConfig()
# The paper's protocol with the measurement noise taken out (README, "What the
# protocol study found"): accuracies on 1000 held-out test images per dataset
# instead of a sixth of the sample (ρ against accuracy then no longer moves
# with the classifier seed) and averaged over three classifier seeds (the only
# change that raised ρ against transfer efficiency for both losses); TL-1 +
# TL-2 keep it to minutes on 2 cores.
DEFAULT = dataclasses.replace(PAPER, seeds=(0, 1, 2), tl_configs=("TL-1", "TL-2"), test_samples=1000)
PRESETS: dict[str, ProtocolConfig] = {"paper": PAPER, "default": DEFAULT}


# --------------------------------------------------------------------------- helpers shared with latency


def run_units(fn: Callable[..., Any], kwargs_list: list[dict[str, Any]], *, stage: str,
              map_fn: MapFn | None = None, on_progress: Progress | None = None) -> list[Any]:
    """Apply ``fn(**kw)`` to every kwargs dict, through ``map_fn`` when given; results in order."""
    total = len(kwargs_list)
    if map_fn is None:
        out = []
        for k, kw in enumerate(kwargs_list):
            out.append(fn(**kw))
            if on_progress is not None:
                on_progress(stage, k + 1, total)
        return out
    if on_progress is not None:
        on_progress(stage, 0, total)
    out = list(map_fn(fn, kwargs_list))
    if len(out) != total:
        raise RuntimeError(f"map_fn returned {len(out)} results for {total} {stage} units")
    if on_progress is not None:
        on_progress(stage, total, total)
    return out


@dataclass
class Splits:
    """One dataset's splits: autoencoder train/test (all classes) and classifier train/val/test."""

    spec: str
    ae_train: np.ndarray  # (N, 1, 28, 28)
    ae_test: np.ndarray
    clf: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (x, y)
    _capped: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def sizes(self) -> dict[str, int]:
        return {"ae_train": len(self.ae_train), "ae_test": len(self.ae_test),
                **{f"clf_{k}": len(v[1]) for k, v in self.clf.items()}}

    def clf_kwargs(self, train_samples: int | None = None) -> dict[str, np.ndarray]:
        """Classifier splits as train/val/test kwargs; ``train_samples`` caps the training
        split (a class-balanced subset, the same for every call)."""
        (xt, yt), (xv, yv), (xs, ys) = self.clf["train"], self.clf["val"], self.clf["test"]
        if train_samples is not None and train_samples < len(yt):
            if train_samples not in self._capped:  # cached: all transfers to X share one array in Ray's store
                idx = data.balanced_indices(data.Dataset(xt, yt, self.spec), train_samples, seed=0)
                self._capped[train_samples] = (xt[idx], yt[idx])
            xt, yt = self._capped[train_samples]
        return {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv, "x_test": xs, "y_test": ys}


def load_splits(spec: str, *, samples: int | None, seed: int, data_dir, protocol: ProtocolConfig,
                classifier: bool = True) -> Splits:
    """``data.prepare`` (the same 5:1 split the fleet uses, its test part topped up to
    ``protocol.test_samples``); classifiers get the first ``n_classes`` classes and a
    stratified validation split carved from train."""
    train, test = data.prepare(spec, samples=samples, seed=seed, data_dir=data_dir,
                               test_samples=protocol.test_samples)
    out = Splits(train.spec, train.x, test.x)
    if classifier:
        labels = first_labels(train, protocol.n_classes)
        ctrain = first_classes(train, protocol.n_classes, labels)
        ctest = first_classes(test, protocol.n_classes, labels)
        fit, val = data.train_test_split(ctrain, protocol.val_fraction, seed=seed)
        out.clf = {"train": (fit.x, fit.y), "val": (val.x, val.y), "test": (ctest.x, ctest.y)}
    return out


def resolve_fleet(refs: list[str], *, fleet, loss: str, samples: int | None, epochs: int | None,
                  seed: int, data_dir, protocol: ProtocolConfig,
                  on_progress: Progress | None = None) -> tuple[Fleet, dict[str, Any]]:
    """A Fleet covering ``refs``: the given one, the one in a given directory, or a newly trained one.

    A directory with a manifest is used as it is (never retrained); an empty or
    missing directory, or ``None`` (a temporary directory), is trained into with
    ``plan_fleet`` + ``train_fleet_local``. Returns (fleet, info) where info
    holds ``trained`` and ``train_seconds`` (wall time of this call's training,
    else the members' recorded ``elapsed_s`` sum).
    """
    from ..plan import plan_fleet, train_fleet_local

    if isinstance(fleet, Fleet):
        f = fleet
    elif fleet is not None and (Path(fleet) / "manifest.json").is_file():
        f = Fleet.load(fleet)
    else:
        cfg = protocol.ae_config(loss, epochs, seed)
        plans = plan_fleet(refs, cfg, samples=samples, seed=seed, data_dir=data_dir)
        done = [0]

        def on_epoch(name, metrics):
            if on_progress is not None and metrics["epoch"] == cfg.epochs:
                done[0] += 1
                on_progress("autoencoders", done[0], len(plans))

        extra = {"refs": refs, "samples": samples, "seed": seed, "experiment": "inter_dataset"}
        t0 = time.perf_counter()
        if fleet is None:
            with tempfile.TemporaryDirectory(prefix="simex-fleet-") as tmp:
                train_fleet_local(plans, tmp, on_epoch=on_epoch, extra=extra)
                f = Fleet.load(tmp)
            f.path = None
        else:
            train_fleet_local(plans, fleet, on_epoch=on_epoch, extra=extra)
            f = Fleet.load(fleet)
        seconds = time.perf_counter() - t0
        return _check_covers(f, refs), {"trained": True, "train_seconds": seconds, "config": cfg.to_dict()}
    f = _check_covers(f, refs)
    seconds = sum(float(f.members[r].metrics.get("elapsed_s", float("nan"))) for r in refs)
    return f, {"trained": False, "train_seconds": seconds,
               "config": {r: f.members[r].config for r in refs}}


def _check_covers(f: Fleet, refs: list[str]) -> Fleet:
    missing = [r for r in refs if r not in f.members]
    if missing:
        raise ValueError(f"fleet has no member(s) {', '.join(missing)}; it has: {', '.join(f.names)}")
    return f


def canonical_refs(refs: Sequence[str]) -> list[str]:
    out = [data.parse_spec(r).canonical for r in refs]
    dupes = sorted({r for r in out if out.count(r) > 1})
    if dupes:
        raise data.SpecError(f"reference(s) given twice: {', '.join(dupes)}")
    return out


# --------------------------------------------------------------------------- rank agreement


def spearman(a, b) -> float:
    """Spearman ρ (average ranks for ties); NaN with fewer than 2 points or a constant side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def rho_per_base(score, accuracy, references: Sequence[str]) -> dict[str, float]:
    """{Y: agreement of column Y}: ρ between score(·|Y) and acc(·|B(Y)) over X ≠ Y.

    Sign: ``-spearman(score, accuracy)``, so +1 means the smallest score goes
    with the highest accuracy (perfect agreement) and -1 the reverse.
    """
    s, a = np.asarray(score, dtype=float), np.asarray(accuracy, dtype=float)
    n = len(references)
    if s.shape != (n, n) or a.shape != (n, n):
        raise ValueError(f"need ({n}, {n}) matrices, got {s.shape} and {a.shape}")
    out = {}
    for j, ref in enumerate(references):
        rows = [i for i in range(n) if i != j]
        out[ref] = -spearman(s[rows, j], a[rows, j])
    return out


def rho_per_unknown(score, accuracy, references: Sequence[str]) -> dict[str, float]:
    """{X: agreement of row X}: ρ between score(X|·) and acc(X|B(·)) over Y ≠ X (same sign)."""
    return rho_per_base(np.asarray(score, dtype=float).T, np.asarray(accuracy, dtype=float).T, references)


def nanmean(values) -> float:
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def agreement(score, accuracy, efficiency, references: Sequence[str]) -> dict[str, Any]:
    """The ρ fields of one score matrix against accuracy and transfer efficiency."""
    per = rho_per_base(score, accuracy, references)
    per_n = rho_per_base(score, efficiency, references)
    per_u = rho_per_unknown(score, accuracy, references)
    per_un = rho_per_unknown(score, efficiency, references)
    return {"rho_per_base": per, "rho_mean": nanmean(per.values()),
            "rho_per_base_normalized": per_n, "rho_mean_normalized": nanmean(per_n.values()),
            "rho_per_unknown": per_u, "rho_mean_per_unknown": nanmean(per_u.values()),
            "rho_per_unknown_normalized": per_un, "rho_mean_per_unknown_normalized": nanmean(per_un.values())}


# --------------------------------------------------------------------------- the experiment


def inter_dataset(refs: list[str], *, loss: str = "mse", samples: int | None = None,
                  epochs: int | None = None, seed: int = 0, data_dir=None,
                  protocol: ProtocolConfig = DEFAULT, map_fn: MapFn | None = None,
                  base_map_fn: MapFn | None = None, on_progress: Progress | None = None,
                  fleet=None) -> dict[str, Any]:
    """Run paper protocol I on ``refs``; see the module docstring.

    ``samples``: class-balanced samples per dataset before the 5:1 split (None:
    all). ``epochs``: autoencoder epochs (None: ``protocol.ae_epochs``).
    ``fleet``: a trained :class:`Fleet` or fleet directory to use instead of
    training one (its members must be named like the canonical refs).
    ``map_fn`` runs the transfer units, ``base_map_fn`` the base classifiers
    (default: ``map_fn``); the CLI gives them Ray tasks and Ray Train runs.
    All matrices: rows = unknown X, columns = reference / base Y, both in
    ``references`` order.
    """
    check_loss(loss)
    refs = canonical_refs(refs)
    if len(refs) < 3:
        log.warning("with %d references each per-base ρ has %d point(s); use 3 or more", len(refs), len(refs) - 1)
    n = len(refs)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    splits = {r: load_splits(r, samples=samples, seed=seed, data_dir=data_dir, protocol=protocol) for r in refs}
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    f, fleet_info = resolve_fleet(refs, fleet=fleet, loss=loss, samples=samples, epochs=epochs, seed=seed,
                                  data_dir=data_dir, protocol=protocol, on_progress=on_progress)
    timings["autoencoders_s"] = time.perf_counter() - t0

    # Δ(X_i | Y_j) of X_i's held-out test split.
    t0 = time.perf_counter()
    delta = np.zeros((n, n))
    for i, x in enumerate(refs):
        for j, y in enumerate(refs):
            delta[i, j] = float(f.per_sample_delta(y, splits[x].ae_test, loss).mean())
        if on_progress is not None:
            on_progress("delta", i + 1, n)
    if protocol.delta_normalization == "self":
        delta_used = delta / np.diag(delta)[None, :]
    elif protocol.delta_normalization == "l2":
        delta_used = delta / np.array([f.members[y].metrics.get("ref_mean_l2", 1.0) for y in refs])[None, :]
    else:
        delta_used = delta.copy()
    timings["delta_s"] = time.perf_counter() - t0

    # Sample-space and code-space baselines: X_i's test split against Y_j's training split.
    t0 = time.perf_counter()
    baseline_mats: dict[str, np.ndarray] = {}
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
        baseline_mats[name] = m
        if on_progress is not None:
            on_progress("baselines", k + 1, len(protocol.baselines))
    timings["baselines_s"] = time.perf_counter() - t0

    # Base classifiers B(Y), one per (seed, Y).
    t0 = time.perf_counter()
    clf_seeds = [seed + s for s in protocol.seeds]
    base_kw = [dict(**splits[y].clf_kwargs(), optimizer=protocol.base_optimizer, lr=protocol.base_lr,
                    max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
                    batch_size=protocol.clf_batch_size, seed=s, n_classes=protocol.n_classes)
               for s in clf_seeds for y in refs]
    bases = run_units(train_base, base_kw, stage="base-classifiers",
                      map_fn=base_map_fn or map_fn, on_progress=on_progress)
    base_at = {(s, y): bases[k * n + j] for k, s in enumerate(clf_seeds) for j, y in enumerate(refs)}
    timings["base_classifiers_s"] = time.perf_counter() - t0

    # Transfers B(Y_j) -> X_i for every config and seed.
    t0 = time.perf_counter()
    keys, tr_kw = [], []
    for s in clf_seeds:
        for cfg in protocol.tl_configs:
            for j, y in enumerate(refs):
                for i, x in enumerate(refs):
                    keys.append((s, cfg, i, j))
                    tr_kw.append(dict(base_state=base_at[(s, y)]["state"],
                                      **splits[x].clf_kwargs(protocol.transfer_samples),
                                      config=tl_config(cfg), fc_init=protocol.fc_init, fc_layers=protocol.fc_layers,
                                      max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
                                      batch_size=protocol.clf_batch_size, seed=s))
    transfers = run_units(transfer, tr_kw, stage="transfer", map_fn=map_fn, on_progress=on_progress)
    timings["transfer_s"] = time.perf_counter() - t0

    acc_cfg = {c: np.zeros((n, n)) for c in protocol.tl_configs}
    acc_seed = {s: np.zeros((n, n)) for s in clf_seeds}  # mean over configs: the seed-to-seed noise
    sec_cfg = {c: np.zeros((n, n)) for c in protocol.tl_configs}
    ep_cfg = {c: np.zeros((n, n)) for c in protocol.tl_configs}
    for (s, cfg, i, j), r in zip(keys, transfers):
        acc_cfg[cfg][i, j] += r["accuracy"] / len(clf_seeds)
        acc_seed[s][i, j] += r["accuracy"] / len(protocol.tl_configs)
        sec_cfg[cfg][i, j] += r["seconds_to_best"] / len(clf_seeds)
        ep_cfg[cfg][i, j] += r["best_epoch"] / len(clf_seeds)
    accuracy = np.mean([acc_cfg[c] for c in protocol.tl_configs], axis=0)
    base_accuracy = np.array([np.mean([base_at[(s, y)]["test_accuracy"] for s in clf_seeds]) for y in refs])
    efficiency = transfer_efficiency(accuracy)

    main = agreement(delta_used, accuracy, efficiency, refs)
    baselines = {name: {"matrix": m.tolist(), **agreement(m, accuracy, efficiency, refs)}
                 for name, m in baseline_mats.items()}
    timings["total_s"] = time.perf_counter() - t_all
    log.info("inter_dataset %s: rho_mean %.3f, normalized %.3f (%.0fs)", loss, main["rho_mean"],
             main["rho_mean_normalized"], timings["total_s"])
    return {
        "experiment": "inter_dataset",
        "references": refs,
        "loss": loss,
        "samples": samples,
        "epochs": fleet_info["config"].get("epochs") if fleet_info["trained"] else None,
        "seed": seed,
        "classifier_seeds": clf_seeds,
        "protocol": protocol.to_dict(),
        "fleet": fleet_info,
        "delta": delta.tolist(),
        "delta_normalized": delta_used.tolist(),
        "transfer_accuracy": accuracy.tolist(),
        "transfer_accuracy_normalized": normalize_by_base(accuracy, base_accuracy).tolist(),
        "transfer_efficiency": efficiency.tolist(),
        "transfer_accuracy_per_config": {c: m.tolist() for c, m in acc_cfg.items()},
        "transfer_accuracy_per_seed": {str(s): m.tolist() for s, m in acc_seed.items()},
        "transfer_seconds_to_best_per_config": {c: m.tolist() for c, m in sec_cfg.items()},
        "transfer_best_epoch_per_config": {c: m.tolist() for c, m in ep_cfg.items()},
        "base_accuracy": dict(zip(refs, base_accuracy.tolist())),
        **main,
        "baselines": baselines,
        "sizes": {r: splits[r].sizes() for r in refs},
        "timings": timings,
    }


# --------------------------------------------------------------------------- output


def _jsonable(obj):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj


def rho_bars(result: dict[str, Any], path) -> Path:
    """Grouped bars of ρ per base (and the mean) for Δ and each baseline, vs accuracy and efficiency."""
    from ..plots import _pyplot, save_figure

    plt = _pyplot()
    refs = result["references"]
    methods = {f"SimEx Δ ({result['loss']})": result, **result["baselines"]}
    groups = refs + ["mean"]
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
        ax.set_xlabel("base dataset Y (over unknown X ≠ Y)")
    axes[0].set_ylabel("ρ (+1 = smaller distance ↔ higher accuracy)")
    axes[1].legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def write_inter_dataset(result: dict[str, Any], out_dir) -> dict[str, Path]:
    """Write inter_dataset.json, inter_dataset.parquet (long table) and the PNG figures (paper Fig. 4)."""
    import pandas as pd

    from ..plots import heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inter_dataset.json", "parquet": out / "inter_dataset.parquet",
             "delta_png": out / "delta.png", "accuracy_png": out / "transfer_accuracy.png",
             "efficiency_png": out / "transfer_efficiency.png", "rho_png": out / "rho.png"}
    paths["json"].write_text(json.dumps(_jsonable(result), indent=2) + "\n")
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
            for c, m in result["transfer_accuracy_per_config"].items():
                row[f"accuracy_{c}"] = m[i][j]
            rows.append(row)
    pd.DataFrame(rows).to_parquet(paths["parquet"], index=False)
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

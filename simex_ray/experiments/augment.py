"""Paper protocol II, augmentation (Fig. 7): borrow samples of the paired reference class.

A user has n labelled samples per class of a target dataset T. For each
reference R, each class c of T is paired with a class of R (greedy pairing,
:mod:`simex_ray.pairing`, computed from the user's n samples per class only),
and m samples of the paired R class join the training set with label c. A
10-class LeNet-5 is trained on the n + m samples per class and tested on
held-out target samples. Pairings come from three methods (simex,
sample-mse, embeddings); the no-augmentation baseline is m = 0.

Training budget: ``epochs`` passes over the training set, and at least
``min_steps`` optimizer steps (so a 100-sample set still trains); the weights
of the epoch with the lowest loss on the n target samples are kept (only
data the user has: no target validation set exists in this regime).

Identical training sets give identical results, so when two methods pair the
same way their trials are computed once (``unique_runs`` counts them).

Section 5.3 (end) of the paper orders the references by their normalised Δ
of the target (Δ(T | A(R)) / mean ‖R‖) and sees the same order in the
accuracy gains; ``order`` reports both orders and their Spearman ρ.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import data
from ..transfer.classifiers import LeNet5, evaluate_classifier, train_classifier
from ..fleet import Fleet, slug
from ..formats import ImageFormat, format_of
from ..models import default_architecture
from ..pairing import METHODS, class_matrix, greedy_pairs
from ..protocol import MapFn, Progress, jsonable, run_units
from ..settings import load_settings, settings_from_dict
from ..ranking import nanmean, spearman
from ..training import TrainConfig
from .fleets import FleetTrainer, local_trainer
from ..errors import UserError
from ..results import write_json, write_table

log = logging.getLogger(__name__)

__all__ = ["AugmentConfig", "PRESETS", "augment", "augmented_accuracy", "load_config", "write_augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Sizes of the augmentation study; ``default`` runs in minutes on 2 cores, ``paper`` is Fig. 7's grid."""

    n: tuple[int, ...] = (10, 50)  # target samples per class
    m: tuple[int, ...] = (10, 100, 1000)  # borrowed samples per class (0, the baseline, is always run)
    trials: int = 2
    methods: tuple[str, ...] = METHODS
    test_per_class: int = 1000
    ae_samples_per_class: int | None = 300  # per-class fleet of each reference (simex pairing)
    ae_samples: int | None = 3000  # whole-dataset autoencoder A(R) (embeddings pairing, normalised Δ)
    ae_epochs: int = 10
    ae_loss: str = "mse"
    image_format: str = "1x28x28"  # every image in this format (the rule of simex_ray.formats)
    epochs: int = 3
    min_steps: int = 300
    batch_size: int = 32
    optimizer: str = "adam"
    sample_pairs: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "image_format", str(ImageFormat.parse(self.image_format)))
        bad = [v for v in (*self.n, *self.m) if int(v) < 1]
        if not self.n or not self.m or bad:
            raise UserError(f"n and m must be non-empty lists of positive integers (m = 0 always runs), got "
                             f"n={list(self.n)} m={list(self.m)}")
        unknown = [x for x in self.methods if x not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown pairing method(s) {', '.join(unknown) or '(none)'}; known: {', '.join(METHODS)}")
        for name in ("trials", "test_per_class", "ae_epochs", "epochs", "batch_size", "sample_pairs"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentConfig":
        return settings_from_dict(cls, d, "augment")


PRESETS: dict[str, AugmentConfig] = {
    "default": AugmentConfig(),
    "paper": AugmentConfig(n=(10, 25, 50, 100), m=(10, 20, 50, 100, 200, 500, 1000), trials=5,
                           ae_samples_per_class=None, ae_samples=None, ae_epochs=30, epochs=10, min_steps=500,
                           sample_pairs=4000),
    "tiny": AugmentConfig(n=(5,), m=(5, 20), trials=1, test_per_class=30, ae_samples_per_class=36, ae_samples=300,
                          ae_epochs=1, epochs=1, min_steps=10, sample_pairs=100),
}


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--{what} must be comma-separated integers, got {text!r}") from None


def load_config(name_or_path: str | None, *, n: str | None = None, m: str | None = None, trials: int | None = None,
                methods: str | None = None) -> AugmentConfig:
    """A preset or a JSON file of :class:`AugmentConfig` fields, then the command-line overrides."""
    cfg = load_settings(name_or_path, PRESETS, what="augment")
    over: dict[str, Any] = {}
    if (v := _ints(n, "n")) is not None:
        over["n"] = v
    if (v := _ints(m, "m")) is not None:
        over["m"] = v
    if trials is not None:
        over["trials"] = trials
    if methods is not None:
        over["methods"] = tuple(x.strip() for x in methods.split(",") if x.strip())
    return replace(cfg, **over) if over else cfg


# --------------------------------------------------------------------------- unit of work


def augmented_accuracy(x_target, target_idx, target_y, x_ref, ref_idx, ref_y, x_test, y_test, *,
                       n_classes: int, epochs: int, min_steps: int, batch_size: int, optimizer: str,
                       seed: int) -> dict[str, Any]:
    """Unit "train on n target + m borrowed samples per class": accuracy on the target test samples.

    ``x_target``/``x_ref`` are whole image arrays (shared between units);
    ``*_idx`` pick the rows, ``*_y`` their (target) labels. ``x_ref=None``: no
    augmentation.
    """
    t0 = time.perf_counter()
    x_own = np.asarray(x_target)[np.asarray(target_idx)]
    y_own = np.asarray(target_y)
    if x_ref is not None and len(ref_idx):
        x = np.concatenate([x_own, np.asarray(x_ref)[np.asarray(ref_idx)]])
        y = np.concatenate([y_own, np.asarray(ref_y)])
    else:
        x, y = x_own, y_own
    steps_per_epoch = math.ceil(len(x) / batch_size)
    budget = max(epochs, math.ceil(min_steps / steps_per_epoch))
    import torch

    torch.manual_seed(seed)
    model = LeNet5(n_classes, format_of(x))
    _, info = train_classifier(x, y, x_own, y_own, optimizer=optimizer, max_epochs=budget, patience=budget,
                               batch_size=batch_size, seed=seed, model=model)  # best weights restored into model
    _, accuracy = evaluate_classifier(model, x_test, y_test)
    return {"accuracy": float(accuracy), "n_train": int(len(x)), "epochs": budget, "best_epoch": info["best_epoch"],
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the study


def reference_fleets(ref: str, cfg: AugmentConfig, *, fleet_dir, model_seed: int, trainer: FleetTrainer,
                     keep: list) -> tuple[Fleet, Fleet]:
    """(per-class fleet, whole-dataset fleet) of ``ref``, trained (or resumed) into ``fleet_dir`` (kept for
    re-runs; None: a temporary directory kept alive by ``keep``)."""
    if fleet_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="simex-augment-")
        keep.append(tmp)
        fleet_dir = tmp.name
    train_config = TrainConfig(architecture=default_architecture(cfg.image_format), loss=cfg.ae_loss,
                               epochs=cfg.ae_epochs, seed=model_seed, image_format=cfg.image_format)
    out = []
    for per_class, samples, tag in ((True, cfg.ae_samples_per_class, "per-class"), (False, cfg.ae_samples, "whole")):
        path = str(Path(fleet_dir) / f"{slug(ref)}-{tag}")
        trainer([ref], path, train_config, samples, per_class)  # resumes: finished members are kept
        out.append(Fleet.load(path))
    return out[0], out[1]


def _target_split(ds: data.Dataset, test_per_class: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(per class: a seeded order of the training pool, test row indices); classes in label order."""
    rng = np.random.default_rng(seed)
    pools, tests = [], []
    for label in np.unique(ds.y):
        rows = rng.permutation(np.nonzero(ds.y == label)[0])
        n_test = min(test_per_class, len(rows) // 2)
        tests.append(rows[:n_test])
        pools.append(rows[n_test:])
    return pools, np.sort(np.concatenate(tests))


def augment(target: str, refs: list[str], *, config: AugmentConfig | None = None, loss: str | None = None,
            data_seed: int = 0, model_seed: int = 0, data_dir=None, fleet_dir=None,
            map_fn: MapFn | None = None, trainer: FleetTrainer | None = None,
            on_progress: Progress | None = None) -> dict[str, Any]:
    """Fig. 7 for ``target`` and each of ``refs``; every pairing method of ``config``.

    ``trainer`` trains the reference fleets (e.g. on Ray Train; default: here, see :mod:`.fleets`).
    ``map_fn`` runs the training units (e.g. as Ray tasks).
    """
    cfg = config or PRESETS["default"]
    if loss is not None:
        cfg = replace(cfg, ae_loss=loss)
    if not refs:
        raise UserError("need at least one reference to borrow from (--refs)")
    t_start = time.perf_counter()
    cache: dict = {}
    fmt = ImageFormat.parse(cfg.image_format)
    tgt = data.load(target, seed=data_seed, data_dir=data_dir, cache=cache, fmt=fmt)
    if tgt.y is None:
        raise data.SpecError(f"target '{target}' has no labels; augmentation trains a classifier on it")
    classes = data.classes_of(tgt)
    n_classes = len(classes)
    y_index = np.searchsorted(np.unique(tgt.y), tgt.y)  # labels 0..n_classes-1
    pools, test_rows = _target_split(tgt, cfg.test_per_class, data_seed)
    short = [classes[c] for c, pool in enumerate(pools) if len(pool) < max(cfg.n)]
    if short:
        raise UserError(f"target class(es) {', '.join(short)} have fewer than n={max(cfg.n)} training samples left "
                         f"after holding out {len(test_rows) // n_classes} test samples per class; lower --n")
    x_test, y_test = tgt.x[test_rows], y_index[test_rows]
    keep: list = []
    seconds: dict[str, float] = {}
    trainer = trainer or local_trainer(data_seed=data_seed, data_dir=data_dir, cache=cache)
    try:
        # Reference side: fleets, class row indices, the normalised Δ of the target.
        refs_info: dict[str, dict[str, Any]] = {}
        for r, ref in enumerate(refs):
            t0 = time.perf_counter()
            per_class, whole = reference_fleets(ref, cfg, fleet_dir=fleet_dir, model_seed=model_seed,
                                                trainer=trainer, keep=keep)
            seconds[f"fleets {ref}"] = time.perf_counter() - t0
            ds = data.load(ref, seed=data_seed, data_dir=data_dir, cache=cache, fmt=fmt)
            if ds.y is None:
                raise data.SpecError(f"reference '{ref}' has no labels; pairing needs its classes")
            members = [m.name for m in per_class.members.values() if m.class_ is not None]
            labels = np.unique(ds.y)
            parts = data.prepare_by_class(ref, samples=cfg.ae_samples_per_class, seed=data_seed, data_dir=data_dir,
                                          cache=cache, fmt=fmt)
            score = whole.score(x_test, loss=cfg.ae_loss)
            refs_info[ref] = {
                "fleet": per_class, "whole": whole, "x": ds.x, "members": members,
                "classes": [m.class_ for m in per_class.members.values() if m.class_ is not None],
                "rows": [np.random.default_rng([data_seed, r, int(k)]).permutation(np.nonzero(ds.y == k)[0])
                         for k in labels],
                "train_parts": [p.train.x for p in parts],
                "delta": score.delta[whole.names[0]], "delta_normalized": score.delta_normalized[whole.names[0]]}
            if on_progress is not None:
                on_progress("references", r + 1, len(refs))

        # Pairings from the user's own n samples per class, and the units (deduplicated).
        units: dict[tuple, dict[str, Any]] = {}
        plan: list[dict[str, Any]] = []
        pairings: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for trial in range(cfg.trials):
            for n in cfg.n:
                own = [pool[:n] for pool in pools]  # nested: the n=10 samples are among the n=50 ones
                target_idx = np.concatenate(own)
                target_y = np.concatenate([np.full(n, c) for c in range(n_classes)])
                seed = model_seed * 10_007 + trial * 101 + n
                common = {"x_target": tgt.x, "target_idx": target_idx, "target_y": target_y, "x_test": x_test,
                          "y_test": y_test, "n_classes": n_classes, "epochs": cfg.epochs, "min_steps": cfg.min_steps,
                          "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "seed": seed}
                base_key = (trial, n, None, None, 0)
                units.setdefault(base_key, {**common, "x_ref": None, "ref_idx": np.zeros(0, int),
                                            "ref_y": np.zeros(0, int)})
                plan.append({"trial": trial, "n": n, "reference": None, "method": None, "m": 0, "key": base_key})
                xs = [tgt.x[i] for i in own]
                for ref in refs:
                    info = refs_info[ref]
                    for method in cfg.methods:
                        matrix = class_matrix(method, xs, engine=info["fleet"].engine, members=info["members"],
                                              loss=cfg.ae_loss, reference=info["train_parts"],
                                              autoencoder=info["whole"].models[info["whole"].names[0]],
                                              n_pairs=cfg.sample_pairs, seed=seed)
                        mapping = {i: k for i, k, _ in greedy_pairs(matrix)}
                        pairings.append({"trial": trial, "n": n, "reference": ref, "method": method,
                                         "pairs": {classes[i]: info["classes"][k] for i, k in mapping.items()},
                                         "identity": sum(classes[i] == info["classes"][k] for i, k in mapping.items())})
                        for m in cfg.m:
                            key = (trial, n, ref, tuple(sorted(mapping.items())), m)
                            if key not in units:
                                ref_idx = [info["rows"][k][:m] for i, k in sorted(mapping.items())]
                                ref_y = [np.full(len(ix), i) for (i, _), ix in zip(sorted(mapping.items()), ref_idx)]
                                units[key] = {**common, "x_ref": info["x"], "ref_idx": np.concatenate(ref_idx),
                                              "ref_y": np.concatenate(ref_y)}
                            plan.append({"trial": trial, "n": n, "reference": ref, "method": method, "m": m,
                                         "key": key})
        seconds["pairing"] = time.perf_counter() - t0
        keys = list(units)
        t0 = time.perf_counter()
        results = dict(zip(keys, run_units(augmented_accuracy, [units[k] for k in keys], stage="trials",
                                           map_fn=map_fn, on_progress=on_progress)))
        seconds["trials"] = time.perf_counter() - t0
    finally:
        for tmp in keep:
            tmp.cleanup()

    rows = []
    for p in plan:
        res = results[p["key"]]
        base = results[(p["trial"], p["n"], None, None, 0)]["accuracy"]
        rows.append({"trial": p["trial"], "n": p["n"], "reference": p["reference"], "method": p["method"],
                     "m": p["m"], "accuracy": res["accuracy"], "gain": res["accuracy"] - base,
                     "n_train": res["n_train"], "seconds": res["seconds"]})
    summary = summarize(rows)
    gain = {ref: nanmean(r["gain"] for r in rows if r["reference"] == ref) for ref in refs}
    gain_by_method = {ref: {meth: nanmean(r["gain"] for r in rows if r["reference"] == ref and r["method"] == meth)
                            for meth in cfg.methods} for ref in refs}
    norm = {ref: refs_info[ref]["delta_normalized"] for ref in refs}
    by_gain = sorted(refs, key=lambda r: (-gain[r], r))
    by_delta = sorted(refs, key=lambda r: (norm[r], r))
    seconds["total"] = time.perf_counter() - t_start
    return jsonable({
        "target": target, "references": refs, "classes": classes, "config": cfg.to_dict(),
        "data_seed": data_seed, "model_seed": model_seed, "n_test": int(len(y_test)),
        "rows": rows, "summary": summary, "pairings": pairings,
        "gain": gain, "gain_by_method": gain_by_method,
        "delta": {ref: refs_info[ref]["delta"] for ref in refs}, "delta_normalized": norm,
        "order": {"by_gain": by_gain, "by_delta_normalized": by_delta,
                  "rho": spearman([-gain[r] for r in refs], [norm[r] for r in refs])},
        "unique_runs": len(keys), "runs": len(plan), "seconds": seconds,
    })


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """min / median / max accuracy over trials per (reference, method, n, m); baseline rows have m = 0."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["reference"], r["method"], r["n"], r["m"]), []).append(r["accuracy"])
    out = []
    for (ref, method, n, m), acc in groups.items():
        a = np.asarray(acc, dtype=float)
        out.append({"reference": ref, "method": method, "n": n, "m": m, "min": float(a.min()),
                    "median": float(np.median(a)), "max": float(a.max()), "trials": len(a)})
    return out


# --------------------------------------------------------------------------- output


def write_augment(result: dict[str, Any], out_dir) -> dict[str, Path]:
    """augment.json, augment.parquet (one row per trial), augment.png (Fig. 7 grid)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "augment.json", "parquet": out / "augment.parquet", "png": out / "augment.png"}
    write_json(paths["json"], result)
    write_table(paths["parquet"], result["rows"])
    plot_augment(result, paths["png"])
    return paths


def plot_augment(result: dict[str, Any], path) -> Path:
    """Fig. 7: a row per pairing method, a column per reference, a line per n (median, min-max band)."""
    from ..names import display_names
    from ..plots import pyplot, save_figure

    plt = pyplot()
    methods = result["config"]["methods"]
    refs = result["references"]
    shown = display_names([result["target"], *refs])
    summary = result["summary"]
    base = {s["n"]: s for s in summary if s["reference"] is None}
    fig, axes = plt.subplots(len(methods), len(refs), figsize=(3.6 * len(refs), 2.9 * len(methods)), dpi=110,
                             squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        for j, ref in enumerate(refs):
            ax = axes[i][j]
            for c, n in enumerate(result["config"]["n"]):
                pts = sorted((s for s in summary if s["reference"] == ref and s["method"] == method and s["n"] == n),
                             key=lambda s: s["m"])
                m = [s["m"] for s in pts]
                color = colors[c % len(colors)]
                ax.plot(m, [s["median"] for s in pts], marker="o", ms=3, color=color, label=f"n={n}")
                ax.fill_between(m, [s["min"] for s in pts], [s["max"] for s in pts], color=color, alpha=0.2)
                if n in base:
                    ax.axhline(base[n]["median"], color=color, ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(result["config"]["m"], labels=[str(v) for v in result["config"]["m"]])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"+ {shown[ref]}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{method}\naccuracy")
            if i == len(methods) - 1:
                ax.set_xlabel("m borrowed per class")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Augmenting {shown[result['target']]} (dashed: no augmentation; band: min-max over trials)")
    return save_figure(fig, path)


def format_augment(result: dict[str, Any]) -> str:
    from ..names import display_names

    shown = display_names([result["target"], *result["references"]])
    lines = [f"Augmenting {shown[result['target']]}: mean accuracy gain over no augmentation "
             f"({result['unique_runs']} unique runs of {result['runs']})",
             f"{'reference':<24} {'gain':>8} {'Δ/|Y|':>8}  " + "  ".join(f"{m:>10}" for m in result["config"]["methods"])]
    for ref in result["references"]:
        per = result["gain_by_method"][ref]
        lines.append(f"{shown[ref]:<24} {result['gain'][ref]:>+8.3f} {result['delta_normalized'][ref]:>8.4f}  "
                     + "  ".join(f"{per[m]:>+10.3f}" for m in result["config"]["methods"]))
    o = result["order"]
    lines.append(f"order by gain: {' > '.join(shown[r] for r in o['by_gain'])}; by normalised Δ: "
                 f"{' < '.join(shown[r] for r in o['by_delta_normalized'])}"
                 + (f" (ρ {o['rho']:.2f})" if o["rho"] is not None else " (ρ needs 2+ references)"))
    return "\n".join(lines)

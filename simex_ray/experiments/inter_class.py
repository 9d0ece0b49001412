"""Paper protocol II, inter-class similarity (Table 2, Fig. 8): does Δ predict which classes get confused?

For one labelled dataset D with classes 0..n-1, every class is split 5:1 the
way a per-class fleet is trained (:func:`simex_ray.data.split_by_class`); all
matrices are evaluated on the held-out test images of each class.

* **SimEx**: a per-class fleet, one autoencoder A(k) per class, gives
  ``simex_<loss>[k][j] = Δ(test_j | A(k))`` (rows: autoencoder, columns: test class).
* **Sample space**: ``sample_<loss>[k][j]``, mean δ between random pairs of
  class-k and class-j test samples.
* **Ground truth**: n classifiers C_k, each trained on every class but k (the
  paper's "9-class" classifiers for 10 classes), once with LeNet-5 and once
  with ResNet-18. ``confusion_<arch>[k][j]`` is C_k's mean softmax probability
  of class j on class-k test samples (NaN on the diagonal).

**Orientation.** Row k of a confusion matrix comes from a model that never saw
class k, applied to k's samples. The SimEx quantity with the same shape is
Δ(test_k | A(j)): autoencoder A(j) never saw class k either and is applied to
k's samples. So the confusion row k is compared with *column* k of the
``simex`` matrix (its transpose's row k); the other orientation (row k,
Δ(test_j | A(k))) is reported as ``table2_transposed``. The sample-space
matrices are symmetric in expectation, so their orientation does not matter.

``table2_calibrated`` divides each autoencoder's Δ by its own held-out Δ
(Δ(test_k | A(j)) / Δ(test_j | A(j))), the calibration ``simex score`` offers.

Table 2 (``table2``) is the mean over classes k of Spearman ρ between the two
measures' rows k over the other classes j ≠ k, signed so that +1 means "the
two measures call the same classes similar" (a distance and a confusion
probability are compared with opposite signs).
"""

from __future__ import annotations
from ..errors import UserError

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import data
from ..transfer.classifiers import leave_one_class_out
from ..distances import sample_distance
from ..fleet import Fleet
from ..losses import LOSSES, check_loss
from ..protocol import MapFn, Progress, jsonable, run_units
from ..settings import load_settings, settings_from_dict
from ..ranking import nanmean, spearman
from ..formats import ImageFormat
from ..models import default_architecture
from ..training import TrainConfig
from .fleets import FleetTrainer, is_complete, local_trainer, provide_fleet
from ..results import write_json, write_table

log = logging.getLogger(__name__)

__all__ = ["InterClassConfig", "PRESETS", "inter_class", "load_config", "table2", "write_inter_class"]

# Column names of Table 2 for each classifier architecture.
CLASSIFIER_COLUMNS = {"lenet5": "9class-le5", "resnet18": "9class-res18"}


@dataclass(frozen=True)
class InterClassConfig:
    """Sizes of the inter-class study; ``default`` runs in minutes on 2 cores, ``paper`` is the paper's scale."""

    samples_per_class: int | None = 300  # drawn per class before the 5:1 split (None: every image)
    ae_epochs: int = 10
    ae_optimizer: str = "adam"
    ae_lr: float | None = None
    ae_batch_size: int = 16
    classifiers: tuple[str, ...] = ("lenet5", "resnet18")
    clf_optimizer: str = "adam"
    clf_batch_size: int = 64
    val_fraction: float = 0.1  # of each class's training images, for the classifiers' early stopping
    lenet_epochs: int = 15
    lenet_patience: int = 3
    resnet_epochs: int = 3
    resnet_patience: int = 2
    resnet_train_per_class: int | None = 100  # ResNet-18 is ~40x slower than LeNet-5 on a CPU
    resnet_stem_stride: int = 2  # 1: CIFAR-style stem (paper preset); 2: ~3.5x cheaper
    sample_pairs: int = 2000
    image_format: str = "1x28x28"  # every image in this format (the rule of simex_ray.formats); ae: the format's default

    def __post_init__(self):
        object.__setattr__(self, "image_format", str(ImageFormat.parse(self.image_format)))
        if self.samples_per_class is not None and self.samples_per_class < 6:
            raise UserError(f"samples_per_class must be >= 6 (a 5:1 split per class), got {self.samples_per_class}")
        if not 0 < self.val_fraction < 0.5:
            raise UserError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        unknown = [c for c in self.classifiers if c not in CLASSIFIER_COLUMNS]
        if unknown:
            raise UserError(f"unknown classifier(s) {', '.join(unknown)}; known: {', '.join(CLASSIFIER_COLUMNS)}")
        for name in ("ae_epochs", "lenet_epochs", "lenet_patience", "resnet_epochs", "resnet_patience",
                     "clf_batch_size", "ae_batch_size", "sample_pairs"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    def ae_config(self, loss: str, seed: int) -> TrainConfig:
        return TrainConfig(architecture=default_architecture(self.image_format), loss=loss, epochs=self.ae_epochs,
                           optimizer=self.ae_optimizer, lr=self.ae_lr, batch_size=self.ae_batch_size, seed=seed,
                           image_format=self.image_format)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InterClassConfig":
        return settings_from_dict(cls, d, "inter-class")


PRESETS: dict[str, InterClassConfig] = {
    "default": InterClassConfig(),
    # The paper's scale: every image, ResNet-18 with the CIFAR-style stem, long early-stopped training.
    "paper": InterClassConfig(samples_per_class=None, ae_epochs=30, lenet_epochs=50, lenet_patience=5,
                              resnet_epochs=30, resnet_patience=5, resnet_train_per_class=None,
                              resnet_stem_stride=1, sample_pairs=10000),
    # Seconds, for tests and smoke runs.
    "tiny": InterClassConfig(samples_per_class=36, ae_epochs=2, lenet_epochs=3, lenet_patience=2, resnet_epochs=1,
                             resnet_patience=1, resnet_train_per_class=10, sample_pairs=200),
}


def load_config(name_or_path: str | None) -> InterClassConfig:
    """A preset by name, or a JSON file of :class:`InterClassConfig` fields (missing ones: the default's)."""
    return load_settings(name_or_path, PRESETS, what="inter-class")


# --------------------------------------------------------------------------- the study


def rho_rows(a, b) -> list[float]:
    """Per row k: Spearman ρ between a[k, j] and b[k, j] over j ≠ k (diagonals ignored)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)
    return [spearman(np.delete(a[k], k), np.delete(b[k], k)) for k in range(n)]


def table2(profiles: dict[str, np.ndarray], rows: list[str], columns: list[str]) -> dict[str, dict[str, float]]:
    """{row: {column: mean_k ρ}} over profiles (each: dissimilarity from class k's viewpoint, [k][j])."""
    return {r: {c: nanmean(rho_rows(profiles[r], profiles[c])) for c in columns} for r in rows}


def classifier_split(parts: list[data.ClassPart], val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Train/val/eval arrays over every class (labels 0..n-1 in class order); eval = the held-out tests."""
    rng = np.random.default_rng(seed)
    xs, ys, xv, yv = [], [], [], []
    for i, p in enumerate(parts):
        order = rng.permutation(len(p.train))
        n_val = max(1, int(round(len(order) * val_fraction)))
        xv.append(p.train.x[np.sort(order[:n_val])])
        xs.append(p.train.x[np.sort(order[n_val:])])
        yv.append(np.full(n_val, i))
        ys.append(np.full(len(order) - n_val, i))
    return {"x_train": np.concatenate(xs), "y_train": np.concatenate(ys), "x_val": np.concatenate(xv),
            "y_val": np.concatenate(yv), "x_eval": np.concatenate([p.test.x for p in parts]),
            "y_eval": np.concatenate([np.full(len(p.test), i) for i, p in enumerate(parts)])}


def _cap_per_class(x, y, cap: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if cap is None:
        return x, y
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.nonzero(y == c)[0])[:cap] for c in np.unique(y)]))
    return x[keep], y[keep]


def per_class_fleet(spec: str, parts: list[data.ClassPart], cfg: InterClassConfig, loss: str, *, fleet,
                    data_seed: int, model_seed: int, data_dir, on_progress: Progress | None = None,
                    cache: dict | None = None, trainer: FleetTrainer | None = None
                    ) -> tuple[Fleet, list[str], float]:
    """(fleet, member names in class order, training seconds): the given per-class fleet, or one trained.

    A directory whose manifest lists every class's member is used as it is, after checking that each
    member was trained on this study's training images of its class; otherwise ``trainer`` (default:
    here) trains or resumes the fleet into it.
    """
    names = [p.spec for p in parts]
    if not is_complete(fleet, names):  # trained, or resumed, into ``fleet`` (None: a temporary directory)
        trainer = trainer or local_trainer(data_seed=data_seed, data_dir=data_dir, cache=cache,
                                           on_progress=on_progress, stage=f"AE {loss}",
                                           extra={"experiment": "inter_class"})
        f, seconds, _ = provide_fleet([spec], fleet, cfg.ae_config(loss, model_seed), samples=cfg.samples_per_class,
                                      per_class=True, trainer=trainer, names=names)
        return f, names, seconds
    f = Fleet.load(fleet)
    for p in parts:
        if f.members[p.spec].fingerprint != data.fingerprint(p.train):
            raise UserError(f"fleet member '{p.spec}' was trained on other images than this study's training "
                             f"split; pass the --samples-per-class/--data-seed it was trained with, or let the "
                             f"study train its own fleet")
    return f, names, sum(float(f.members[n].metrics.get("elapsed_s", 0.0)) for n in names)


def inter_class(spec: str, *, losses: tuple[str, ...] = LOSSES, config: InterClassConfig | None = None,
                data_seed: int = 0, model_seed: int = 0, data_dir=None, fleets: dict[str, Any] | None = None,
                map_fn: MapFn | None = None, on_progress: Progress | None = None,
                trainer: FleetTrainer | None = None) -> dict[str, Any]:
    """Table 2 and the Fig. 8 matrices for one labelled dataset ``spec``.

    ``fleets``: {loss: fleet directory (used if trained, trained into if not) or None (temporary)};
    ``trainer`` trains them (default: here; see :mod:`.fleets`).
    ``map_fn`` runs the classifier units (e.g. on Ray Train); without it they run here, in turn.
    """
    cfg = config or PRESETS["default"]
    for loss in losses:
        check_loss(loss)
    if not losses:
        raise UserError("need at least one loss")
    fleets = fleets or {}
    t_start = time.perf_counter()
    cache: dict = {}  # the dataset is read and derived once for the split and every fleet's plans
    parts = data.prepare_by_class(spec, samples=cfg.samples_per_class, seed=data_seed, data_dir=data_dir,
                                  cache=cache, fmt=ImageFormat.parse(cfg.image_format))
    n = len(parts)
    if n < 3:
        raise UserError(f"'{spec}' has {n} class(es); the inter-class study needs at least 3")
    classes = [p.name for p in parts]
    seconds: dict[str, float] = {}
    matrices: dict[str, np.ndarray] = {}

    # SimEx: simex_<loss>[k][j] = Δ(test_j | A(k)).
    for loss in losses:
        f, names, train_s = per_class_fleet(spec, parts, cfg, loss, fleet=fleets.get(loss), data_seed=data_seed,
                                            model_seed=model_seed, data_dir=data_dir, on_progress=on_progress,
                                            cache=cache, trainer=trainer)
        t0 = time.perf_counter()
        matrices[f"simex_{loss}"] = np.stack([f.engine.per_sample(p.test.x, names, loss).mean(axis=1)
                                              for p in parts], axis=1)
        seconds[f"simex_{loss}"] = time.perf_counter() - t0
        seconds[f"ae_train_{loss}"] = train_s

    # Sample space, both δ.
    for loss in LOSSES:
        t0 = time.perf_counter()
        matrices[f"sample_{loss}"] = np.array([[sample_distance(a.test.x, b.test.x, loss, n_pairs=cfg.sample_pairs,
                                                                seed=data_seed) for b in parts] for a in parts])
        seconds[f"sample_{loss}"] = time.perf_counter() - t0
        if on_progress is not None:
            on_progress(f"sample {loss}", 1, 1)

    # Ground truth: n leave-one-class-out classifiers per architecture.
    split = classifier_split(parts, cfg.val_fraction, data_seed)
    units = []
    for arch in cfg.classifiers:
        x_tr, y_tr = split["x_train"], split["y_train"]
        kw: dict[str, Any] = {"max_epochs": cfg.lenet_epochs, "patience": cfg.lenet_patience}
        if arch == "resnet18":
            x_tr, y_tr = _cap_per_class(x_tr, y_tr, cfg.resnet_train_per_class, data_seed)
            kw = {"max_epochs": cfg.resnet_epochs, "patience": cfg.resnet_patience,
                  "model_kw": {"stem_stride": cfg.resnet_stem_stride}}
        for k in range(n):
            units.append({"architecture": arch, "left_out": k, "x_train": x_tr, "y_train": y_tr,
                          "x_val": split["x_val"], "y_val": split["y_val"], "x_eval": split["x_eval"],
                          "y_eval": split["y_eval"], "n_classes": n, "optimizer": cfg.clf_optimizer,
                          "batch_size": cfg.clf_batch_size, "seed": model_seed * 1000 + k, **kw})
    t0 = time.perf_counter()
    results = run_units(leave_one_class_out, units, stage=f"{n - 1}-class classifiers", map_fn=map_fn,
                        on_progress=on_progress)
    seconds["classifiers"] = time.perf_counter() - t0
    classifiers: dict[str, Any] = {}
    for arch in cfg.classifiers:
        mine = sorted((r for r in results if r["architecture"] == arch), key=lambda r: r["left_out"])
        matrices[f"confusion_{arch}"] = np.array([r["probability"] for r in mine])
        classifiers[arch] = {
            "votes": [r["votes"] for r in mine], "accuracy": [r["accuracy"] for r in mine],
            "mean_accuracy": nanmean(r["accuracy"] for r in mine), "epochs": [r["epochs"] for r in mine],
            "n_train": mine[0]["n_train"] if mine else 0, "seconds": sum(r["seconds"] for r in mine)}

    # Profiles: dissimilarity of class j seen from class k's samples, [k][j].
    profiles = {f"SimEx-{l.upper() if l == 'mse' else 'iSSIM'}": matrices[f"simex_{l}"].T for l in losses}
    transposed = {f"SimEx-{l.upper() if l == 'mse' else 'iSSIM'}": matrices[f"simex_{l}"] for l in losses}
    profiles["sample-mse"] = matrices["sample_mse"]
    profiles["sample-issim"] = matrices["sample_issim"]
    for arch in cfg.classifiers:
        profiles[CLASSIFIER_COLUMNS[arch]] = -matrices[f"confusion_{arch}"]
    rows = [*transposed, "sample-mse", "sample-issim"]
    columns = ["sample-mse", "sample-issim", *(CLASSIFIER_COLUMNS[a] for a in cfg.classifiers)]
    grid = table2(profiles, rows, columns)
    grid_t = table2({**profiles, **transposed}, list(transposed), columns)
    # Calibrated: Δ(test_k | A(j)) / Δ(test_j | A(j)), each autoencoder's error relative to its own class
    # (the cross-reference calibration of `simex score`), so an autoencoder that reconstructs everything
    # well is not "similar" to every class.
    calibrated = {name: np.asarray(m) / np.diag(np.asarray(m).T)[None, :] for name, m in profiles.items()
                  if name.startswith("SimEx")}
    grid_c = table2({**profiles, **calibrated}, list(calibrated), columns)
    per_class = {r: {c: dict(zip(classes, rho_rows(profiles[r], profiles[c])))
                     for c in columns if c.startswith("9class")} for r in rows}
    seconds["total"] = time.perf_counter() - t_start
    return jsonable({
        "data": spec, "classes": classes, "losses": list(losses), "config": cfg.to_dict(),
        "data_seed": data_seed, "model_seed": model_seed,
        "n_test": {p.name: len(p.test) for p in parts}, "n_train": {p.name: len(p.train) for p in parts},
        "matrices": {k: v.tolist() for k, v in matrices.items()},
        "orientation": "confusion row k (C_k, which never saw class k, on class-k samples) is compared with "
                       "column k of simex (Δ(test_k | A(j)) over j: autoencoders that never saw k, on k's "
                       "samples); table2_transposed uses row k (Δ(test_j | A(k)))",
        "table2": grid, "table2_transposed": grid_t, "table2_calibrated": grid_c, "rho_per_class": per_class,
        "classifiers": classifiers, "seconds": seconds,
    })


# --------------------------------------------------------------------------- output


def write_inter_class(result: dict[str, Any], out_dir) -> dict[str, Path]:
    """inter_class.json, inter_class.parquet (every matrix, long), inter_class.png (Fig. 8), table2.png."""
    from ..plots import heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inter_class.json", "parquet": out / "inter_class.parquet",
             "png": out / "inter_class.png", "table2": out / "table2.png"}
    write_json(paths["json"], result)
    classes = result["classes"]
    rows = [{"matrix": name, "row_class": classes[k], "column_class": classes[j], "value": v}
            for name, m in result["matrices"].items() for k, row in enumerate(m) for j, v in enumerate(row)]
    write_table(paths["parquet"], rows)
    plot_matrices(result, paths["png"])
    grid = result["table2"]
    heatmap([[grid[r][c] for c in next(iter(grid.values()))] for r in grid], list(grid),
            list(next(iter(grid.values()))), paths["table2"], cmap="viridis", fmt="{:.2f}", mark_row_min=False,
            title=f"Table 2: mean Spearman ρ per class ({result['data']})", xlabel="reference", ylabel="measure")
    return paths


MATRIX_TITLES = {"simex_mse": "SimEx-MSE Δ(test j | A(k))", "simex_issim": "SimEx-iSSIM Δ(test j | A(k))",
                 "sample_mse": "sample MSE", "sample_issim": "sample iSSIM",
                 "confusion_lenet5": "9-class LeNet-5: P(j | class k)",
                 "confusion_resnet18": "9-class ResNet-18: P(j | class k)"}


def plot_matrices(result: dict[str, Any], path) -> Path:
    """Fig. 8: one heatmap per matrix; distances dark = similar, confusions bright = confused."""
    from ..plots import pyplot, save_figure

    plt = pyplot()
    names = list(result["matrices"])
    cols = 3
    nrows = (len(names) + cols - 1) // cols
    classes = result["classes"]
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names):
        m = np.array(result["matrices"][name], dtype=float)
        if name.startswith("confusion"):
            im = ax.imshow(m, cmap="viridis")
            ax.set_xlabel("predicted class j")
            ax.set_ylabel("left-out class k")
        else:
            im = ax.imshow(m, cmap="viridis_r")
            ax.set_xlabel("test class j" if name.startswith("simex") else "class j")
            ax.set_ylabel("autoencoder A(k)" if name.startswith("simex") else "class k")
        ax.set_title(MATRIX_TITLES.get(name, name), fontsize=9)
        ax.set_xticks(range(len(classes)), labels=classes, fontsize=7)
        ax.set_yticks(range(len(classes)), labels=classes, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Inter-class similarity of {result['data']} (Fig. 8)")
    return save_figure(fig, path)


def format_table2(result: dict[str, Any]) -> str:
    grid = result["table2"]
    columns = list(next(iter(grid.values())))
    w0 = max(len(r) for r in grid)
    lines = [f"Table 2, {result['data']}: mean Spearman ρ over classes",
             f"{'':<{w0}}  " + "  ".join(f"{c:>13}" for c in columns)]
    for r, row in grid.items():
        lines.append(f"{r:<{w0}}  " + "  ".join(f"{row[c]:>13.3f}" for c in columns))
    return "\n".join(lines)

"""The early-stopping study (paper Fig. 6): how soon is the Δ ordering stable? Ray-free parts.

A *trial* is one (optimizer, learning rate, model seed). It trains the whole
fleet one epoch at a time, all members stepping together
(:class:`FleetStepper`), and after every epoch computes the Δ matrix on a
fixed evaluation split and its Spearman ρ against a cached transfer-learning
ground truth (:func:`epoch_metrics`). The Ray Tune adapter
(``simex_ray.distributed.tune``) runs trials concurrently, checkpoints them
and stops them with :class:`StabilityRule`; :func:`summarize` and
:func:`plot_stopping` turn the reported rows into ``stopping.json`` and
``stopping.png``.

**Stability rule.** A ρ curve is stable from epoch e when the k values
ρ_e, ..., ρ_{e+k-1} all lie within ε of each other (max − min ≤ ε, no NaN):
the plateau has been reached and held for k epochs. The *earliest stable
epoch* is the first such e, and its time the training seconds at epoch e.
With 5 references the paper's ρ moves in steps of 0.1, so ε < 0.1 asks for
an unchanged ordering; the defaults are ε = 0.05 and k = 3.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..ranking import agreement
from ..training import TrainConfig, as_tensor, initial_state, train_one_epoch
from ..errors import UserError
from ..results import write_json, write_table


@dataclass(frozen=True)
class StabilityRule:
    """ρ within ``eps`` of its plateau (max − min ≤ eps) for ``k`` consecutive epochs."""

    eps: float = 0.05
    k: int = 3

    def __post_init__(self):
        if not self.eps >= 0:
            raise UserError(f"eps must be >= 0, got {self.eps}")
        if self.k < 1:
            raise UserError(f"k must be >= 1, got {self.k}")

    def stable_epoch(self, curve: Sequence[float]) -> int | None:
        """The earliest stable epoch (1-based) of ``curve`` (ρ after epoch 1, 2, ...), or None."""
        values = [float("nan") if v is None else float(v) for v in curve]
        for start in range(len(values) - self.k + 1):
            window = values[start:start + self.k]
            if all(math.isfinite(v) for v in window) and max(window) - min(window) <= self.eps + 1e-12:
                return start + 1
        return None


class FleetStepper:
    """All members of a fleet trained together, one epoch at a time.

    Each member starts and shuffles exactly as ``training.train_member`` with
    the same config would, so a fleet stepped for e epochs equals a fleet
    trained for e epochs (bit for bit on the same device).
    ``train``: {member: (N, 1, 28, 28) float images}.
    """

    def __init__(self, train: Mapping[str, np.ndarray], config: TrainConfig, device="cpu"):
        self.config, self.device = config, torch.device(device)
        self.names = list(train)
        self.x = {n: as_tensor(x, self.device) for n, x in train.items()}
        self.models, self.optimizers = {}, {}
        for n in self.names:
            self.models[n], self.optimizers[n] = initial_state(config, self.device)
        self.epoch = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []

    def step(self) -> dict[str, float]:
        """Train every member one more epoch; returns {member: mean train δ}."""
        self.epoch += 1
        t0 = time.perf_counter()
        out = {}
        for n in self.names:
            g = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
            out[n] = train_one_epoch(self.models[n], self.x[n], self.optimizers[n], self.config.loss,
                                     self.config.batch_size, g)
        self.train_seconds += time.perf_counter() - t0
        return out

    def delta_matrix(self, unknown: Mapping[str, np.ndarray]) -> np.ndarray:
        """Δ(X_i | A(Y_j)): rows = ``unknown`` in order, columns = members in order (the scoring engine)."""
        from ..scoring import ScoringEngine

        engine = ScoringEngine(self.models, {n: self.config.loss for n in self.names}, device=self.device)
        out = np.stack([engine.per_sample(x).mean(axis=1) for x in unknown.values()])
        for m in self.models.values():
            m.train()
        return out

    def state_dict(self) -> dict[str, Any]:
        """A copy (not a view) of everything needed to continue: stepping on leaves it unchanged."""
        return {"epoch": self.epoch, "train_seconds": self.train_seconds, "history": copy.deepcopy(self.history),
                "models": {n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                           for n, m in self.models.items()},
                "optimizers": {n: copy.deepcopy(o.state_dict()) for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> "FleetStepper":
        for n in self.names:
            self.models[n].load_state_dict(state["models"][n])
            self.optimizers[n].load_state_dict(state["optimizers"][n])
        self.epoch, self.train_seconds = int(state["epoch"]), float(state["train_seconds"])
        self.history = list(state["history"])
        return self


def epoch_metrics(delta: np.ndarray, targets: Mapping[str, np.ndarray], references: Sequence[str]) -> dict[str, Any]:
    """What a trial reports after an epoch: ρ (paper and strict, per base and mean) and Δ."""
    a = agreement(delta, targets, references)
    # Per-base values as lists in ``references`` order: specs are not metric names for loggers.
    out = {"rho_mean": a["rho_mean"], "rho_mean_strict": a["rho_mean_strict"],
           "rho_per_base": [a["rho_per_base"][r] for r in references],
           "rho_per_base_strict": [a["rho_per_base_strict"][r] for r in references],
           "mean_test_delta": float(np.mean(np.diag(delta))), "delta": np.asarray(delta).tolist()}
    if "gain" in targets:
        out["rho_mean_gain"] = a["rho_mean_gain"]
    return out


# --------------------------------------------------------------------------- analysis


def config_key(optimizer: str, lr: float) -> str:
    return f"{optimizer} lr={lr:g}"


def summarize(rows: Sequence[Mapping[str, Any]], rule: StabilityRule, *, metric: str = "rho_mean",
              base_seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per configuration (optimizer, lr): ρ curves over seeds and the earliest stable point.

    ``rows``: one per (trial, epoch) with ``optimizer``, ``lr``, ``seed``,
    ``epoch``, ``train_seconds`` and ``metric``. Curves give min / median /
    max over seeds per epoch. ``earliest_stable_epoch`` is the latest over
    seeds (every seed stable by then; None if one never is);
    ``earliest_stable_seconds`` the median training seconds at that epoch.
    The best configuration has the highest median final ρ; among those within
    ε of it, the earliest stable seconds wins.
    """
    by_cfg: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    meta: dict[str, tuple[str, float]] = {}
    for r in rows:
        key = config_key(r["optimizer"], float(r["lr"]))
        meta[key] = (r["optimizer"], float(r["lr"]))
        by_cfg.setdefault(key, {}).setdefault(int(r["seed"]), []).append(r)
    configs = {}
    for key, seeds in sorted(by_cfg.items()):
        curves = {s: sorted(rs, key=lambda r: r["epoch"]) for s, rs in seeds.items()}
        epochs = sorted({int(r["epoch"]) for rs in curves.values() for r in rs})
        per_seed = {}
        for s, rs in sorted(curves.items()):
            rho = [_num(r[metric]) for r in rs]
            stable = rule.stable_epoch(rho)
            per_seed[str(s)] = {"epochs": [int(r["epoch"]) for r in rs], "rho": rho,
                                "train_seconds": [float(r["train_seconds"]) for r in rs],
                                "earliest_stable_epoch": stable,
                                "earliest_stable_seconds": None if stable is None else float(rs[stable - 1]["train_seconds"]),
                                "final_rho": rho[-1] if rho else None, "epochs_run": len(rs)}

        def at(e: int, field: str) -> list[float]:
            vals = []
            for s, rs in curves.items():
                match = [r for r in rs if int(r["epoch"]) == e]
                if match and match[0][field] is not None and math.isfinite(_num(match[0][field])):
                    vals.append(_num(match[0][field]))
            return vals

        curve = {"epoch": epochs, "rho_min": [], "rho_median": [], "rho_max": [], "seconds_median": [], "n_seeds": []}
        for e in epochs:
            rho, secs = at(e, metric), at(e, "train_seconds")
            curve["rho_min"].append(min(rho) if rho else None)
            curve["rho_median"].append(float(np.median(rho)) if rho else None)
            curve["rho_max"].append(max(rho) if rho else None)
            curve["seconds_median"].append(float(np.median(secs)) if secs else None)
            curve["n_seeds"].append(len(rho))
        stables = [p["earliest_stable_epoch"] for p in per_seed.values()]
        stable_epoch = None if any(s is None for s in stables) else max(stables)
        stable_secs = None
        if stable_epoch is not None:
            secs = [p["train_seconds"][stable_epoch - 1] for p in per_seed.values()]
            stable_secs = float(np.median(secs))
        finals = [p["final_rho"] for p in per_seed.values() if p["final_rho"] is not None and math.isfinite(p["final_rho"])]
        optimizer, lr = meta[key]
        configs[key] = {"optimizer": optimizer, "lr": lr, "seeds": sorted(int(s) for s in per_seed),
                        "curve": curve, "per_seed": per_seed, "earliest_stable_epoch": stable_epoch,
                        "earliest_stable_seconds": stable_secs,
                        "final_rho": float(np.median(finals)) if finals else None,
                        "final_rho_min": min(finals) if finals else None,
                        "final_rho_max": max(finals) if finals else None}
    best = _best(configs, rule)
    fastest_base = min(base_seconds.values()) if base_seconds else None
    out = {"metric": metric, "rule": {"eps": rule.eps, "k": rule.k}, "configs": configs, "best": best,
           "base_seconds": dict(base_seconds or {}), "fastest_base_seconds": fastest_base}
    if best is not None and fastest_base and configs[best]["earliest_stable_seconds"] is not None:
        out["stable_over_fastest_base"] = configs[best]["earliest_stable_seconds"] / fastest_base
    return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _best(configs: Mapping[str, Mapping[str, Any]], rule: StabilityRule) -> str | None:
    scored = {k: c for k, c in configs.items() if c["final_rho"] is not None}
    if not scored:
        return None
    top = max(c["final_rho"] for c in scored.values())
    near = [k for k, c in scored.items() if c["final_rho"] >= top - rule.eps]
    return min(near, key=lambda k: (scored[k]["earliest_stable_seconds"] is None,
                                    scored[k]["earliest_stable_seconds"] or 0.0, -scored[k]["final_rho"], k))


def recommended_training(study: Mapping[str, Any]) -> dict[str, Any]:
    """The best configuration of a ``stopping.json`` as training settings: optimizer, lr,
    epochs (its earliest stable epoch, or every epoch the study ran if it never was stable), loss."""
    best = study.get("best")
    if not best or best not in study.get("configs", {}):
        raise UserError("the study has no best configuration (no trial reported a finite ρ); "
                         "run `simex tune stopping` longer or check its ground truth")
    c = study["configs"][best]
    epochs = c["earliest_stable_epoch"] or max(c["curve"]["epoch"])
    return {"optimizer": c["optimizer"], "lr": float(c["lr"]), "epochs": int(epochs), "loss": study.get("loss"),
            "batch_size": study.get("batch_size"), "architecture": study.get("architecture"),
            "stable": c["earliest_stable_epoch"] is not None, "config": best}


def plot_stopping(summary: Mapping[str, Any], path, *, title: str = "") -> Any:
    """ρ against training seconds per configuration (median, min/max bars over seeds), vertical
    lines at the base classifiers' training times and markers at the earliest stable point (Fig. 6)."""
    from ..names import display_names
    from ..plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for key, c in summary["configs"].items():
        cv = c["curve"]
        pts = [(s, m, lo, hi) for s, m, lo, hi in zip(cv["seconds_median"], cv["rho_median"], cv["rho_min"],
                                                      cv["rho_max"]) if s is not None and m is not None]
        if not pts:
            continue
        s, m, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
        line = ax.errorbar(s, m, yerr=[m - lo, hi - m], marker="o", markersize=3, capsize=2,
                           label=f"{key} (final {c['final_rho']:.2f})" if c["final_rho"] is not None else key)
        if c["earliest_stable_seconds"] is not None:
            e = c["earliest_stable_epoch"]
            ax.plot([c["earliest_stable_seconds"]], [cv["rho_median"][cv["epoch"].index(e)]], marker="*",
                    markersize=14, color=line[0].get_color(), markeredgecolor="black")
    bases = summary.get("base_seconds") or {}
    if bases:  # the base classifiers' training times (the paper's BT lines): a band, the fastest dashed
        lo, hi = min(bases.values()), max(bases.values())
        fastest = display_names(bases)[min(bases, key=bases.get)]
        ax.axvspan(lo, hi, color="grey", alpha=0.2, linewidth=0)
        ax.axvline(lo, color="grey", linestyle="--", linewidth=0.9)
        ax.text(hi, 0.02, f"  base classifiers {lo:.2g}–{hi:.2g} s (fastest: {fastest})", fontsize=7,
                color="dimgrey", ha="left", va="bottom", transform=ax.get_xaxis_transform())
    values = [v for c in summary["configs"].values() for v in c["curve"]["rho_min"] if v is not None]
    ax.set_xlabel("autoencoder training seconds (whole fleet, one process)")
    ax.set_ylabel(f"Spearman ρ vs transfer ({summary['metric']})")
    ax.set_ylim(min([-0.05, *values]) - 0.05 if values and min(values) < 0 else max(0.0, min(values or [0]) - 0.15),
                1.02)
    rule = summary["rule"]
    ax.set_title(title or f"ρ vs training time; ★ = earliest stable (ε {rule['eps']:g}, k {rule['k']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- data and files


@dataclass
class StudyData:
    """What every trial needs: training images per member, the evaluation split, the ground truth."""

    references: list[str]
    train: dict[str, np.ndarray]  # member -> (N, 1, 28, 28)
    evaluate: dict[str, np.ndarray]  # unknown -> (M, 1, 28, 28), the ground truth's test split (capped)
    targets: dict[str, np.ndarray]  # ground-truth matrices, rows/columns in ``references`` order
    base_seconds: dict[str, float]
    train_config: dict[str, Any]  # the protocol's autoencoder settings (architecture, batch size, loss)


def study_data(gt, refs: Sequence[str] | None = None, *, loss: str = "mse", eval_samples: int | None = 500,
               data_dir=None) -> StudyData:
    """Load the references exactly as the ground truth did (its samples, data seed and test
    split, checked by fingerprint) and cap each evaluation split at ``eval_samples`` images
    (class-balanced, seeded; None: all)."""
    from ..protocol import load_splits

    refs = list(refs) if refs is not None else list(gt.references)
    gt = gt.check(refs=refs)
    protocol = gt.protocol_config()
    splits = {r: load_splits(r, samples=gt.samples, data_seed=gt.data_seed, data_dir=data_dir, protocol=protocol)
              for r in refs}
    gt.check(fingerprints={r: splits[r].fingerprints() for r in refs})
    evaluate = {}
    for r in refs:
        x = splits[r].ae_test
        if eval_samples is not None and eval_samples < len(x):
            x = x[np.sort(np.random.default_rng(gt.data_seed).choice(len(x), eval_samples, replace=False))]
        evaluate[r] = x
    cfg = protocol.ae_config(loss)
    return StudyData(references=refs, train={r: splits[r].ae_train for r in refs}, evaluate=evaluate,
                     targets={k: np.asarray(v) for k, v in gt.targets().items()}, base_seconds=dict(gt.base_seconds),
                     train_config={"architecture": cfg.architecture, "batch_size": cfg.batch_size, "loss": loss})


def write_study(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir) -> dict[str, Any]:
    """stopping.json (summary), stopping.parquet (every reported row) and stopping.png (Fig. 6)."""
    import json
    from pathlib import Path

    from ..protocol import jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "stopping.json", "parquet": out / "stopping.parquet", "png": out / "stopping.png"}
    flat = [{k: (json.dumps(jsonable(v)) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows]
    write_table(paths["parquet"], flat)
    plot_stopping(summary, paths["png"])
    write_json(paths["json"], jsonable(summary))
    return paths

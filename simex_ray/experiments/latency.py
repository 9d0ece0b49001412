"""Paper Fig. 5: how much faster is asking SimEx than transfer learning?

For one unknown dataset X and a base reference Y:

* ``simex_seconds``: wall time to push every sampled X image through ONE
  reference autoencoder A(Y) and average δ (after one untimed warm-up pass;
  min / median / max over ``repeats``; the value used is the median);
* ``transfer_seconds``: for each TL-k config, the wall time a transfer of the
  base classifier B(Y) to X needs until its minimum validation loss (frozen
  convolutions, FC layers retrained; the early-stopping tail is not counted);
* ``speedup`` = min over TL-k of transfer_seconds / simex_seconds.

One-time costs (training A(·) and B(Y)) are reported separately: SimEx pays
them once per reference, not per query.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..transfer.learning import TL_CONFIGS, tl_config, transfer
from ..transfer.classifiers import train_base
from ..losses import check_loss
from ..names import display_names
from ..protocol import DEFAULT, MapFn, Progress, ProtocolConfig, canonical_refs, jsonable, load_splits, run_units
from .fleets import FleetTrainer
from .inter_dataset import resolve_fleet
from ..errors import UserError
from ..results import write_figure, write_json

log = logging.getLogger(__name__)


def latency(refs: list[str], unknown: str, *, repeats: int = 5, samples: int | None = None,
            epochs: int | None = None, data_seed: int = 0, model_seed: int = 0, data_dir=None, loss: str = "mse",
            base: str | None = None, tl_configs: tuple[str, ...] = tuple(TL_CONFIGS),
            protocol: ProtocolConfig = DEFAULT, map_fn: MapFn | None = None,
            on_progress: Progress | None = None, fleet=None, fleet_dir=None, trainer: FleetTrainer | None = None) -> dict[str, Any]:
    """Time SimEx on ``unknown`` against transfer learning from ``base`` (default: the
    first reference that is not the unknown).

    ``map_fn`` runs the TL-k transfers; a parallel one must give each transfer
    the same dedicated resources, or the measured times are inflated.
    """
    check_loss(loss)
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}")
    refs = canonical_refs(refs)
    (unknown,) = canonical_refs([unknown])
    if base is None:
        base = next((r for r in refs if r != unknown), refs[0])
    else:
        (base,) = canonical_refs([base])
        if base not in refs:
            raise UserError(f"base '{base}' is not one of the references: {', '.join(refs)}")
    configs = [tl_config(c) for c in tl_configs]

    # Both sides see the same sampled images: no topped-up test split here.
    sampled = dataclasses.replace(protocol, test_samples=None)
    x_split = load_splits(unknown, samples=samples, data_seed=data_seed, data_dir=data_dir, protocol=sampled)
    b_split = load_splits(base, samples=samples, data_seed=data_seed, data_dir=data_dir, protocol=sampled)
    f, fleet_info = resolve_fleet(refs, fleet=fleet, loss=loss, samples=samples, epochs=epochs,
                                  data_seed=data_seed, model_seed=model_seed, data_dir=data_dir, protocol=protocol,
                                  splits={base: b_split}, on_progress=on_progress, fleet_dir=fleet_dir,
                                  trainer=trainer)
    x_all = np.concatenate([x_split.ae_train, x_split.ae_test])  # every sampled unknown image

    f.per_sample_delta(base, x_all[:64], loss)  # warm-up: first-call allocations are not the steady cost
    times, value = [], float("nan")
    for k in range(repeats):
        t0 = time.perf_counter()
        value = float(f.per_sample_delta(base, x_all, loss).mean())
        times.append(time.perf_counter() - t0)
        if on_progress is not None:
            on_progress("simex", k + 1, repeats)
    simex = statistics.median(times)

    (b,) = run_units(train_base, [dict(**b_split.clf_kwargs(), optimizer=protocol.base_optimizer,
                                       lr=protocol.base_lr, max_epochs=protocol.clf_max_epochs,
                                       patience=protocol.clf_patience, batch_size=protocol.clf_batch_size,
                                       seed=model_seed, n_classes=protocol.n_classes)],
                     stage="base-classifier", map_fn=map_fn, on_progress=on_progress)
    kw = [dict(base_state=b["state"], **x_split.clf_kwargs(), config=c, fc_init=protocol.fc_init,
               fc_layers=protocol.fc_layers, max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
               batch_size=protocol.clf_batch_size, seed=model_seed) for c in configs]
    results = run_units(transfer, kw, stage="transfer", map_fn=map_fn, on_progress=on_progress)
    transfer_seconds = {c.name: r["seconds_to_best"] for c, r in zip(configs, results)}
    estimator_seconds = time_estimators(b, base, x_split, protocol, repeats=repeats, model_seed=model_seed)
    fastest = min(transfer_seconds, key=transfer_seconds.get)
    speedup = transfer_seconds[fastest] / simex if simex > 0 else float("inf")
    log.info("latency %s via %s: simex %.4fs, fastest transfer %s %.2fs, speedup %.0fx",
             unknown, base, simex, fastest, transfer_seconds[fastest], speedup)
    return {
        "experiment": "latency",
        "references": refs,
        "unknown": unknown,
        "base": base,
        "loss": loss,
        "samples": samples,
        "data_seed": data_seed,
        "model_seed": model_seed,
        "repeats": repeats,
        "n_unknown": int(len(x_all)),
        "delta": value,
        "simex_seconds": simex,
        "simex_seconds_stats": {"min": min(times), "median": simex, "max": max(times), "all": times},
        "transfer_seconds": transfer_seconds,
        "transfer_epochs": {c.name: r["best_epoch"] for c, r in zip(configs, results)},
        "transfer_epochs_run": {c.name: r["epochs"] for c, r in zip(configs, results)},
        "transfer_total_seconds": {c.name: r["seconds"] for c, r in zip(configs, results)},
        "transfer_accuracy": {c.name: r["accuracy"] for c, r in zip(configs, results)},
        "fastest_transfer": fastest,
        "speedup": speedup,
        # Each estimator on the (X, B(base)) pair: B's forward pass over X's labelled transfer-training
        # split and the estimator itself, median of ``repeats``; beside SimEx's Δ and the transfers.
        "estimator_seconds": estimator_seconds,
        "estimator_speedup": {m: transfer_seconds[fastest] / t if t > 0 else float("inf")
                              for m, t in estimator_seconds.items()},
        "autoencoder_train_seconds": fleet_info["train_seconds"],
        "autoencoders_trained_here": fleet_info["trained"],
        "classifier_train_seconds": b["seconds"],
        "classifier_seconds_to_best": b["seconds_to_best"],
        "base_accuracy": b["test_accuracy"],
        "protocol": protocol.to_dict(),
        "sizes": {"unknown": x_split.sizes(), "base": b_split.sizes()},
    }


def time_estimators(base_result: dict[str, Any], base: str, x_split, protocol: ProtocolConfig, *, repeats: int,
                    model_seed: int) -> dict[str, float]:
    """{method: median seconds} of every transferability estimator for one (X, B(base)) pair."""
    from ..transfer.library import Classifier, Library, classifier_name
    from ..transfer.selection import METHODS, SIMEX, select

    record = Classifier(name=classifier_name(base, model_seed), spec=base, seed=model_seed,
                        n_classes=protocol.n_classes, fingerprint="")
    kw = x_split.clf_kwargs(protocol.transfer_samples)
    out = {}
    for m in (m for m in METHODS if m != SIMEX):
        times = []
        for _ in range(repeats):
            lib = Library.in_memory([(record, base_result["state"])])  # no cached model: each run pays its load
            t0 = time.perf_counter()
            select(lib, kw["x_train"], kw["y_train"], methods=[m], baseline=False)  # the method alone
            times.append(time.perf_counter() - t0)
        out[m] = statistics.median(times)
    return out


def write_latency(result: dict[str, Any], out_dir) -> dict[str, Path]:
    """Write latency.json and latency.png (log-scale seconds, like the paper's Fig. 5)."""
    from ..plots import pyplot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "latency.json", "png": out / "latency.png"}
    write_json(paths["json"], jsonable(result))

    plt = pyplot()
    estimators = result.get("estimator_seconds", {})
    names = ["SimEx"] + list(estimators) + list(result["transfer_seconds"])
    secs = [result["simex_seconds"]] + list(estimators.values()) + list(result["transfer_seconds"].values())
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 4), dpi=120)
    colors = ["tab:green"] + ["tab:orange"] * len(estimators) + ["tab:blue"] * len(result["transfer_seconds"])
    ax.bar(names, secs, color=colors)
    if result.get("simex_seconds_stats"):
        s = result["simex_seconds_stats"]
        ax.errorbar([0], [s["median"]], yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                    color="black", capsize=4)
    for k, v in enumerate(secs):
        ax.text(k, v, f"{v:.3g}s", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_ylabel("seconds (log scale)")
    shown = display_names([result["unknown"], result["base"]])
    ax.set_title(f"{shown[result['unknown']]} via {shown[result['base']]} (n = {result['n_unknown']}): speedup "
                 f"{result['speedup']:.3g}x\nover the fastest transfer ({result['fastest_transfer']}, "
                 f"time to min. val. loss)", fontsize=9)
    fig.tight_layout()
    write_figure(paths["png"], fig)
    plt.close(fig)
    return paths

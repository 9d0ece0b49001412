"""The transfer-learning ground truth, computed once and reused (Ray-free).

Paper protocol I compares Δ with how well a base classifier B(Y) transfers to
X. Training every base and every transfer is the expensive part, and a Tune
sweep compares every epoch of every trial with it, so the matrix is computed
once into a directory (the way FID tools cache reference statistics) and
every consumer checks that it was computed on the same data and protocol:

    GT/ground_truth.json       matrices, timings, protocol, data fingerprints, SNR
    GT/ground_truth.parquet    one row per (unknown X, base Y)
    GT/transfer_accuracy.png   the accuracy matrix

All matrices have rows = unknown X and columns = base Y in ``references``
order. ``accuracy`` is acc(X | B(Y)) averaged over classifier seeds and TL
configs, ``efficiency`` each row divided by its diagonal, and with the
``finetune`` protocol ``gain`` = acc(X | fine-tuned B(Y)) − acc(X | same
budget from scratch).

**Signal-to-noise.** A ground truth in which every base transfers equally
well cannot rank anything: ρ against it measures noise. ``snr`` states how
far the bases differ within a row against how far the same cell moves with
the classifier seed (needs 2+ seeds)::

    signal_i = std over bases j of mean-over-seeds T[i, j]      (ddof 1)
    noise    = sqrt(mean over cells of var over seeds T_s[i, j]) (ddof 1)
    snr      = mean_i signal_i / noise

where T is the target matrix (accuracy; gain for ``finetune``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..formats import LEGACY
from ..protocol import (DEFAULT, MapFn, Progress, ProtocolConfig, Splits, canonical_refs, jsonable, load_splits,
                       run_units)
from .fused_bases import train_bases
from .learning import finetune, tl_config, transfer, transfer_efficiency
from .library import FILE as LIBRARY_FILE
from .library import Classifier, LibraryWriter, classifier_name
from ..errors import UserError
from ..results import write_json, write_table

log = logging.getLogger("simex_ray.ground_truth")

FILE = "ground_truth.json"
LIBRARY = "library"  # GT/library: the base classifiers B(Y), one per reference and classifier seed
FORMAT_VERSION = 1


class GroundTruthError(UserError):
    """A ground truth that cannot be used here; the message names the difference and the fix."""


def signal_to_noise(per_seed: Sequence[np.ndarray]) -> dict[str, Any]:
    """SNR of a ground truth from its per-seed target matrices (S, n, n); see the module docstring."""
    a = np.asarray(per_seed, dtype=float)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise UserError(f"need (seeds, n, n) matrices, got shape {a.shape}")
    mean = a.mean(axis=0)
    n = mean.shape[0]
    signal = mean.std(axis=1, ddof=1) if n > 1 else np.full(n, np.nan)
    noise = float(np.sqrt(a.var(axis=0, ddof=1).mean())) if len(a) > 1 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = float(np.mean(signal) / noise) if noise > 0 else float("nan")
    own_best = [bool(np.argmax(mean[i]) == i) for i in range(n)]
    return {"snr": snr, "signal_per_row": signal.tolist(), "signal": float(np.mean(signal)), "noise": noise,
            "row_spread": (mean.max(axis=1) - mean.min(axis=1)).tolist(),
            "own_base_best": int(sum(own_best)), "seeds": int(len(a)),
            "note": None if len(a) > 1 else "one classifier seed: the noise (and so the SNR) needs 2 or more"}


@dataclass
class GroundTruth:
    """A computed transfer-learning ground truth; see the module docstring."""

    references: list[str]
    samples: int | None
    data_seed: int
    model_seed: int
    protocol: dict[str, Any]  # ProtocolConfig.to_dict()
    fingerprints: dict[str, dict[str, str]]  # ref -> split -> sha256
    accuracy: np.ndarray
    accuracy_per_config: dict[str, np.ndarray]
    accuracy_per_seed: dict[str, np.ndarray]
    base_accuracy: dict[str, float]
    base_seconds: dict[str, float]  # ref -> mean wall time of B(ref)'s whole training run
    base_seconds_to_best: dict[str, float]
    transfer_seconds_to_best_per_config: dict[str, np.ndarray]
    gain: np.ndarray | None = None
    gain_per_seed: dict[str, np.ndarray] | None = None
    scratch_accuracy: dict[str, float] | None = None
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    # Not in the JSON: the trained base classifiers [(library record, state_dict)], written by
    # :meth:`save` as the classifier library GT/library (:mod:`.library`).
    bases: list[tuple[Classifier, dict[str, Any]]] = field(default_factory=list, repr=False)

    @property
    def library(self) -> Path | None:
        """The classifier library saved beside this ground truth (None for ones written before it existed)."""
        if self.path is None:
            return None
        lib = Path(self.path) / LIBRARY
        return lib if (lib / LIBRARY_FILE).is_file() else None

    # ------------------------------------------------------------------ derived

    @property
    def efficiency(self) -> np.ndarray:
        return transfer_efficiency(self.accuracy)

    @property
    def target_name(self) -> str:
        return "gain" if self.gain is not None else "accuracy"

    def targets(self) -> dict[str, np.ndarray]:
        """The matrices ρ is computed against (``ranking.agreement``)."""
        out = {"accuracy": self.accuracy, "efficiency": self.efficiency}
        if self.gain is not None:
            out["gain"] = self.gain
        return out

    def snr(self) -> dict[str, Any]:
        per_seed = self.gain_per_seed if self.gain is not None else self.accuracy_per_seed
        return {"target": self.target_name, **signal_to_noise(list(per_seed.values()))}

    @property
    def fastest_base_seconds(self) -> float:
        """The fastest base classifier's training time (the paper's reference line in Fig. 6)."""
        return float(min(self.base_seconds.values()))

    def protocol_config(self) -> ProtocolConfig:
        return ProtocolConfig.from_dict(self.protocol)

    # ------------------------------------------------------------------ checks

    def check(self, *, refs: Sequence[str] | None = None, samples: int | None | str = "any",
              data_seed: int | None = None, protocol: ProtocolConfig | None = None,
              fingerprints: dict[str, dict[str, str]] | None = None) -> "GroundTruth":
        """Raise :class:`GroundTruthError` naming the first difference; return the ground truth
        reordered to ``refs`` (the same set in another order is fine)."""
        where = self.path or "the ground truth"
        fix = "recompute it with `simex experiment transfer` for these settings, or drop the differing flag"
        gt = self
        if refs is not None:
            refs = list(refs)
            if sorted(refs) != sorted(self.references):
                extra = sorted(set(refs) - set(self.references))
                missing = sorted(set(self.references) - set(refs))
                parts = ([f"not computed for {', '.join(extra)}"] if extra else []) + \
                        ([f"computed for {', '.join(missing)} too"] if missing else [])
                raise GroundTruthError(f"{where}: references differ ({'; '.join(parts)}); {fix}")
            gt = self.reordered(refs)
        if samples != "any" and samples != self.samples:
            raise GroundTruthError(f"{where}: computed on --samples {self.samples}, not {samples}; {fix}")
        if data_seed is not None and data_seed != self.data_seed:
            raise GroundTruthError(f"{where}: computed with data seed {self.data_seed}, not {data_seed}; {fix}")
        if protocol is not None:
            mine = ProtocolConfig.from_dict(self.protocol).ground_truth_fields()
            theirs = protocol.ground_truth_fields()
            diff = [k for k in mine if mine[k] != theirs[k]]
            if diff:
                k = diff[0]
                raise GroundTruthError(f"{where}: protocol differs in {', '.join(diff)} "
                                       f"({k} {mine[k]} here, {theirs[k]} asked); {fix}")
        if fingerprints is not None:
            for ref, fps in fingerprints.items():
                mine = self.fingerprints.get(ref, {})
                diff = [k for k, v in fps.items() if k in mine and mine[k] != v]
                if diff:
                    raise GroundTruthError(f"{where}: the data of {ref} changed since it was computed "
                                           f"({', '.join(diff)} differ); {fix}")
        return gt

    def reordered(self, refs: Sequence[str]) -> "GroundTruth":
        """The same ground truth with rows and columns in ``refs`` order."""
        idx = [self.references.index(r) for r in refs]
        if idx == list(range(len(idx))):
            return self

        def m(a):
            return None if a is None else np.asarray(a)[np.ix_(idx, idx)]

        def md(d):
            return None if d is None else {k: m(v) for k, v in d.items()}

        return GroundTruth(**{**self.__dict__, "references": list(refs), "accuracy": m(self.accuracy),
                              "accuracy_per_config": md(self.accuracy_per_config),
                              "accuracy_per_seed": md(self.accuracy_per_seed), "gain": m(self.gain),
                              "gain_per_seed": md(self.gain_per_seed),
                              "transfer_seconds_to_best_per_config": md(self.transfer_seconds_to_best_per_config)})

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict[str, Any]:
        def md(d):
            return None if d is None else {k: np.asarray(v).tolist() for k, v in d.items()}

        return jsonable({
            "format": FORMAT_VERSION, "kind": "simex-ground-truth",
            "references": self.references, "samples": self.samples, "data_seed": self.data_seed,
            "model_seed": self.model_seed, "protocol": self.protocol, "fingerprints": self.fingerprints,
            "target": self.target_name,
            "transfer_accuracy": np.asarray(self.accuracy).tolist(),
            "transfer_efficiency": self.efficiency.tolist(),
            "transfer_accuracy_per_config": md(self.accuracy_per_config),
            "transfer_accuracy_per_seed": md(self.accuracy_per_seed),
            "transfer_gain": None if self.gain is None else np.asarray(self.gain).tolist(),
            "transfer_gain_per_seed": md(self.gain_per_seed),
            "scratch_accuracy": self.scratch_accuracy,
            "base_accuracy": self.base_accuracy, "base_seconds": self.base_seconds,
            "base_seconds_to_best": self.base_seconds_to_best,
            "transfer_seconds_to_best_per_config": md(self.transfer_seconds_to_best_per_config),
            "snr": self.snr(), "sizes": self.sizes, "timings": self.timings,
        })

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path | None = None) -> "GroundTruth":
        def arr(v):
            return None if v is None else np.asarray(v, dtype=float)

        def md(v):
            return None if v is None else {k: arr(x) for k, x in v.items()}

        return cls(references=list(d["references"]), samples=d["samples"], data_seed=int(d["data_seed"]),
                   model_seed=int(d["model_seed"]), protocol=d["protocol"], fingerprints=d["fingerprints"],
                   accuracy=arr(d["transfer_accuracy"]), accuracy_per_config=md(d["transfer_accuracy_per_config"]),
                   accuracy_per_seed=md(d["transfer_accuracy_per_seed"]), base_accuracy=d["base_accuracy"],
                   base_seconds=d["base_seconds"], base_seconds_to_best=d["base_seconds_to_best"],
                   transfer_seconds_to_best_per_config=md(d["transfer_seconds_to_best_per_config"]),
                   gain=arr(d.get("transfer_gain")), gain_per_seed=md(d.get("transfer_gain_per_seed")),
                   scratch_accuracy=d.get("scratch_accuracy"), sizes=d.get("sizes", {}),
                   timings=d.get("timings", {}), path=path)

    def save(self, out_dir) -> dict[str, Path]:
        """Write the directory (JSON atomically, then the table and the figure)."""
        from ..plots import heatmap

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / FILE, "parquet": out / "ground_truth.parquet",
                 "png": out / "transfer_accuracy.png"}
        if self.bases:  # the base classifiers, kept as a library (before the JSON that marks completion)
            writer = LibraryWriter(out / LIBRARY, extra={"ground_truth": FILE})
            for record, state in self.bases:
                writer.add(record, state)
            paths["library"] = out / LIBRARY / LIBRARY_FILE
        rows = []
        eff = self.efficiency
        for i, x in enumerate(self.references):
            for j, y in enumerate(self.references):
                row = {"unknown": x, "base": y, "transfer_accuracy": float(self.accuracy[i, j]),
                       "transfer_efficiency": float(eff[i, j])}
                if self.gain is not None:
                    row["transfer_gain"] = float(self.gain[i, j])
                for c, m in self.accuracy_per_config.items():
                    row[f"accuracy_{c}"] = float(m[i, j])
                rows.append(row)
        write_table(paths["parquet"], rows)
        matrix, what = (self.gain, "gain over scratch") if self.gain is not None else (self.accuracy, "accuracy")
        snr = self.snr()["snr"]
        heatmap(matrix, self.references, self.references, paths["png"], cmap="viridis", mark_row_min=False,
                title=f"transfer {what} of X from B(Y) (SNR {snr:.2g})", xlabel="base classifier Y",
                ylabel="unknown data X")
        # The JSON last: a directory with ground_truth.json is complete.
        write_json(paths["json"], self.to_json())
        self.path = out
        return paths

    @classmethod
    def load(cls, path) -> "GroundTruth":
        p = Path(path)
        file = p / FILE if p.is_dir() or not p.suffix else p
        if not file.is_file():
            raise GroundTruthError(f"{file} is missing; compute a ground truth with "
                                   f"`simex experiment transfer --refs ... --out {path}`")
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GroundTruthError(f"{file} is corrupted ({e}); recompute it with `simex experiment transfer`") from None
        if not isinstance(d, dict) or d.get("kind") != "simex-ground-truth":
            raise GroundTruthError(f"{file} is not a simex ground truth (written by `simex experiment transfer`)")
        if d.get("format") != FORMAT_VERSION:
            raise GroundTruthError(f"{file} has format {d.get('format')}, this simex reads {FORMAT_VERSION}; "
                                   f"recompute it with `simex experiment transfer`")
        try:
            return cls.from_json(d, file.parent)
        except (KeyError, TypeError, ValueError) as e:
            raise GroundTruthError(f"{file} is incomplete ({type(e).__name__}: {e}); recompute it") from None


# --------------------------------------------------------------------------- computing one


def compute_ground_truth(refs: Sequence[str], *, samples: int | None = None, data_seed: int = 0,
                         model_seed: int = 0, data_dir=None, protocol: ProtocolConfig = DEFAULT,
                         splits: dict[str, Splits] | None = None, map_fn: MapFn | None = None,
                         base_map_fn: MapFn | None = None, on_progress: Progress | None = None,
                         bases_per_pass: int | None = None) -> GroundTruth:
    """Train B(Y) per reference and classifier seed, transfer every B(Y) to every X.

    ``map_fn`` runs the transfer units, ``base_map_fn`` the base classifiers
    (default: ``map_fn``; the CLI gives them Ray tasks and Ray Train runs).
    The base classifiers train in fused passes of at most ``bases_per_pass``
    (None: the memory bound; 1: one after another; :func:`~simex_ray.transfer.fused_bases.train_bases`).
    ``splits`` reuses splits a caller already loaded (same data seed and protocol).
    """
    refs = canonical_refs(refs)
    n = len(refs)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if splits is None:
        splits = {r: load_splits(r, samples=samples, data_seed=data_seed, data_dir=data_dir, protocol=protocol)
                  for r in refs}
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clf_seeds = [model_seed + s for s in protocol.seeds]
    base_kw = [dict(**splits[y].clf_kwargs(), optimizer=protocol.base_optimizer, lr=protocol.base_lr,
                    max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
                    batch_size=protocol.clf_batch_size, seed=s, n_classes=protocol.n_classes)
               for s in clf_seeds for y in refs]
    bases = train_bases(base_kw, per_pass=bases_per_pass, map_fn=base_map_fn or map_fn, on_progress=on_progress)
    base_at = {(s, y): bases[k * n + j] for k, s in enumerate(clf_seeds) for j, y in enumerate(refs)}
    timings["base_classifiers_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    finetuning = protocol.transfer_mode == "finetune"
    keys, tr_kw = [], []
    for s in clf_seeds:
        for cfg in protocol.tl_configs:
            for j, y in enumerate(refs):
                for i, x in enumerate(refs):
                    keys.append((s, cfg, i, j))
                    kw = dict(base_state=base_at[(s, y)]["state"], **splits[x].clf_kwargs(protocol.transfer_samples),
                              config=tl_config(cfg), batch_size=protocol.clf_batch_size, seed=s)
                    if finetuning:
                        kw.update(epochs=protocol.finetune_epochs)
                    else:
                        kw.update(fc_init=protocol.fc_init, fc_layers=protocol.fc_layers,
                                  max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience)
                    tr_kw.append(kw)
            if finetuning:  # the same budget from scratch, once per unknown
                for i, x in enumerate(refs):
                    keys.append((s, cfg, i, None))
                    tr_kw.append(dict(base_state=None, **splits[x].clf_kwargs(protocol.transfer_samples),
                                      config=tl_config(cfg), epochs=protocol.finetune_epochs,
                                      batch_size=protocol.clf_batch_size, seed=s, n_classes=protocol.n_classes))
    results = run_units(finetune if finetuning else transfer, tr_kw, stage="transfer", map_fn=map_fn,
                        on_progress=on_progress)
    timings["transfer_s"] = time.perf_counter() - t0

    acc_cfg = {c: np.zeros((n, n)) for c in protocol.tl_configs}
    acc_seed = {str(s): np.zeros((n, n)) for s in clf_seeds}  # mean over configs: the seed-to-seed noise
    scratch_seed = {str(s): np.zeros(n) for s in clf_seeds}
    sec_cfg = {c: np.zeros((n, n)) for c in protocol.tl_configs}
    for (s, cfg, i, j), r in zip(keys, results):
        if j is None:
            scratch_seed[str(s)][i] += r["accuracy"] / len(protocol.tl_configs)
            continue
        acc_cfg[cfg][i, j] += r["accuracy"] / len(clf_seeds)
        acc_seed[str(s)][i, j] += r["accuracy"] / len(protocol.tl_configs)
        sec_cfg[cfg][i, j] += r["seconds_to_best"] / len(clf_seeds)
    accuracy = np.mean(list(acc_cfg.values()), axis=0)
    gain = gain_seed = scratch = None
    if finetuning:
        gain_seed = {s: acc_seed[s] - scratch_seed[s][:, None] for s in acc_seed}
        gain = np.mean(list(gain_seed.values()), axis=0)
        scratch = dict(zip(refs, np.mean(list(scratch_seed.values()), axis=0).tolist()))

    def mean_over_seeds(key: str) -> dict[str, float]:
        return {y: float(np.mean([base_at[(s, y)][key] for s in clf_seeds])) for y in refs}

    timings["total_s"] = time.perf_counter() - t_all
    gt = GroundTruth(
        references=refs, samples=samples, data_seed=data_seed, model_seed=model_seed,
        protocol=protocol.to_dict(), fingerprints={r: splits[r].fingerprints() for r in refs},
        accuracy=accuracy, accuracy_per_config=acc_cfg, accuracy_per_seed=acc_seed,
        base_accuracy=mean_over_seeds("test_accuracy"), base_seconds=mean_over_seeds("seconds"),
        base_seconds_to_best=mean_over_seeds("seconds_to_best"), transfer_seconds_to_best_per_config=sec_cfg,
        gain=gain, gain_per_seed=gain_seed, scratch_accuracy=scratch,
        sizes={r: splits[r].sizes() for r in refs}, timings=timings)
    gt.bases = [(base_record(y, s, base_at[(s, y)], splits[y], protocol, data_seed=data_seed, samples=samples),
                 base_at[(s, y)]["state"]) for s in clf_seeds for y in refs]
    snr = gt.snr()
    log.info("ground truth (%s): SNR %.2f, own base best in %d/%d rows (%.0fs)", gt.target_name, snr["snr"],
             snr["own_base_best"], n, timings["total_s"])
    return gt


def base_settings(protocol: ProtocolConfig) -> dict[str, Any]:
    """How every base classifier of ``protocol`` is trained (a library record's ``config``)."""
    return {"optimizer": protocol.base_optimizer, "lr": protocol.base_lr, "max_epochs": protocol.clf_max_epochs,
            "patience": protocol.clf_patience, "batch_size": protocol.clf_batch_size}


def base_record(spec: str, seed: int, result: dict[str, Any], splits: Splits, protocol: ProtocolConfig, *,
                data_seed: int, samples: int | None) -> Classifier:
    """The library record of B(spec) from :func:`train_base`'s result."""
    return Classifier(name=classifier_name(spec, seed), spec=spec, seed=seed, n_classes=protocol.n_classes,
                      fingerprint=splits.fingerprints()["clf_train"], data_seed=data_seed, samples=samples,
                      config=base_settings(protocol), image_format=result.get("image_format", str(LEGACY)),
                      accuracy=float(result["test_accuracy"]),
                      val_accuracy=float(result["val_accuracy"]), seconds=float(result["seconds"]))

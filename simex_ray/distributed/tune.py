"""The early-stopping study on Ray Tune: one trial per (optimizer, lr, model seed).

The trial function only adapts the Ray-free :class:`FleetStepper` to Tune: it
restores its last checkpoint, steps the fleet one epoch, computes ρ against
the ground truth, and reports metrics with a checkpoint through
``ray.tune.report``. Trials run concurrently with fractional CPUs (and GPUs).
An interrupted study is resumed with ``Tuner.restore``: finished trials are
not run again, unfinished ones continue from their last epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from ray import tune
from ray.tune import Callback, Checkpoint, CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.stopper import Stopper

from ..experiments.stopping import FleetStepper, StabilityRule, StudyData, config_key, epoch_metrics
from ..errors import last_line, OperationalError
from ..training import TrainConfig

log = logging.getLogger(__name__)

STATE = "fleet.pt"
EXPERIMENT = "tune"  # the Tune experiment's folder under the study directory


class StableRhoStopper(Stopper):
    """Ends a trial at its earliest stable epoch (:class:`StabilityRule` on ``rho_curve``).

    Ray's ``TrialPlateauStopper`` tests the standard deviation of the last k
    results; "within ε of the plateau" is a band (max − min ≤ ε), which a
    0.1 step in ρ passes at std 0.043 < ε = 0.05 but the band does not. The
    trial reports its whole curve (it survives a restore in the checkpoint),
    so the stopper keeps no state and the offline analysis applies the very
    same rule to the same curve.
    """

    def __init__(self, rule: StabilityRule, metric: str = "rho_curve"):
        self.rule, self.metric = rule, metric

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.rule.stable_epoch(result.get(self.metric) or []) is not None

    def stop_all(self) -> bool:
        return False


def _trial(config: dict, study: StudyData, max_epochs: int, metric: str, fault: dict | None = None) -> None:
    """One Tune trial: train the fleet epoch by epoch, report ρ and a checkpoint after each."""
    optimizer, lr = config["optimizer_lr"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = "cuda" if torch.cuda.is_available() and config.get("gpu") else "cpu"
    cfg = TrainConfig(architecture=study.train_config["architecture"], loss=study.train_config["loss"],
                      epochs=max_epochs, batch_size=study.train_config["batch_size"],
                      optimizer=optimizer, lr=float(lr), seed=int(config["seed"]))
    stepper = FleetStepper(study.train, cfg, device)
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            stepper.load_state_dict(torch.load(Path(d) / STATE, map_location=device, weights_only=True))
    while stepper.epoch < max_epochs:
        train_delta = stepper.step()
        delta = stepper.delta_matrix(study.evaluate)
        m = epoch_metrics(delta, study.targets, study.references)
        stepper.history.append({"epoch": stepper.epoch, metric: m[metric], "train_seconds": stepper.train_seconds})
        report = {**m, "epoch": stepper.epoch, "train_seconds": stepper.train_seconds,
                  "train_delta": sum(train_delta.values()) / len(train_delta),
                  "rho_curve": [h[metric] for h in stepper.history],
                  "optimizer": cfg.optimizer, "lr": cfg.resolved_lr, "seed": cfg.seed}
        with tempfile.TemporaryDirectory() as d:
            torch.save(stepper.state_dict(), Path(d) / STATE)
            tune.report(report, checkpoint=Checkpoint.from_directory(d))
        if fault and stepper.epoch == fault["epoch"]:
            _inject(fault)


def _inject(fault: dict) -> None:
    """Fault injection for tests, once per study (the first trial to get here), after a checkpoint:
    end this process, or (``pause_s``) write its pid to the marker and sleep, so a test can lose
    its node at a known point."""
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if fault.get("pause_s"):
        time.sleep(fault["pause_s"])
    else:
        os._exit(1)


class _Progress(Callback):
    """One stderr line per reported epoch and per finished trial."""

    def __init__(self, max_epochs: int, metric: str, on_line: Callable[[str], None] | None = None):
        self.t0, self.max_epochs, self.metric = time.perf_counter(), max_epochs, metric
        self.on_line = on_line or (lambda line: print(line, file=sys.stderr, flush=True))

    def setup(self, **info):
        self.t0 = time.perf_counter()  # also on a restore, which unpickles this callback

    def _name(self, trial) -> str:
        optimizer, lr = trial.config["optimizer_lr"]
        return f"{config_key(optimizer, float(lr))} seed {trial.config['seed']}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rho = result.get(self.metric)
        self.on_line(f"[{time.perf_counter() - self.t0:6.1f}s] {self._name(trial):<26} epoch "
                     f"{result['epoch']:>3}/{self.max_epochs:<3} ρ {rho if rho is None else f'{rho:+.2f}'} "
                     f"(strict {result.get('rho_mean_strict', float('nan')):+.2f})  test Δ "
                     f"{result['mean_test_delta']:.5f}  trained {result['train_seconds']:.1f}s")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.on_line(f"[{time.perf_counter() - self.t0:6.1f}s] {self._name(trial):<26} done")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.on_line(f"[{time.perf_counter() - self.t0:6.1f}s] {self._name(trial):<26} lost (a worker or node "
                     f"failed); resuming from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_line(f"[{time.perf_counter() - self.t0:6.1f}s] {self._name(trial):<26} failed (retried if "
                     f"attempts are left)")


def run_study(study: StudyData, configs: list[tuple[str, float]], seeds: list[int], *, max_epochs: int,
              storage: str, rule: StabilityRule | None = None, metric: str = "rho_mean",
              cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, max_failures: int = 2,
              on_line: Callable[[str], None] | None = None, fault: dict | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the sweep on the current Ray cluster; every reported row, all trials.

    ``storage``: the directory or URI that holds the Tune experiment (folder
    ``tune``); when it already holds one, it is restored (finished trials
    kept, unfinished ones resumed from their checkpoint, errored ones
    retried). ``rule``: stop each trial at its earliest stable epoch (None:
    run every trial to ``max_epochs``).
    """
    # Tune's own console output and checkpoint-frequency advice are noise next to our progress lines.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot the experiment state every second (Tune's "auto" waits 10 s or more): a driver lost right
    # after a trial finished must not restore that trial as unfinished, or from a checkpoint already
    # rotated away. Two checkpoints are kept per trial for the same reason.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, study=study, max_epochs=max_epochs, metric=metric, fault=fault),
        {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial else {})})
    path = f"{storage.rstrip('/')}/{EXPERIMENT}"
    progress = _Progress(max_epochs, metric, on_line)
    if Tuner.can_restore(path):
        log.info("resuming the study in %s (finished trials are kept)", path)
        tuner = Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        space = {"optimizer_lr": tune.grid_search([list(c) for c in configs]), "seed": tune.grid_search(seeds),
                 "threads": max(1, round(cpus_per_trial)), "gpu": gpus_per_trial > 0}
        tuner = Tuner(
            trainable, param_space=space,
            tune_config=TuneConfig(reuse_actors=False),
            run_config=RunConfig(
                name=EXPERIMENT, storage_path=storage, verbose=0, callbacks=[progress],
                stop=StableRhoStopper(rule) if rule is not None else None,
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2)))
    # Tune prints its own tables to stdout even when told to be quiet; stdout is the command's JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        results = tuner.fit()
    rows: list[dict[str, Any]] = []
    for r in results:
        rows.extend(_reported_rows(r))
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise StudyError(f"{len(errors)} trial(s) failed; re-run the same command to retry them "
                         f"(first error: {last_line(errors[0])})", rows)
    rows.sort(key=lambda r: (r["optimizer"], r["lr"], r["seed"], r["epoch"]))
    return rows


class StudyError(OperationalError):
    """Some trials failed; ``rows`` holds what every trial reported."""

    def __init__(self, message: str, rows: list[dict[str, Any]]):
        super().__init__(message)
        self.rows = rows


def _reported_rows(result) -> list[dict[str, Any]]:
    """Every row a trial reported, from its ``result.json`` (one JSON object per line) on any filesystem."""
    import json

    fs, path = result.filesystem, f"{result.path}/result.json"
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError):
        return []
    keep = ("epoch", "train_seconds", "optimizer", "lr", "seed", "rho_mean", "rho_mean_strict", "rho_mean_gain",
            "rho_per_base", "rho_per_base_strict", "mean_test_delta", "train_delta", "delta", "trial_id")
    by_epoch = {}  # a trial resumed from an earlier checkpoint reports some epochs again: keep the last
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("epoch") is not None:
                by_epoch[int(rec["epoch"])] = {k: rec[k] for k in keep if k in rec}
    return [by_epoch[e] for e in sorted(by_epoch)]

"""Run independent experiment units on Ray: as tasks, or packed into Ray Train runs.

* :func:`ray_map` - one Ray task per unit (transfers: many small, short units);
* :func:`train_map` - units dealt among concurrent one-worker ``TorchTrainer``
  runs that checkpoint after every unit, so a crashed worker resumes where it
  stopped (base classifiers: the models later units depend on).

Both return a ``map_fn(fn, kwargs_list) -> results`` (in order), the hook the
Ray-free experiment code (``simex_ray.experiments``) takes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import torch

log = logging.getLogger(__name__)

OnUnit = Callable[[str, int, int], None]
RESULTS = "results.pt"  # a Train run's checkpoint: {unit index: result} of its finished units


def _object_store(kwargs_list: list[dict[str, Any]], nested: bool = True) -> list[dict[str, Any]]:
    """The same kwargs with every large array put in the object store once (shared across units), also
    inside lists and dicts (a group of units as one unit: ``train_base_group(units=[...])``)."""
    stored: dict[int, ray.ObjectRef] = {}

    def put(value):
        if isinstance(value, np.ndarray) and value.nbytes > 4096:
            if id(value) not in stored:
                stored[id(value)] = ray.put(value)
            return stored[id(value)]
        if nested and isinstance(value, (list, tuple)):
            return type(value)(put(v) for v in value)
        if nested and isinstance(value, dict):
            return {k: put(v) for k, v in value.items()}
        return value

    return [{k: put(v) for k, v in kw.items()} for kw in kwargs_list]


def _resolve(value):
    """What :func:`_object_store` stored, fetched back (top level and inside lists and dicts)."""
    if isinstance(value, ray.ObjectRef):
        return ray.get(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


def _weight(kw: dict[str, Any]) -> int:
    """What a unit counts for in progress: a group of units (``units=[...]``, fused base classifiers) its units."""
    units = kw.get("units")
    return len(units) if isinstance(units, list) else 1


def _cluster_slots(cpus_per_unit: float, total: int) -> int:
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(total, int(cpus // cpus_per_unit) if cpus_per_unit else total))


def ray_map(cpus_per_task: float = 1.0, gpus_per_task: float = 0.0, max_retries: int = 2,
            on_unit: OnUnit | None = None):
    """A ``map_fn`` backed by Ray tasks; a task whose worker dies is retried.

    ``on_unit(stage, done, total)`` reports progress as tasks finish (stage =
    the function's name).
    """

    def map_fn(fn: Callable[..., Any], kwargs_list: list[dict[str, Any]]) -> list[Any]:
        remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries)(fn)
        # top-level arrays only: Ray resolves a task's top-level arguments, and passes nested ones by value
        refs = [remote.remote(**kw) for kw in _object_store(kwargs_list, nested=False)]
        index = {r: i for i, r in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending, weights, done = list(refs), [_weight(kw) for kw in kwargs_list], 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                results[index[r]] = ray.get(r)
                done += weights[index[r]]
            if on_unit is not None:
                on_unit(fn.__name__, done, sum(weights))
        return results

    map_fn.concurrency = lambda total: _cluster_slots(cpus_per_task, total)  # units it runs at once
    return map_fn


# --------------------------------------------------------------------------- Ray Train


def _save_results(done: dict[int, Any], metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        torch.save(done, Path(d) / RESULTS)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _load_results(checkpoint) -> dict[int, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / RESULTS, map_location="cpu", weights_only=True)


def _units_loop(cfg: dict) -> None:
    """Ray Train worker: run this run's units in turn, checkpointing the results after each.

    A restarted worker restores the finished units from the latest checkpoint
    and continues with the next one.
    """
    import ray.train

    torch.set_num_threads(max(1, int(cfg["threads"])))
    fn, board, fault = cfg["fn"], cfg["board"], cfg.get("fault")
    weights = {index: _weight(kw) for index, kw in cfg["units"]}
    done: dict[int, Any] = {}
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        done = _load_results(checkpoint)
    for index, kw in cfg["units"]:
        if index in done:
            continue
        done[index] = fn(**_resolve(kw))
        _save_results(done, {"unit": index, "units_done": len(done)})
        board.update.remote(cfg["run"], {"epoch": sum(weights.get(i, 1) for i in done)})
        # Fault injection for tests: hard-kill the worker once, after a checkpoint.
        if fault and fault["unit"] == index and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).touch()
            os._exit(1)
    if not done:  # nothing ran (empty share): still leave a checkpoint to read
        _save_results(done, {"units_done": 0})


def train_map(resources=None, *, storage: str | None = None, on_unit: OnUnit | None = None,
              fault: dict | None = None, poll_s: float = 0.5):
    """A ``map_fn`` backed by Ray Train: units dealt among concurrent one-worker TorchTrainer runs.

    ``resources`` (:class:`simex_ray.distributed.train.Resources`) sets the
    CPUs per worker, how many runs go at once (default: what the cluster's
    CPUs allow) and how often a crashed worker is restarted. Every run
    checkpoints after each unit, into ``storage`` (default: a temporary
    directory removed afterwards), so a restarted worker repeats at most the
    unit it was in. ``fault={"unit": i, "marker": path}`` kills the worker
    once right after unit i's checkpoint (tests).
    """
    from ..errors import last_line
    from .train import Resources, TrainingError, local_board, run_concurrently, shard

    res = resources or Resources()

    def map_fn(fn: Callable[..., Any], kwargs_list: list[dict[str, Any]]) -> list[Any]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        total = len(kwargs_list)
        if total == 0:
            return []
        weight = sum(_weight(kw) for kw in kwargs_list)  # progress counts a group's units
        units = list(enumerate(_object_store(kwargs_list)))
        groups = shard(units, res.concurrent_runs(total))
        tag = f"{fn.__name__}-{uuid.uuid4().hex[:8]}"
        board = local_board()
        worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}
        own_storage = None if storage else tempfile.mkdtemp(prefix="simex-units-")
        root = storage or own_storage

        def fit(i: int, group: list) -> dict[int, Any]:
            trainer = TorchTrainer(
                _units_loop,
                train_loop_config={"fn": fn, "units": group, "board": board, "run": f"run{i}", "fault": fault,
                                   "threads": max(1, round(res.cpus_per_worker))},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=res.gpus_per_worker > 0,
                                             resources_per_worker=worker),
                run_config=RunConfig(name=f"{tag}-run{i}", storage_path=str(root),
                                     failure_config=FailureConfig(max_failures=res.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=1)))
            result = trainer.fit()
            if result.checkpoint is None:
                raise RuntimeError(f"Train run {i} of {fn.__name__} finished without a checkpoint")
            return _load_results(result.checkpoint)

        last = [-1]

        def poll() -> None:
            latest, _ = ray.get(board.drain.remote())
            done = sum(m["epoch"] for m in latest.values())
            if on_unit is not None and done != last[0]:
                last[0] = done
                on_unit(fn.__name__, done, weight)

        try:
            outcomes = run_concurrently([lambda i=i, g=g: fit(i, g) for i, g in enumerate(groups)], poll, poll_s)
            poll()
        finally:
            ray.kill(board)
            if own_storage:
                shutil.rmtree(own_storage, ignore_errors=True)
        results: dict[int, Any] = {}
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for o in outcomes:
            if not isinstance(o, BaseException):
                results.update(o)
        if errors or len(results) != total:
            missing = total - len(results)
            raise TrainingError(f"{missing} of {total} {fn.__name__} unit(s) failed on Ray Train"
                                + (f": {last_line(errors[0])}" if errors else ""))
        return [results[i] for i in range(total)]

    map_fn.concurrency = res.concurrent_runs  # units it runs at once (the fused base passes keep each run busy)
    return map_fn

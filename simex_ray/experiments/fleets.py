"""The one fleet provider of the studies: use a trained fleet as it is, or train (resume) one.

A study names the members it needs. A directory whose manifest lists all of them is used as it is
(the study then checks it was trained on the study's own data); any other directory is trained into,
or resumed, by a :data:`FleetTrainer`: here, in this process (:func:`local_trainer`), or on
Ray Train (the CLI passes :func:`simex_ray.distributed.train.build_fleet` bound to its resources).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from ..fleet import Fleet, read_manifest
from ..protocol import Progress
from ..training import TrainConfig

# trainer(refs, path, config, samples, per_class): train, or resume, the fleet of ``refs`` into ``path``.
FleetTrainer = Callable[[list, str, TrainConfig, "int | None", bool], None]


def local_trainer(*, data_seed: int, data_dir=None, cache: dict | None = None, on_progress: Progress | None = None,
                  stage: str = "autoencoders", extra: dict | None = None) -> FleetTrainer:
    """A :data:`FleetTrainer` that trains in this process; ``on_progress(stage, done, total)`` counts members."""
    from ..fleet.build import train_fleet_local
    from ..fleet.plan import fleet_extra, plan_fleet

    def train(refs, path, config, samples, per_class):
        plans = plan_fleet(refs, config, samples=samples, per_class=per_class, seed=data_seed, data_dir=data_dir,
                           cache=cache)
        done = [0]

        def on_epoch(name, metrics):
            if on_progress is not None and metrics["epoch"] == config.epochs:
                done[0] += 1
                on_progress(stage, done[0], len(plans))

        meta = {**fleet_extra(refs, config, samples=samples, per_class=per_class, data_seed=data_seed),
                **(extra or {})}
        train_fleet_local(plans, path, on_epoch=on_epoch, extra=meta)
    return train


def is_complete(path, names: Sequence[str]) -> bool:
    """``path`` holds a fleet whose manifest lists every one of ``names``."""
    if path is None or not (Path(path) / "manifest.json").is_file():
        return False
    listed = {m.get("name") for m in read_manifest(path).get("members", [])}
    return set(names) <= listed


def provide_fleet(refs: list[str], path, config: TrainConfig, *, samples: int | None, per_class: bool = False,
                  trainer: FleetTrainer, names: Sequence[str] | None = None) -> tuple[Fleet, float, bool]:
    """(fleet, seconds spent training, trained here) for ``refs``.

    ``names``: the members the study needs (default ``refs``); a fleet at ``path`` that lists them
    all is loaded as it is. Otherwise ``trainer`` trains or resumes it into ``path`` (``None``: a
    temporary directory, removed once the fleet is loaded; the fleet's ``path`` is then None).
    """
    if is_complete(path, names if names is not None else refs):
        return Fleet.load(path), 0.0, False
    t0 = time.perf_counter()
    if path is not None:
        trainer(refs, str(path), config, samples, per_class)
        return Fleet.load(path), time.perf_counter() - t0, True
    with tempfile.TemporaryDirectory(prefix="simex-fleet-") as tmp:
        trainer(refs, tmp, config, samples, per_class)
        fleet = Fleet.load(tmp)
    fleet.path = None
    return fleet, time.perf_counter() - t0, True

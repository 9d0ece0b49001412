"""Fleet training on Ray Train: one small TorchTrainer per member, run concurrently.

The worker function only adapts ``simex_ray.training.train_member`` to Ray:
it restores the latest checkpoint, reports metrics and an epoch checkpoint
after each epoch, and pushes progress to a driver-side board. Re-running the
same fleet resumes: finished members are skipped (manifest) and unfinished
ones continue from their last epoch checkpoint (same run name + storage).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch

from ..fleet import slug
from ..plan import FleetWriter, MemberPlan
from ..training import TrainConfig, train_member

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Resources:
    cpus_per_member: float = 0.5
    gpus_per_member: float = 0.0
    max_failures: int = 2


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest metrics per member, written by workers, polled by the driver."""

    def __init__(self):
        self.latest: dict[str, dict] = {}

    def update(self, member: str, metrics: dict) -> None:
        self.latest[member] = metrics

    def snapshot(self) -> dict[str, dict]:
        return dict(self.latest)


def _worker_loop(cfg: dict) -> None:
    """Ray Train worker: train one member, checkpointing every epoch."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(cfg["config"])
    torch.set_num_threads(max(1, int(cfg["threads"])))
    device = ray.train.torch.get_device()
    x_train, x_test = ray.get(cfg["x_train"]), ray.get(cfg["x_test"])
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    board, fault = cfg["board"], cfg.get("fault")

    def on_epoch(epoch: int, metrics: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report({**metrics, "member": cfg["member"]},
                             checkpoint=ray.train.Checkpoint.from_directory(d))
        board.update.remote(cfg["member"], {**metrics, "epochs": config.epochs})
        # Fault injection for tests: hard-kill the worker once, after a checkpoint.
        if fault and epoch == fault["epoch"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).touch()
            os._exit(1)

    if resume is not None and resume["epoch"] >= config.epochs:
        ray.train.report({**resume["history"][-1], "member": cfg["member"]})
        return
    train_member(x_train, x_test, config, resume=resume, on_epoch=on_epoch, device=device)


def _fit_member(plan: MemberPlan, storage: Path, res: Resources, board, fault: dict | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = TrainConfig.from_dict(plan.member.config)
    worker_resources = {"CPU": res.cpus_per_member}
    if res.gpus_per_member:
        worker_resources["GPU"] = res.gpus_per_member
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config.to_dict(), "member": plan.name, "board": board, "fault": fault,
            "x_train": ray.put(plan.x_train), "x_test": ray.put(plan.x_test),
            "threads": max(1, round(res.cpus_per_member)),
        },
        scaling_config=ScalingConfig(num_workers=1, use_gpu=res.gpus_per_member > 0,
                                     resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=f"{slug(plan.name)}-{plan.run_key}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"member {plan.name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    return state


ProgressFn = Callable[[str, dict], None]


def train_fleet(plans: list[MemberPlan], out, *, resources: Resources = Resources(),
                storage: str | None = None, on_progress: ProgressFn | None = None,
                extra: dict | None = None, fault: dict | None = None,
                poll_s: float = 1.0) -> FleetWriter:
    """Train all pending members concurrently on the current Ray cluster.

    Weights and the manifest land in ``out`` as each member finishes;
    checkpoints go to ``storage`` (default ``out/checkpoints``).
    ``on_progress(member, metrics)`` is called on the driver whenever a
    member reports a new epoch.
    """
    out = Path(out).resolve()
    storage_path = Path(storage).resolve() if storage else out / "checkpoints"
    storage_path.mkdir(parents=True, exist_ok=True)
    writer = FleetWriter(out, extra)
    todo = writer.pending(plans)
    if not todo:
        return writer
    board = ProgressBoard.remote()
    seen: dict[str, int] = {}
    errors: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="simex-fit") as pool:
        futures = {pool.submit(_fit_member, p, storage_path, resources, board, fault): p for p in todo}
        pending = set(futures)
        while pending:
            done = {f for f in pending if f.done()}
            for f in done:
                plan = futures[f]
                try:
                    state = f.result()
                    writer.add(plan, state["model"], state["history"])
                    log.info("%s: done, weights written", plan.name)
                except BaseException as e:  # keep the others running; report at the end
                    errors[plan.name] = e
                    log.error("%s: failed: %s", plan.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            pending -= done
            if on_progress is not None:
                for name, metrics in ray.get(board.snapshot.remote()).items():
                    if seen.get(name) != metrics["epoch"]:
                        seen[name] = metrics["epoch"]
                        on_progress(name, metrics)
            if pending:
                time.sleep(poll_s)
    ray.kill(board)
    if errors:
        names = ", ".join(errors)
        raise TrainingError(f"{len(errors)} member(s) failed: {names}; re-run the same command to resume "
                            f"(first error: {_first_line(next(iter(errors.values())))})")
    return writer


class TrainingError(RuntimeError):
    pass


def _first_line(e: BaseException) -> str:
    lines = [l for l in str(e).splitlines() if l.strip()]
    return lines[-1] if lines else type(e).__name__

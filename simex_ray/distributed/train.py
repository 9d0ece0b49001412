"""Fleet training on Ray Train: a few TorchTrainer runs, each training its share of the members, concurrently.

The worker function only adapts ``simex_ray.fused_training.train_members`` to Ray: it trains its members in
fused passes (members alike, as many as a pass's memory bound allows), restores the latest checkpoint, pushes
each epoch's metrics to a driver-side board, writes each finished member once, and checkpoints the members in
training after a round of epochs when that is worth its cost (:class:`CheckpointPacer`). Re-running the same
fleet resumes: finished members are skipped (manifest) and unfinished ones continue from their last epoch
checkpoint (same run name + storage).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from .. import storage
from ..errors import last_line, OperationalError, UserError
from ..fleet import slug
from ..fleet.build import MANIFEST_FLUSH_S
from ..fleet.plan import FleetWriter, MemberPlan
from ..fused_training import MemberJob, plan_passes, train_members
from ..device import prefetch
from ..training import TrainConfig, train_member_streamed

log = logging.getLogger(__name__)

CURRENT = "current.pt"  # the members in training: {"members": {name: (model, optimizer, epoch, history)}}
DONE = "done"  # (checkpoints of earlier versions) finished members: done/<slug>.pt with model + history


@dataclass(frozen=True)
class Resources:
    """How members map onto Ray Train runs.

    Each Train run has one worker that trains its share of the members one
    after another; ``runs`` of them go concurrently (default: as many as the
    cluster's CPUs allow at ``cpus_per_worker`` each). Packing matters: every
    Train run costs ~15 CPU-seconds of actor start-up, more than a small
    autoencoder's whole training.
    """

    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    runs: int | None = None  # None: auto
    max_failures: int = 2
    members_per_pass: int | None = None  # members a worker trains in one fused pass (None: its memory bound)
    workers_per_member: int = 1  # > 1: each member trains data-parallel (DDP) on this many workers

    def __post_init__(self):
        if self.workers_per_member < 1:
            raise UserError(f"workers per member must be >= 1, got {self.workers_per_member}")

    def concurrent_runs(self, n_members: int) -> int:
        if self.workers_per_member > 1:  # one run per member, each of several workers; Ray queues the rest
            return n_members
        if self.runs:
            return max(1, min(self.runs, n_members))
        cpus = ray.cluster_resources().get("CPU", 1.0)
        slots = int(cpus // self.cpus_per_worker) if self.cpus_per_worker else n_members
        if self.gpus_per_worker:
            slots = min(slots, int(ray.cluster_resources().get("GPU", 0) // self.gpus_per_worker))
        return max(1, min(n_members, slots))


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Workers post epoch metrics and finished members; the driver drains it."""

    def __init__(self):
        self.latest: dict[str, dict] = {}
        self.updates: list[tuple[str, dict]] = []  # every epoch since the last drain_all, in order
        self.finished: list[tuple[str, dict]] = []

    def update(self, member: str, metrics: dict) -> None:
        self.latest[member] = metrics
        self.updates.append((member, metrics))
        del self.updates[:-UPDATES_KEPT]  # a driver that stops draining never makes the board grow

    def finish(self, member: str, state: dict) -> None:
        self.finished.append((member, state))

    def drain(self) -> tuple[dict[str, dict], list[tuple[str, dict]]]:
        """({member: its latest metrics}, finished members since the last drain)."""
        finished, self.finished = self.finished, []
        return dict(self.latest), finished

    def drain_all(self) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
        """(every epoch's metrics since the last call, in order; finished members since the last call)."""
        updates, self.updates = self.updates, []
        finished, self.finished = self.finished, []
        return updates, finished


UPDATES_KEPT = 100_000


def local_board():
    """A ProgressBoard pinned to the driver's node: the driver polls it, so on a worker
    node it would take the driver down with that node (ActorUnavailableError)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressBoard.options(scheduling_strategy=here).remote()


class CheckpointPacer:
    """Decides after which epochs a Train worker checkpoints the member in training.

    A Ray Train checkpoint (``ray.train.report`` with a directory) costs about 2 s on a 2-core machine,
    whatever its size, while a small autoencoder's epoch can take 20 ms: checkpointing every epoch made
    a 100-member fleet 95% checkpointing. So a run's first epoch is always checkpointed, and a later one
    only once the training since the last checkpoint is at least ``1 / budget`` times what that checkpoint
    cost: checkpoints stay at most ``budget`` of the run's time, and a crash loses at most about
    ``cost / budget`` seconds of training. Long epochs (the usual case for real models) are all
    checkpointed. A member's last epoch is never checkpointed: its finished state is written once, apart.
    """

    def __init__(self, budget: float = 0.1, clock: Callable[[], float] = time.perf_counter):
        if not 0 < budget <= 1:
            raise UserError(f"checkpoint budget must be in (0, 1], got {budget}")
        self.budget, self.clock = budget, clock
        self.cost = 0.0  # seconds the last checkpoint took
        self.last: float | None = None  # when it ended
        self.written = self.skipped = 0

    def due(self) -> bool:
        if self.last is None or self.cost <= self.budget * (self.clock() - self.last):
            return True
        self.skipped += 1
        return False

    def write(self, save: Callable[[], None]) -> None:
        started = self.clock()
        save()
        self.last = self.clock()
        self.cost = self.last - started
        self.written += 1


def _save_checkpoint(current: dict[str, dict] | None, metrics: dict) -> None:
    """Report ``metrics`` with a checkpoint of the members in training only: the size of an epoch's
    checkpoint does not grow with the members a run has finished (each of those is written once, to
    the run's done directory: :func:`_save_done`)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if current:
            torch.save({"members": current}, Path(d) / CURRENT)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _save_done(done_dir: str, name: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.resolve(done_dir).join(f"{slug(name)}.pt").write_bytes_atomic(buf.getvalue())


def _load_done(done_dir: str, name: str) -> dict | None:
    """A finished member's state from the run's done directory (None if absent or unreadable)."""
    path = storage.resolve(done_dir).join(f"{slug(name)}.pt")
    try:
        if not path.is_file():
            return None
        return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file: train the member again
        log.warning("%s: unreadable finished state %s; training it again", name, path)
        return None


def _child(where: Path | str, name: str) -> str:
    """``where``/``name`` for a path or a URI (its query, which may configure the filesystem, kept)."""
    if isinstance(where, Path):
        return str(where / name)
    base, sep, query = str(where).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def _load_checkpoint(checkpoint) -> tuple[dict[str, dict], dict[str, dict]]:
    """({member: finished state} of an earlier version's checkpoint, {member: state} of those in training)."""
    done, current = {}, {}
    with checkpoint.as_directory() as d:
        for f in sorted((Path(d) / DONE).glob("*.pt")):
            state = torch.load(f, map_location="cpu", weights_only=True)
            done[state["member"]] = state
        if (Path(d) / CURRENT).exists():
            saved = torch.load(Path(d) / CURRENT, map_location="cpu", weights_only=True)
            # one member's state with its name (before fused passes), or {"members": {name: state}}
            current = saved["members"] if "members" in saved else {saved["member"]: saved}
    return done, current


def _worker_loop(cfg: dict) -> None:
    """Ray Train worker: train this run's members in fused passes, checkpointing after rounds of epochs.

    A restart (worker crash, or the same command run again) restores the
    finished members and continues the others from their last checkpointed epoch.
    """
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(cfg["threads"])))
    device = ray.train.torch.get_device()
    board, fault, done_dir = cfg["board"], cfg.get("fault"), cfg["done_dir"]
    done: dict[str, dict] = {}  # finished states in a checkpoint of an earlier version
    current: dict[str, dict] = {}  # the members in training at the last checkpoint
    finished = 0
    pacer = CheckpointPacer()
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        done, current = _load_checkpoint(checkpoint)
    todo = []
    for job in cfg["members"]:
        name, config = job["name"], TrainConfig.from_dict(job["config"])
        # A member finished in an earlier attempt is kept; one finished with fewer
        # epochs than now asked for continues from where it stopped.
        resume = done.pop(name, None) or _load_done(done_dir, name) or current.get(name)
        if resume is not None and resume["epoch"] > config.epochs:
            resume = None  # trained longer than now asked: start over rather than pretend
        if resume is not None and config.finished(resume["history"]):
            ray.get(board.finish.remote(name, {"model": resume["model"], "history": resume["history"]}))
            finished += 1
            continue
        todo.append((job, config, resume))
    def finish(name: str, state: dict) -> None:
        # The last epoch's state (model, optimizer, epoch, history) is the finished member: written once,
        # then handed to the driver (and waited for, so a crash after this never loses it).
        state = {**state, "member": name, "model": {k: v.detach().cpu() for k, v in state["model"].items()}}
        _save_done(done_dir, name, state)
        ray.get(board.finish.remote(name, {"model": state["model"], "history": state["history"]}))

    written: dict = {}  # the metrics reported with the last checkpoint written

    def on_round(reports) -> None:
        nonlocal finished
        in_training = {}  # every member of the pass still training reports in each round
        for name, metrics, state in reports:
            epochs = configs[name].epochs
            board.update.remote(name, {**metrics, "epochs": epochs})
            if configs[name].finished(state["history"]):
                finish(name, state)
                finished += 1
            else:
                in_training[name] = {**state, "member": name}
        if in_training and pacer.due():  # written now, before training moves these tensors on
            written.clear()
            written.update({**reports[-1][1], "member": reports[-1][0]})
            pacer.write(lambda: _save_checkpoint(in_training, written))
        # Fault injection for tests: hard-kill the worker once, after that epoch (and its checkpoint, if due),
        # once the controller has registered the last checkpoint written (else a fast kill races it).
        for name, metrics, _ in reports:
            if (fault and fault["member"] == name and metrics["epoch"] == fault["epoch"]
                    and not os.path.exists(fault["marker"])):
                if written:
                    _wait_registered(fault["snapshot"], written["member"], written["epoch"])
                Path(fault["marker"]).touch()
                os._exit(1)

    configs = {job["name"]: config for job, config, _ in todo}
    for job, config, resume in (t for t in todo if t[0].get("stream") is not None):  # large: one at a time
        train_member_streamed(job["stream"], config, resume=resume, device=device,
                              on_epoch=lambda e, metrics, state, name=job["name"]: on_round([(name, metrics, state)]))
    todo = [t for t in todo if t[0].get("stream") is None]
    for indices in plan_passes([c for _, c, _ in todo], cfg.get("members_per_pass"), device):
        jobs = [MemberJob(todo[i][0]["name"], todo[i][1], ray.get(todo[i][0]["x_train"]),
                          ray.get(todo[i][0]["x_test"]), todo[i][2]) for i in indices]
        train_members(jobs, on_round=on_round, device=device)
    log.info("Train worker: %d member(s) finished; %d epoch checkpoint(s) written, %d skipped (pacing)",
             finished, pacer.written, pacer.skipped)
    _save_checkpoint(None, {"members_done": finished})


def _data_parallel_loop(cfg: dict) -> None:
    """Ray Train worker of a run with several workers and one member: data-parallel training (DDP).

    Every worker holds the same initial (or resumed) state and walks the member's seeded permutation of its
    training rows in the steps one worker would take: global step s is rows ``s·B .. (s+1)·B``, and worker r
    computes about B/W of them (:func:`_share_step`). DDP averages the W gradients into the gradient of the
    step's mean δ, so each step is the one-worker step to float rounding, the epoch's short last step too.
    The test Δ is summed over shards across workers. Worker 0
    checkpoints when its pacer says so (the decision is broadcast: every worker reports the same number of
    times) and hands the finished member to the driver. A streamed member is read by every worker, each
    computing its share of every batch.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ..training import resumed_state

    torch.set_num_threads(max(1, int(cfg["threads"])))
    device = ray.train.torch.get_device()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    board, fault, done_dir = cfg["board"], cfg.get("fault"), cfg["done_dir"]
    job, = cfg["members"]
    name, config = job["name"], TrainConfig.from_dict(job["config"])
    resume = _load_done(done_dir, name)
    if resume is None and (checkpoint := ray.train.get_checkpoint()) is not None:
        resume = _load_checkpoint(checkpoint)[1].get(name)
    if resume is not None and resume["epoch"] > config.epochs:
        resume = None
    if resume is not None and config.finished(resume["history"]):
        if rank == 0:
            ray.get(board.finish.remote(name, {"model": resume["model"], "history": resume["history"]}))
        _save_checkpoint(None, {"members_done": 1})
        return
    model, optimizer, start, history = resumed_state(config, resume, device)
    ddp = ray.train.torch.prepare_model(model)  # DDP over gloo (CPU) or NCCL (GPU); the same parameters
    stream = job.get("stream")
    x_train = None if stream is not None else torch.as_tensor(ray.get(job["x_train"])).to(device)
    x_test = None if stream is not None else ray.get(job["x_test"])
    pacer, b, written = CheckpointPacer(), config.batch_size, 0
    n_train = len(x_train) if stream is None else stream.counts()[0]
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    for epoch in range(start + 1, config.epochs + 1):
        ddp.train()
        total = 0.0
        if stream is None:  # train_one_epoch's order and batches
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
            batches = (x_train[order[start:start + b]] for start in range(0, len(order), b))
        else:
            batches = prefetch(stream.train_batches(epoch, b, order_seed=config.seed), device)
        for batch in batches:
            total += _share_step(ddp, batch, rank, world, optimizer, config.loss, config.precision)
        sums = torch.tensor([total, *_test_sum(model, stream, x_test, config.loss, rank, world, device)],
                            dtype=torch.float64)
        dist.all_reduce(sums)
        metrics = {"epoch": epoch, "train_delta": float(sums[0]) / n_train,
                   "test_delta": float(sums[1] / sums[2]) if sums[2] else float("nan"),
                   "elapsed_s": time.perf_counter() - t0}
        history.append(metrics)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "history": history, "member": name}
        if config.finished(history):
            break
        due = torch.tensor([1.0 if rank == 0 and pacer.due() else 0.0])
        dist.broadcast(due, 0)  # every worker reports the same number of times
        if due.item():
            pacer.write(lambda: _save_checkpoint({name: state} if rank == 0 else None,
                                                 {**metrics, "member": name}))
            written = epoch
        if rank == 0:
            board.update.remote(name, {**metrics, "epochs": config.epochs})
            if fault and fault["member"] == name and epoch == fault["epoch"] and not os.path.exists(fault["marker"]):
                if written:
                    _wait_registered(fault["snapshot"], name, written)
                Path(fault["marker"]).touch()
                os._exit(1)
    if rank == 0:
        board.update.remote(name, {**metrics, "epochs": config.epochs})
        state = {**state, "model": {k: v.detach().cpu() for k, v in state["model"].items()}}
        _save_done(done_dir, name, state)
        ray.get(board.finish.remote(name, {"model": state["model"], "history": state["history"]}))
    _save_checkpoint(None, {"members_done": 1})


def _share_step(ddp, batch: torch.Tensor, rank: int, world: int, optimizer, loss: str,
                precision: str = "fp32") -> float:
    """This worker's part of one step on ``batch``: its rows ``rank·B/W ..``, its loss the sum of their δ
    times W / len(batch), so that DDP's average over workers is the gradient of the batch's mean δ, the short
    last batch included (a worker left without rows computes one with weight 0: all must run the backward).
    Returns its rows' summed δ."""
    from ..losses import per_sample_delta
    from ..training import autocast

    share = -(-len(batch) // world)
    mine = batch[rank * share:(rank + 1) * share]
    weight = world / len(batch)
    if not len(mine):
        mine, weight = batch[:1], 0.0
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, mine.device):
        recon = ddp(mine)
    d = per_sample_delta(mine, recon.float(), loss)
    (d.sum() * weight).backward()
    optimizer.step()
    return float(d.detach().sum()) if weight else 0.0


def _test_sum(model, stream, x_test, loss: str, rank: int, world: int, device) -> tuple[float, int]:
    """(summed δ, images) of this worker's share of the held-out split: every world-th row or block."""
    from ..losses import per_sample_delta

    model.eval()
    total, n = 0.0, 0
    blocks = stream.test_blocks() if stream is not None else [x_test[rank::world]]
    mine = (block for k, block in enumerate(blocks) if stream is None or k % world == rank)
    with torch.no_grad():
        for x in prefetch((block[start:start + 512] for block in mine for start in range(0, len(block), 512)),
                          device):
            total += float(per_sample_delta(x, model(x), loss).sum())
            n += len(x)
    return total, n


def _wait_registered(snapshot: str, member: str, epoch: int, timeout_s: float = 300.0) -> None:
    """(Fault injection.) Wait until the Train controller's checkpoint snapshot lists ``member`` at ``epoch``."""
    import json

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(storage.resolve(snapshot).read_text()).get("latest_checkpoint_result") or {}
            metrics = latest.get("metrics") or {}
            if metrics.get("member") == member and int(metrics.get("epoch", 0)) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    log.warning("fault injection: checkpoint of %s epoch %d not registered in %.0f s", member, epoch, timeout_s)


def _fit_run(index: int, key: str, plans: list[MemberPlan], where: Path | str, res: Resources, board,
             fault: dict | None) -> dict[str, dict]:
    """One Ray Train run over ``plans`` (checkpoints under ``where``); its finished members reach the driver
    through ``board``; returns {member: final state} of a checkpoint written by an earlier version.

    ``key`` names the run: the same group of members gets the same run (and so
    resumes from its checkpoints) however many of them finished before.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    worker_resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        worker_resources["GPU"] = res.gpus_per_worker
    # a streamed member travels as its slices (the worker reads them); the others' images through the object
    # store
    members = [{"name": p.name, "config": p.member.config, "stream": p.stream} if p.stream is not None else
               {"name": p.name, "config": p.member.config, "x_train": ray.put(p.x_train), "x_test": ray.put(p.x_test)}
               for p in plans]
    done_dir = _child(where, f"done-{key}")
    if fault:
        fault = {**fault, "snapshot": _child(_child(where, f"run{index}-{key}"), "checkpoint_manager_snapshot.json")}
    for attempt in range(res.max_failures + 1):
        trainer = TorchTrainer(
            _worker_loop if res.workers_per_member == 1 else _data_parallel_loop,
            train_loop_config={"members": members, "board": board, "fault": fault, "done_dir": done_dir,
                               "threads": max(1, round(res.cpus_per_worker)),
                               "members_per_pass": res.members_per_pass},
            scaling_config=ScalingConfig(num_workers=res.workers_per_member, use_gpu=res.gpus_per_worker > 0,
                                         resources_per_worker=worker_resources),
            run_config=RunConfig(
                name=f"run{index}-{key}",
                storage_path=str(where),
                failure_config=FailureConfig(max_failures=res.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        try:
            result = trainer.fit()
            break
        except Exception as e:
            # Ray Train retries a lost worker itself, except when its node goes while the
            # controller starts it (ControllerError from an unavailable actor): run again,
            # same name and storage, so it resumes from its last checkpoint.
            if attempt == res.max_failures or not _lost_actor(e):
                raise
            log.warning("Train run %d lost an actor (%s); running it again from its checkpoint",
                        index, last_line(e))
    if result.checkpoint is None:
        raise RuntimeError(f"Train run {index} finished without a checkpoint")
    done, _ = _load_checkpoint(result.checkpoint)
    return done


ProgressFn = Callable[[str, dict], None]


def shard(plans: list, runs: int) -> list[list]:
    """Deal members (or any units) round-robin into ``runs`` groups (stable for the same list)."""
    return [g for g in (plans[i::runs] for i in range(runs)) if g]


def train_fleet(plans: list[MemberPlan], out, *, resources: Resources = Resources(),
                storage: str | None = None, on_progress: ProgressFn | None = None,
                extra: dict | None = None, fault: dict | None = None,
                poll_s: float = 0.5) -> FleetWriter:
    """Train all pending members on the current Ray cluster, ``resources.runs`` Train runs at a time.

    Weights and the manifest land in ``out`` as each member finishes;
    checkpoints go to ``storage`` (default ``out/checkpoints``).
    ``on_progress(member, metrics)`` is called on the driver whenever a
    member reports a new epoch.
    """
    from ..storage import check_shared, resolve

    where = resolve(out)
    if not where.is_local:
        raise UserError(f"--out {where.display}: a fleet trained on Ray is written to a path every node sees "
                         f"(an NFS/EFS mount, or file:///...); object-store URIs work with --no-ray, and "
                         f"--storage s3://... takes the checkpoints")
    out = Path(where.path).resolve()
    # Across machines every node must see --out and the checkpoints; nodes on one host share its disk.
    hosts = len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    check_shared(where, hosts, flag="--out")
    if storage and "://" not in storage:
        check_shared(storage, hosts, flag="--storage")
    storage_path = Path(storage).resolve() if storage and "://" not in storage else None
    storage_uri = storage if storage and "://" in storage else None
    if storage_path is None and storage_uri is None:
        storage_path = out / "checkpoints"
    if storage_path is not None:
        storage_path.mkdir(parents=True, exist_ok=True)
    writer = FleetWriter(out, extra, order=[p.name for p in plans], flush_s=MANIFEST_FLUSH_S)
    try:
        _train_pending(writer, plans, resources, storage_path or storage_uri, on_progress, fault, poll_s)
        writer.add_cross_sketches(plans)  # the member set is final: on the driver, forward passes only
        return writer
    finally:  # however training ends (done, an error, Ctrl-C), every finished member is listed
        writer.flush()


def _train_pending(writer: FleetWriter, plans: list[MemberPlan], resources: Resources, where, on_progress,
                   fault, poll_s: float) -> FleetWriter:
    todo = writer.pending(plans)
    if not todo:
        return writer
    by_name = {p.name: p for p in todo}
    # Groups come from the whole plan, so a re-run maps members to the same runs.
    groups = []
    for whole in shard(plans, resources.concurrent_runs(len(plans))):
        key = hashlib.sha256("|".join(f"{p.name}={p.run_key}" for p in whole).encode()).hexdigest()[:12]
        if left := [p for p in whole if p.name in by_name]:
            groups.append((key, left))
    log.info("training %d member(s) in %d concurrent Ray Train run(s)", len(todo), len(groups))
    board = local_board()
    seen: dict[str, int] = {}
    errors: dict[str, BaseException] = {}

    def record(name: str, state: dict) -> None:
        if name in by_name and not writer.has(by_name[name]):
            writer.add(by_name[name], state["model"], state["history"])
            log.info("%s: done, weights written", name)

    def drain() -> None:
        updates, finished = ray.get(board.drain_all.remote())
        if on_progress is not None:  # every epoch, in the order the workers reported them
            for name, metrics in updates:
                if seen.get(name) != metrics["epoch"]:
                    seen[name] = metrics["epoch"]
                    on_progress(name, metrics)
        for name, state in finished:
            record(name, state)

    fits = [lambda i=i, key=key, g=g: _fit_run(i, key, g, where, resources, board, fault)
            for i, (key, g) in enumerate(groups)]
    try:
        for (_, g), outcome in zip(groups, run_concurrently(fits, drain, poll_s)):
            if isinstance(outcome, BaseException):  # the other runs kept going; report at the end
                for p in g:
                    if not writer.has(p):
                        errors[p.name] = outcome
                log.error("Train run failed: %s", last_line(outcome))
            else:
                for name, state in outcome.items():
                    record(name, state)
        drain()
    finally:  # on every path (done, an error, Ctrl-C): the board is the driver's, nobody else removes it
        ray.kill(board)
    if errors:
        names = ", ".join(errors)
        raise TrainingError(f"{len(errors)} member(s) failed: {names}; re-run the same command to resume "
                            f"(error: {last_line(next(iter(errors.values())))})")
    return writer


def run_concurrently(fits: list[Callable[[], Any]], poll: Callable[[], None], poll_s: float = 0.5
                     ) -> list[Any]:
    """Run blocking ``fits`` (``trainer.fit`` wrappers) in threads, calling ``poll()`` every
    ``poll_s`` while they run; each fit's result, or the exception it raised, in order."""
    with ThreadPoolExecutor(max_workers=max(1, len(fits)), thread_name_prefix="simex-fit") as pool:
        futures = [pool.submit(fit) for fit in fits]
        while not all(f.done() for f in futures):
            time.sleep(poll_s)
            poll()
    return [f.exception() or f.result() for f in futures]


class TrainingError(OperationalError):
    pass


def _lost_actor(e: BaseException) -> bool:
    """A Train run that failed because an actor became unreachable (its node was lost)."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    cause = e.controller_failure if isinstance(e, ControllerError) else e
    return isinstance(cause, RayActorError)


def build_fleet(refs: list[str], out, config: TrainConfig, *, samples: int | None = None,
                per_class: bool = False, seed: int = 0, data_dir=None, address: str | None = None,
                resources: Resources = Resources(), storage: str | None = None,
                on_progress: ProgressFn | None = None,
                log_to_driver: bool = False, strict: bool = False,
                cache: dict | None = None, stream: str = "auto") -> tuple[list[MemberPlan], FleetWriter]:
    """Specs -> trained fleet directory on Ray Train: the path the CLI, the jobs and the studies share.

    ``seed`` is the data seed (samples, splits, variants); ``config.seed`` the model seed. Training
    without Ray is :func:`simex_ray.fleet.build.build_fleet_local`, which imports no Ray. Images are
    converted to ``config.image_format`` by the rule; ``strict`` refuses instead.
    """
    from ..fleet.plan import fleet_extra, plan_fleet
    from .runtime import ray_session

    plans = plan_fleet(refs, config, samples=samples, per_class=per_class, seed=seed, data_dir=data_dir,
                       strict=strict, cache=cache, stream=stream)
    extra = fleet_extra(refs, config, samples=samples, per_class=per_class, data_seed=seed)
    with ray_session(address, log_to_driver=log_to_driver):
        return plans, train_fleet(plans, out, resources=resources, storage=storage,
                                  on_progress=on_progress, extra=extra)

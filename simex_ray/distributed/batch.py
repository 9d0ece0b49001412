"""Batch scoring on Ray Data: `simex score` and `simex matrix` with ``--address``.

The unknown data is cut into slices (:mod:`simex_ray.data.slices`: Parquet row groups and npz
blocks are read by the first shard's scorers themselves, from a path or a ``pyarrow`` URI; any other
spec is read on the driver) and streamed through Ray Data::

    slice numbers --read, score shard 1 (actor pool)--> index, image, label, delta/<member> for its members
                  --score shard 2 (actor pool)--> + delta/<member> for the shard's members
                  ...
                  --score shard S (actor pool)--> + delta/<member> for the last shard, images dropped
                  --> per batch: a partial answer (merged on the driver) [and per-sample rows -> Parquet]

Each scorer actor loads only its shard of the fleet (``members_per_shard``; default the whole fleet
in one shard) and runs the fused engine on batches of ``batch_size`` images, so memory per worker
is flat in N. The answer is :func:`~simex_ray.fleet.result.merge_results` of the batches' answers:
the same as `simex score` in one process, to float rounding (tested). ``--per-sample`` writes a
Parquet dataset (a directory of files, written in parallel) with the columns of `simex score
--per-sample`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import data, storage
from ..fleet import Fleet
from ..fleet.manifest import Member, common_format, common_loss, read_manifest
from ..fleet.result import ScoreResult, merge_results, score_result
from ..data.unknown import read_unknown
from ..formats import ImageFormat, conversion, convert, format_of
from ..errors import UserError, check_members

log = logging.getLogger(__name__)

__all__ = ["BatchSettings", "score_batch"]


@dataclass(frozen=True)
class BatchSettings:
    """How a batch run uses the cluster: ``actors`` per shard (None: the cluster's CPUs / shards /
    ``cpus_per_actor``), images per batch, slice size (None: a batch), members per shard (None: one shard).

    A slice is a task's input: one batch per slice keeps each object small. With 8,192-image slices (33 MB of
    a scorer's input and output) on the 150 MB object stores of `simex cluster up`, one scorer task ran at a
    time, most likely because Ray Data admits only as many tasks' objects as its share of the store holds."""

    actors: int | None = None  # per shard; never more than the input's batches
    cpus_per_actor: float = 1.0
    batch_size: int = 2048
    block: int | None = None
    members_per_shard: int | None = None

    def __post_init__(self):
        for k in ("batch_size", "block"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.actors is not None and self.actors < 1:
            raise UserError(f"actors must be >= 1, got {self.actors}")
        if self.members_per_shard is not None and self.members_per_shard < 1:
            raise UserError(f"members per shard must be >= 1, got {self.members_per_shard}")
        if not self.cpus_per_actor > 0:
            raise UserError(f"cpus per actor must be > 0, got {self.cpus_per_actor}")


def _read(batch: dict[str, np.ndarray], slices: list, fmt: str, strict: bool) -> dict[str, np.ndarray]:
    """Slice numbers -> image rows."""
    from ..data.slices import read_slice

    idx, xs, ys = [], [], []
    for k in batch["slice"]:
        i, x, y = read_slice(slices[int(k)], ImageFormat.parse(fmt), strict)
        idx.append(i), xs.append(x), ys.append(y)
    out = {"index": np.concatenate(idx), "image": np.concatenate(xs)}
    if all(y is not None for y in ys):
        out["label"] = np.concatenate(ys).astype(np.int64)
    return out


class _ShardScorer:
    """One shard of the fleet on an actor: adds ``delta/<member>`` and ``latent/<member>`` (the latent distance
    z; NaN without moments) columns to each batch, both from one fused pass.

    The first shard's scorers are handed slice numbers (``slices``) and read the slices themselves: a
    separate reading task started a fresh worker process for each slice on nodes whose CPUs the scorers
    held, and each spent seconds importing torch (half a CPU of a 2-CPU cluster). The last shard drops the
    images: nothing after it reads them, and they are most of a batch's bytes."""

    def __init__(self, fleet: str, names: list[str], loss: str | None, device: str, last: bool = True,
                 slices: list | None = None, fmt: str = "", strict: bool = False):
        from ..scoring import keep_freed_memory

        keep_freed_memory()  # a scoring actor: freed chunk buffers are reused (docs/results.md, "Memory")
        self.fleet = Fleet.load(fleet, names=names, device=device)
        self.names, self.loss, self.last = names, loss, last
        self.slices, self.fmt, self.strict = slices, fmt, strict

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.slices is not None:
            batch = _read(batch, self.slices, self.fmt, self.strict)
        both = self.fleet.per_sample(np.asarray(batch["image"], dtype=np.float32), self.names, self.loss)
        for k, name in enumerate(self.names):
            batch[f"delta/{name}"], batch[f"latent/{name}"] = both[k, 0], both[k, 1]
        if self.last:
            del batch["image"]
        return batch


def _delta(batch: dict[str, np.ndarray], names: list[str], column: str = "delta") -> np.ndarray:
    return np.stack([np.asarray(batch[f"{column}/{n}"], dtype=np.float64) for n in names])


class _Answer:
    """Per batch: the batch's answer (one row, JSON), from its delta columns."""

    def __init__(self, records: list[dict], loss: str, method: str):
        self.members = [Member.from_json(r) for r in records]
        self.names, self.loss, self.method = [m.name for m in self.members], loss, method

    def result(self, batch: dict[str, np.ndarray], per_sample: bool = False) -> ScoreResult:
        return score_result(_delta(batch, self.names), self.members, self.loss, self.method, per_sample,
                            latent=_delta(batch, self.names, "latent"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"part": np.array([json.dumps(self.result(batch).to_json())])}


class _Rows(_Answer):
    """Per batch: the per-sample rows of `simex score --per-sample` (image column dropped)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.result(batch, per_sample=True)
        out = {"index": batch["index"]}
        if "label" in batch:
            out["label"] = batch["label"]
        for name in self.names:
            out[f"delta/{name}"] = batch[f"delta/{name}"]
        out["nearest"] = np.asarray(r.nearest, dtype=object)
        out[f"nearest_{r.method}"] = r.nearest_score
        return out


def shards_of(names: list[str], members_per_shard: int | None) -> list[list[str]]:
    """The fleet's members in shards of at most ``members_per_shard`` (None: one shard), fleet order."""
    k = members_per_shard or len(names)
    return [names[i:i + k] for i in range(0, len(names), k)]


def score_batch(fleet_dir: str, spec: str, *, fmt: ImageFormat | None = None, strict: bool = False,
                loss: str | None = None, method: str | None = None, members: list[str] | None = None,
                per_sample: str | None = None, settings: BatchSettings = BatchSettings(), device: str = "cpu",
                split: str = "all", samples: int | None = None, seed: int = 0, data_dir=None) -> dict[str, Any]:
    """Score ``spec`` against the fleet on the current Ray cluster (inside a Ray session).

    Returns ``{"result": ScoreResult (merged), "conversion": what the rule did (None: nothing),
    "seconds": wall time, "slices": n, "shards": S, "actors": per shard, "per_sample": where the rows
    went or None}``. ``fmt``: the fleet's format
    (read from it when None); ``per_sample``: a directory path or URI for the Parquet dataset.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI prints the answer; Ray Data's bars and INFO lines are noise here
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger("ray.data").level))
    manifest = read_manifest(fleet_dir)
    records = [r for r in manifest["members"] if members is None or r["name"] in members]
    if members is not None:
        check_members(members, [r["name"] for r in manifest["members"]])
        records = sorted(records, key=lambda r: members.index(r["name"]))
    if not records:
        raise UserError(f"{fleet_dir}: no members to score")
    chosen = [Member.from_json(r) for r in records]
    fmt = fmt or common_format(chosen)
    names = [r["name"] for r in records]
    used_loss = loss or common_loss(chosen)
    t0 = time.perf_counter()
    block = settings.block or settings.batch_size
    slices = data.plan_slices(spec, block=block) if split == "all" and not samples else None
    if slices is not None:  # the first slice says what the rule will do (strict: refuse here, before the cluster)
        native = format_of(data.read_slice(slices[0])[1])
        if strict and native != fmt:
            convert(np.zeros((1, *native.shape), np.float32), fmt, strict=True, name=spec)
    else:  # any other spec: read here, in the fleet's format, and handed out in slices
        native = data.native_format(spec, seed=seed, data_dir=data_dir)
        x, y = _read_here(spec, fmt=fmt, strict=strict, split=split, samples=samples, seed=seed, data_dir=data_dir)
        slices = data.array_slices(data.parse_spec(spec).canonical, x, y, block=block)
    shards = shards_of(names, settings.members_per_shard)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    # Scorers get the CPUs but half of one, which the answer's actor needs: a pool that takes them all
    # would wait for it forever.
    # A fixed pool: one that may autoscale (min_size=1) shrank to one scorer a minute into a 100,000-image
    # run and scored the rest on it, half the CPUs idle (docs/results.md "Batch scoring"). No more scorers
    # than batches, so a small input does not load the fleet in actors that would have nothing to do.
    batches = -(-sum(s.n for s in slices) // settings.batch_size)
    actors = max(1, min(batches, settings.actors
                        or int(max(cpus - 0.5, 0.0) // (settings.cpus_per_actor * len(shards)))))
    # The slice numbers, made here (ray.data.range would read them in tasks of a whole CPU each: on nodes of
    # one CPU, with a scorer holding each, such a task is never scheduled and the pipeline waits forever).
    ds = ray.data.from_items([{"slice": i} for i in range(len(slices))], override_num_blocks=len(slices))
    fleet = storage.normalize(fleet_dir)
    # enable_true_multi_threading: the scorer runs on the actor's main thread (Ray Data's default is a helper).
    for i, shard in enumerate(shards):
        first = {"slices": slices, "fmt": str(fmt), "strict": strict} if i == 0 else {}
        ds = ds.map_batches(_ShardScorer, fn_constructor_kwargs={"fleet": fleet, "names": shard, "loss": loss,
                                                                 "device": device, "last": i == len(shards) - 1,
                                                                 **first},
                            batch_size=1 if i == 0 else settings.batch_size, compute=ray.data.ActorPoolStrategy(
                                size=actors, enable_true_multi_threading=True),
                            num_cpus=settings.cpus_per_actor, batch_format="numpy", udf_modifying_row_count=i == 0)
    kw = {"records": records, "loss": used_loss, "method": method}
    one = ray.data.ActorPoolStrategy(size=1)
    written = None
    if per_sample:
        ds = ds.materialize()
        ds.map_batches(_Rows, fn_constructor_kwargs=kw, batch_format="numpy", compute=one,
                       batch_size=settings.batch_size, num_cpus=0.25).write_parquet(storage.normalize(per_sample))
        written = per_sample
    parts = ds.map_batches(_Answer, fn_constructor_kwargs=kw, batch_format="numpy", compute=one,
                           batch_size=settings.batch_size, num_cpus=0.25).take_all()
    result = merge_results(ScoreResult.from_json(json.loads(p["part"])) for p in parts)
    return {"result": result, "conversion": conversion(native, fmt), "seconds": time.perf_counter() - t0, "slices": len(slices), "shards": len(shards),
            "actors": actors, "per_sample": written}


def _read_here(spec: str, *, fmt, strict, split, samples, seed, data_dir):
    """A spec that cannot be sliced in place, read on the driver: the rule of `simex score`."""
    return read_unknown(spec, split=split, samples=samples, seed=seed, data_dir=data_dir, stream=False, fmt=fmt,
                        strict=strict)

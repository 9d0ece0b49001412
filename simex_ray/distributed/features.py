"""Classifier outputs on Ray Data: `simex select --address` (or ``--features ray``).

The same records as :func:`~simex_ray.transfer.features.compute_outputs` in one process (equal to float
rounding: only the batches differ), computed by an actor pool and kept in the same
:class:`~simex_ray.transfer.features.FeatureCache`. The data is cut into slices as for batch scoring
(:mod:`simex_ray.data.slices`: Parquet row groups and npz blocks are read by the workers themselves, any
other spec is read on the driver and handed out in slices)::

    [cache has entries of these weights]  slice numbers --hash (tasks of 1/4 CPU)--> index, digest per
                   image [, label] -> the data fingerprint -> which classifiers the cache already has
    [any missing]  slice numbers --read, hash, every missing classifier (actor pool)--> index, digest,
                   features/<name>, probabilities/<name>[, logits/<name>] [, label]

Each actor loads the missing classifiers once; it takes one GPU where the cluster has GPUs (the forward
passes then run there) and ``cpus_per_actor`` CPUs otherwise. The driver holds only the (N, D) outputs
(and 32 bytes of digest per image), never the images of a sliced spec: its memory is flat in the images'
size. The second pass's digests must equal the first's (the data did not change while it was read).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import data, storage
from ..choices import FEATURE_BLOCK
from ..data.unknown import read_unknown
from ..errors import UserError
from ..formats import ImageFormat
from ..transfer.features import (ClassifierOutputs, FeatureCache, check_layer, compute_outputs, data_fingerprint,
                                 layer_name, module_of, row_digests)
from ..transfer.library import Library

log = logging.getLogger(__name__)

__all__ = ["FeatureRun", "FeatureSettings", "extract_outputs"]

OUTPUTS = ("features", "probabilities", "logits")


@dataclass(frozen=True)
class FeatureSettings:
    """``actors`` in the pool (None: one per GPU, else the cluster's CPUs / ``cpus_per_actor``; never more
    than slices), images per ``block`` (a slice: one actor's input) and per forward ``batch_size``."""

    actors: int | None = None
    cpus_per_actor: float = 1.0
    block: int = FEATURE_BLOCK
    batch_size: int = 512

    def __post_init__(self):
        for k in ("block", "batch_size"):
            if getattr(self, k) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.actors is not None and self.actors < 1:
            raise UserError(f"actors must be >= 1, got {self.actors}")
        if not self.cpus_per_actor > 0:
            raise UserError(f"cpus per actor must be > 0, got {self.cpus_per_actor}")


@dataclass
class FeatureRun:
    """What :func:`extract_outputs` found: ``outputs`` per classifier, the data's ``labels`` (None: unlabelled),
    its ``n`` images and ``fingerprint``, and per classifier ``report`` (cached, seconds, images/s)."""

    outputs: dict[str, ClassifierOutputs]
    labels: np.ndarray | None
    n: int
    fingerprint: str
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    actors: int = 0
    where: str = "ray"

    def __call__(self, name: str) -> ClassifierOutputs:
        return self.outputs[name]


def _read(sl, fmt: str):
    from ..data.slices import read_slice

    return read_slice(sl, ImageFormat.parse(fmt))


def _rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "label"}
    if all("label" in p for p in parts):
        out["label"] = np.concatenate([p["label"] for p in parts]).astype(np.int64)
    return out


def _hash_slices(batch: dict[str, np.ndarray], slices: list, fmt: str) -> dict[str, np.ndarray]:
    """Slice numbers -> index, digest (one sha256 per image) [, label]."""
    parts = []
    for k in batch["slice"]:
        index, x, y = _read(slices[int(k)], fmt)
        part = {"index": index, "digest": row_digests(x)}
        if y is not None:
            part["label"] = np.asarray(y)
        parts.append(part)
    return _rows(parts)


class _Extractor:
    """Every missing classifier on one actor, loaded once: slice numbers -> digests and outputs per image."""

    def __init__(self, library: str, names: list[str], layer: str, slices: list, fmt: str, batch_size: int):
        import ray

        self.library = Library.load(library, device="cuda" if ray.get_gpu_ids() else "cpu").select(names)
        self.names, self.slices, self.fmt, self.batch_size = names, slices, fmt, batch_size
        self.layer = module_of(layer)
        for n in names:
            self.library.model(n)  # weights checked and loaded here, once per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for k in batch["slice"]:
            index, x, y = _read(self.slices[int(k)], self.fmt)
            part = {"index": index, "digest": row_digests(x)}
            if y is not None:
                part["label"] = np.asarray(y)
            for name in self.names:
                rec = compute_outputs(self.library, name, x, layer=self.layer, batch_size=self.batch_size)
                for what, a in rec.arrays().items():
                    part[f"{what}/{name}"] = a
            parts.append(part)
        return _rows(parts)


def _collect(ds, n: int) -> dict[str, np.ndarray]:
    """The dataset's rows, put in index order (only outputs and digests: small per image)."""
    out: dict[str, np.ndarray] = {}
    seen = np.zeros(n, dtype=bool)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        idx = np.asarray(batch["index"], dtype=np.int64)
        for k, v in batch.items():
            if k == "index":
                continue
            v = np.asarray(v)
            if k not in out:
                out[k] = np.empty((n, *v.shape[1:]), dtype=v.dtype)
            out[k][idx] = v
        seen[idx] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {n} rows did not come back from the pipeline")
    return out


def extract_outputs(library: str, spec: str, names: list[str] | None = None, *, fmt: ImageFormat,
                    layer: str | None = None, cache: FeatureCache | None = None,
                    settings: FeatureSettings = FeatureSettings(), split: str = "all", samples: int | None = None,
                    seed: int = 0, data_dir=None,
                    on_progress: Callable[[str, dict[str, Any]], None] | None = None) -> FeatureRun:
    """Classifiers ``names`` (default: all) of the library at ``library`` (path or URI, readable by every
    node) on ``spec`` (split, samples and conversion to ``fmt`` as `simex select` reads it), through
    ``cache``, on the current Ray cluster (inside a Ray session)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger("ray.data").level))
    lib = Library.load(library)
    names = list(names) if names is not None else lib.names
    layer = layer_name(layer)
    for name in names:  # here, in one line, not as an actor's traceback
        check_layer(lib, name, layer)
    chosen = module_of(layer)
    keys = {name: lib.feature_layer(name, chosen) for name in names}  # where each one's features come from
    t0 = time.perf_counter()
    slices = data.plan_slices(spec, block=settings.block) if split == "all" and not samples else None
    here = None
    if slices is None:  # any other spec: read here, in the classifiers' format, and handed out in slices
        x, y = read_unknown(spec, split=split, samples=samples, seed=seed, data_dir=data_dir, stream=False, fmt=fmt)
        slices = data.array_slices(data.parse_spec(spec).canonical, x, y, block=settings.block)
        here = {"digest": row_digests(x)}
        if y is not None:
            here["label"] = np.asarray(y, dtype=np.int64)
        del x
    n = sum(sl.n for sl in slices)
    ds_slices = ray.data.from_items([{"slice": i} for i in range(len(slices))], override_num_blocks=len(slices))
    first = here
    may_hit = cache is not None and any(cache.may_have(lib.classifiers[c].sha256) for c in names)
    if may_hit and first is None:
        first = _collect(ds_slices.map_batches(_hash_slices, fn_kwargs={"slices": slices, "fmt": str(fmt)},
                                               batch_size=1, num_cpus=0.25, batch_format="numpy"), n)
    fingerprint = data_fingerprint(first["digest"], fmt.shape) if first is not None else None
    outputs: dict[str, ClassifierOutputs] = {}
    report: dict[str, dict[str, Any]] = {}
    if may_hit:
        for name in names:
            t1 = time.perf_counter()
            got = cache.get(lib.classifiers[name].sha256, fingerprint, keys[name], n)
            if got is not None:
                outputs[name] = got
                report[name] = {"cached": True, "seconds": time.perf_counter() - t1, "images_per_s": None}
                if on_progress is not None:
                    on_progress(name, report[name])
    missing = [c for c in names if c not in outputs]
    actors = 0
    labels = first.get("label") if first is not None else None
    if missing:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actors = max(1, min(len(slices), settings.actors or (int(gpus) if gpus >= 1
                                                              else int(cpus // settings.cpus_per_actor))))
        res = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": settings.cpus_per_actor}
        t1 = time.perf_counter()
        ds = ds_slices.map_batches(
            _Extractor, fn_constructor_kwargs={"library": storage.normalize(library), "names": missing,
                                               "layer": layer, "slices": slices, "fmt": str(fmt),
                                               "batch_size": settings.batch_size},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors, enable_true_multi_threading=True),
            batch_format="numpy", udf_modifying_row_count=True, **res)
        rows = _collect(ds, n)
        seconds = time.perf_counter() - t1
        if first is None:
            first = {"digest": rows["digest"]}
            fingerprint = data_fingerprint(first["digest"], fmt.shape)
            labels = rows.get("label")
        elif not np.array_equal(rows["digest"], first["digest"]):
            raise UserError(f"{spec} changed while it was read (its images differ between two reads); run again "
                            f"once it is still")
        for name in missing:
            rec = ClassifierOutputs(*(rows.get(f"{what}/{name}") for what in OUTPUTS), layer=keys[name])
            outputs[name] = rec
            if cache is not None and lib.classifiers[name].sha256:
                cache.put(lib.classifiers[name].sha256, fingerprint, rec)
            report[name] = {"cached": False, "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
                            "pass_classifiers": len(missing)}
            if on_progress is not None:
                on_progress(name, report[name])
    log.info("outputs of %d classifier(s) on %d images in %.1fs (%d computed by %d actor(s))", len(names), n,
             time.perf_counter() - t0, len(missing), actors)
    return FeatureRun({c: outputs[c] for c in names}, labels, n, fingerprint, {c: report[c] for c in names}, actors)


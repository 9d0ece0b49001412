"""Sampling, splits and fingerprints: class-balanced samples, the 5:1 splits, per-class splits.

Two 5:1 train/test rules, each recorded in the manifest of a fleet trained with it (``split``):

* ``row-hash`` (a whole dataset, no ``--samples``): row ``i`` is held out when a seeded hash of ``i`` falls
  in the lowest sixth (:func:`test_rows`). Each row's side is computable alone, so a reference streamed slice
  by slice on a worker and the same reference read whole here split identically;
* ``stratified`` (a ``--samples`` draw, and every per-class part): an exact 5:1 split, each class spread
  evenly (:func:`train_test_split`). Whole datasets used it too before 2026-12-07.

Fleet manifests record :func:`fingerprint` of each member's training split, so
every function here is seeded and must stay bit-for-bit stable.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from ..formats import LEGACY, ImageFormat
from .dataset import Dataset, SpecError, classes_of
from .loading import load
from .spec import with_class

log = logging.getLogger("simex_ray.data")


def balanced_indices(ds: Dataset, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of :func:`balanced_sample` (all rows when ``n >= len(ds)``)."""
    n = int(n)
    if n <= 0:
        raise SpecError(f"sample size must be a positive integer, got {n}")
    if n >= len(ds):
        if n > len(ds):
            log.warning("%s: asked for %d samples but only %d exist; using all", ds.spec, n, len(ds))
        return np.arange(len(ds))
    rng = np.random.default_rng(int(seed))
    if ds.y is None:
        return np.sort(rng.choice(len(ds), size=n, replace=False))
    labels, inv, counts = np.unique(ds.y, return_inverse=True, return_counts=True)
    alloc = np.zeros(len(labels), dtype=np.int64)
    remaining = n
    while remaining > 0:  # water-filling: equal shares, small classes give their surplus away
        active = np.nonzero(alloc < counts)[0]
        share = remaining // len(active)
        if share == 0:
            alloc[rng.choice(active, size=remaining, replace=False)] += 1
            break
        add = np.minimum(share, counts[active] - alloc[active])
        alloc[active] += add
        remaining -= int(add.sum())
    idx = [rng.choice(np.nonzero(inv == k)[0], size=int(a), replace=False) for k, a in enumerate(alloc) if a]
    return np.sort(np.concatenate(idx))


def balanced_sample(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` rows, as class-balanced as the labels allow (unlabelled: uniform), seeded; order kept."""
    idx = balanced_indices(ds, n, seed)
    return ds if len(idx) == len(ds) else ds.subset(idx)


ROW_HASH, STRATIFIED = "row-hash", "stratified"
TEST_FRACTION = 1 / 6  # the paper's 5:1


def row_uniform(index: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per global row index, seeded: splitmix64 of (index, seed), stable forever."""
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64(int(seed) & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def row_extremes(n: int, seed: int = 0) -> tuple[int, int]:
    """The rows with the smallest and largest :func:`row_uniform` of ``0 .. n-1``: held out and trained on
    whatever their value (so that neither side is empty)."""
    lo = hi = 0
    u_lo, u_hi = np.inf, -np.inf
    for start in range(0, n, _CHUNK):  # in chunks: memory flat however many rows
        u = row_uniform(np.arange(start, min(n, start + _CHUNK)), seed)
        i, j = int(np.argmin(u)), int(np.argmax(u))
        if u[i] < u_lo:
            lo, u_lo = start + i, u[i]
        if u[j] > u_hi:
            hi, u_hi = start + j, u[j]
    return lo, hi


_CHUNK = 1 << 20


def test_rows(n: int, seed: int = 0, index: np.ndarray | None = None,
              extremes: tuple[int, int] | None = None) -> np.ndarray:
    """The ``row-hash`` rule: which of rows ``0 .. n-1`` (or of ``index``, a part of them) are held out.

    A row is held out when :func:`row_uniform` of its index is below 1/6. So that neither side is ever
    empty, the row with the smallest value is always held out and the one with the largest always trains
    (``n`` rows in all, ``n >= 2``; ``extremes``: :func:`row_extremes` computed once): on a dataset of
    thousands of rows neither changes anything.
    """
    if n < 2:
        raise SpecError(f"need at least 2 images to split into train and test, got {n}")
    lo, hi = extremes if extremes is not None else row_extremes(n, seed)
    index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
    out = row_uniform(index, seed) < TEST_FRACTION
    out[index == lo] = True
    out[index == hi] = False
    return out


def row_hash_split(ds: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) of a whole dataset by the ``row-hash`` rule; both in row order."""
    test = test_rows(len(ds), seed)
    return ds.subset(np.nonzero(~test)[0]), ds.subset(np.nonzero(test)[0])


def split_rule(samples: int | None) -> str:
    """The 5:1 rule :func:`prepare` applies: ``row-hash`` for a whole dataset, ``stratified`` for a sample."""
    return STRATIFIED if samples else ROW_HASH


def train_test_split(ds: Dataset, test_fraction: float = 1 / 6, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Disjoint (train, test), stratified when labelled; default 5:1 as in the paper."""
    if not 0.0 < test_fraction < 1.0:
        raise SpecError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(ds)
    if n < 2:
        raise SpecError(f"{ds.spec}: need at least 2 images to split into train and test, got {n}")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    rng = np.random.default_rng(int(seed))
    if ds.y is None:
        order = rng.permutation(n)
    else:
        # Spread each class evenly over [0, 1) in random order; taking the n_test
        # smallest keys gives an exact total with per-class counts within +-1.
        perm = rng.permutation(n)
        key = np.empty(n, dtype=np.float64)
        for lab in np.unique(ds.y):
            members = perm[ds.y[perm] == lab]
            key[members] = (np.arange(len(members)) + rng.random()) / len(members)
        order = np.lexsort((rng.random(n), key))
    test = np.sort(order[:n_test])
    train = np.sort(order[n_test:])
    return ds.subset(train), ds.subset(test)


def prepare(
    spec: str,
    *,
    samples: int | None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    test_samples: int | None = None,
    cache: dict | None = None,
    fmt: ImageFormat | None = LEGACY,
    strict: bool = False,
) -> tuple[Dataset, Dataset]:
    """load -> balanced_sample(samples) if given -> 5:1 (train, test); ``fmt``, ``strict``: see load.

    A whole dataset (no ``samples``) splits by the ``row-hash`` rule, a sample by the ``stratified`` one
    (:func:`split_rule`).

    ``test_samples`` tops the test split up to that many images with a
    class-balanced draw from the rows that ``samples`` left out (never from
    the training split), for evaluations that need less noise than a sixth of
    a small sample gives. The train split is the same with or without it.
    """
    ds = load(spec, data_dir=data_dir, seed=seed, cache=cache, fmt=fmt, strict=strict)
    if not samples:
        if len(ds) < 2:
            raise SpecError(f"{ds.spec}: need at least 2 images to split into train and test, got {len(ds)}")
        idx = np.arange(len(ds))
        train, test = row_hash_split(ds, seed)
    else:
        idx = balanced_indices(ds, samples, seed=seed)
        train, test = train_test_split(ds if len(idx) == len(ds) else ds.subset(idx), TEST_FRACTION, seed=seed)
    if test_samples is not None and test_samples > len(test):
        rest = np.setdiff1d(np.arange(len(ds)), idx, assume_unique=True)
        if len(rest) == 0:
            log.warning("%s: no images left outside the %d sampled for a larger test split; "
                        "testing on %d", ds.spec, len(idx), len(test))
        else:
            extra = balanced_sample(ds.subset(rest), test_samples - len(test), seed=seed + 1)
            test = Dataset(np.concatenate([test.x, extra.x]),
                           None if test.y is None else np.concatenate([test.y, extra.y]),
                           test.spec, test.classes)
    return train, test


@dataclass(frozen=True)
class ClassPart:
    """One class of a labelled dataset, split 5:1 the way a per-class fleet member is trained."""

    label: int  # the label value in the parent dataset
    name: str  # its selector value: the class name, else str(label)
    spec: str  # the parent spec with '#name'
    train: Dataset
    test: Dataset


def split_by_class(ds: Dataset, *, samples: int | None = None, seed: int = 0) -> list[ClassPart]:
    """Every class of ``ds``, each sampled (``samples`` per class) and split 5:1; label order.

    The one per-class split: ``simex train --per-class`` trains member
    ``SPEC#c`` on ``parts[c].train`` and keeps ``parts[c].test`` held out, and
    the per-class studies evaluate on the same held-out images. It equals
    ``prepare(SPEC#c, samples=samples, seed=seed)`` class by class, with the
    dataset read and derived once instead of once per class.
    """
    if ds.y is None:
        raise SpecError(f"{ds.spec}: has no labels, so it has no classes; per-class work needs a labelled dataset")
    parts = []
    for label, name in zip(np.unique(ds.y).tolist(), classes_of(ds)):  # both in label order
        spec = with_class(ds.spec, name)
        part = ds.subset(np.nonzero(ds.y == label)[0], spec=spec)
        if samples:
            part = balanced_sample(part, samples, seed=seed)
        if len(part) < 2:
            raise SpecError(f"{spec}: class '{name}' has {len(part)} image(s); each class needs at least 2 "
                            f"(one to train on, one held out)")
        train, test = train_test_split(part, seed=seed)
        parts.append(ClassPart(int(label), name, spec, train, test))
    return parts


def prepare_by_class(spec: str, *, samples: int | None = None, seed: int = 0,
                     data_dir: str | os.PathLike | None = None, cache: dict | None = None,
                     fmt: ImageFormat | None = LEGACY, strict: bool = False) -> list[ClassPart]:
    """load(spec) once -> :func:`split_by_class` (``fmt``, ``strict``: see :func:`load`)."""
    ds = load(spec, data_dir=data_dir, seed=seed, cache=cache, fmt=fmt, strict=strict)
    return split_by_class(ds, samples=samples, seed=seed)


def fingerprint(ds: Dataset) -> str:
    """sha256 hex over shape, x bytes (float32) and y bytes; stable across runs."""
    h = hashlib.sha256()
    x = np.ascontiguousarray(ds.x, dtype=np.float32)
    h.update(f"x{x.shape}".encode())
    h.update(x.tobytes())
    if ds.y is None:
        h.update(b"y:none")
    else:
        y = np.ascontiguousarray(ds.y, dtype=np.int64)
        h.update(f"y{y.shape}".encode())
        h.update(y.tobytes())
    return h.hexdigest()

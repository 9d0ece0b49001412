"""A whole reference read slice by slice where it trains, never whole (Ray-free).

:class:`StreamedReference` is planned on the driver from metadata alone (:func:`~simex_ray.data.slices.plan_slices`:
Parquet row groups, blocks of an uncompressed npz, on a path or a URI) and is small and picklable; a Train
worker reads the slices itself. Its train/test split is the ``row-hash`` rule (each row's side from its global
index), so it is the split of the same reference read whole by :func:`~simex_ray.data.prepare`.

Training batches come in a seeded order per epoch: the slices in a random order, then the training rows of
about ``buffer`` images at a time shuffled together (a bounded shuffle buffer, as Ray Data and tf.data do);
memory is that buffer, whatever the reference's size. The order depends only on (seed, epoch), so a run
resumed after an epoch follows the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .. import storage
from ..formats import ImageFormat
from .sampling import ROW_HASH, row_extremes, test_rows
from .slices import Slice, plan_slices, read_slice

BUFFER_IMAGES = 16_384  # the shuffle buffer: training images held at once, besides one slice being read
BLOCK = 8192  # images per slice of an npz (a Parquet slice is one row group)


@dataclass(frozen=True)
class StreamedReference:
    """A reference's slices, its format and its split: what a worker needs to read its own reference."""

    spec: str
    fmt: ImageFormat
    seed: int  # the data seed: the split
    slices: tuple[Slice, ...]
    strict: bool = False

    @classmethod
    def plan(cls, spec: str, fmt: ImageFormat, *, seed: int = 0, strict: bool = False,
             block: int = BLOCK) -> "StreamedReference | None":
        """The streamed form of ``spec`` (a ``parquet:`` or uncompressed ``npz:`` file or URI, whole), or None
        when it cannot be read in slices (read it whole with :func:`~simex_ray.data.prepare`)."""
        slices = plan_slices(spec, block=block)
        return None if slices is None else cls(spec, ImageFormat.parse(fmt), int(seed), tuple(slices), strict)

    @property
    def rows(self) -> int:
        return sum(sl.n for sl in self.slices)

    def counts(self) -> tuple[int, int]:
        """(training images, held-out images), from the row indices alone (no image is read)."""
        n, extremes = self.rows, row_extremes(self.rows, self.seed)
        test = sum(int(test_rows(n, self.seed, np.arange(s, min(n, s + BLOCK * 64)), extremes).sum())
                   for s in range(0, n, BLOCK * 64))
        return n - test, test

    def fingerprint(self) -> str:
        """sha256 of what identifies the training split without reading it: the spec, the split rule and seed,
        the format, and each file's size and modification time and each slice's rows. Honest about what it
        is: a rewrite that keeps a file's size and time is not seen (a content hash would read every image)."""
        files = {}
        for sl in self.slices:
            if sl.source and sl.source not in files:
                info = storage.resolve(sl.source).info()
                files[sl.source] = [info.size, info.mtime_ns if info.mtime_ns is not None else None]
        blob = {"kind": "streamed-v1", "spec": self.spec, "split": ROW_HASH, "seed": self.seed,
                "format": str(self.fmt), "strict": self.strict, "files": files,
                "slices": [[sl.kind, sl.source, sl.part, sl.start, sl.n] for sl in self.slices]}
        return "stream:" + hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def _rows(self, sl: Slice, test: bool, extremes: tuple[int, int]) -> np.ndarray:
        """One slice's training (or held-out) images, float32 in the reference's format."""
        index, x, _ = read_slice(sl, self.fmt, self.strict)
        keep = test_rows(self.rows, self.seed, index, extremes)
        return x[keep if test else ~keep]

    def train_batches(self, epoch: int, batch_size: int, order_seed: int,
                      buffer: int = BUFFER_IMAGES) -> Iterator[np.ndarray]:
        """The training split in batches (B, C, H, W), in the seeded order of (``order_seed``, ``epoch``)."""
        rng = np.random.default_rng([int(order_seed), int(epoch)])
        extremes = row_extremes(self.rows, self.seed)
        held: list[np.ndarray] = []
        size = 0

        def flush(final: bool):
            nonlocal held, size
            x = np.concatenate(held) if len(held) > 1 else held[0]
            x = x[rng.permutation(len(x))]
            cut = len(x) if final else len(x) - len(x) % batch_size
            for start in range(0, cut, batch_size):
                yield x[start:start + batch_size]
            held, size = ([x[cut:]] if cut < len(x) else []), len(x) - cut

        for i in rng.permutation(len(self.slices)):
            x = self._rows(self.slices[i], False, extremes)
            if len(x):
                held.append(x)
                size += len(x)
            if size >= buffer:
                yield from flush(False)
        if size:
            yield from flush(True)

    def test_blocks(self) -> Iterator[np.ndarray]:
        """The held-out split, slice by slice, in row order."""
        extremes = row_extremes(self.rows, self.seed)
        for sl in self.slices:
            x = self._rows(sl, True, extremes)
            if len(x):
                yield x

"""A dataset cut into slices that can be read on their own, anywhere: the unit of distributed batch scoring.

:func:`plan_slices` looks at a spec once, on the driver, and returns :class:`Slice` records (small,
picklable); :func:`read_slice` reads one of them, on any worker, to ``(index, images, labels)``
with ``index`` the images' global row numbers, so results come back in a known order however the
slices were spread. Two specs are sliced without reading their images on the driver:

* ``parquet:PATH`` where PATH is a file, a directory of ``*.parquet`` files, or a ``pyarrow``
  filesystem URI of either (``s3://``, ``gs://``, ``file://``): one slice per row group;
* ``npz:PATH`` with an uncompressed ``x`` (``np.savez``) or a bare ``.npy``, PATH a local file or a
  URI: one slice per ``block`` images, read by seeking into the file (ranged reads on an object store).

Every other spec is read whole on the driver by :func:`~simex_ray.data.load` and cut into slices of
arrays (:func:`array_slices`). Ray-free.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import storage
from ..formats import ImageFormat
from .dataset import Dataset, SpecError
from .images import stack_images, to_unit_images
from .spec import parse_spec
from .streaming import open_source, read_array, stream
from ..errors import UserError

__all__ = ["Slice", "array_slices", "load_slices", "plan_slices", "read_slice"]


@dataclass(frozen=True)
class Slice:
    """Rows ``start .. start + n`` of a dataset, and how to read them.

    ``kind``: ``parquet`` (``source`` a file path or URI, ``part`` its row group), ``npy`` (``source``
    a file path or URI, ``part`` the byte offset of the first image; ``meta`` dtype and image shape) or
    ``array`` (``payload``: the images and labels themselves).
    """

    kind: str
    spec: str
    start: int
    n: int
    source: str = ""
    part: int = 0
    meta: tuple = ()
    payload: Any = None
    labels: Any = None  # the slice's labels when the planner knows them (npz)


def plan_slices(spec: str, *, block: int = 8192) -> list[Slice] | None:
    """The slices of a ``parquet:`` or uncompressed ``npz:`` spec (no images read), or None for any other
    spec (read it with :func:`~simex_ray.data.load` and :func:`array_slices`)."""
    p = parse_spec(spec)
    if p.kind != "file" or p.cls is not None or p.arg is None:
        return None
    if p.name == "parquet":
        return _parquet_slices(p.arg, p.canonical)
    if p.name == "npz":
        s = stream(p.canonical)
        if s is None:
            return None
        out = []
        per = int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize
        for start in range(0, len(s), block):
            n = min(block, len(s) - start)
            out.append(Slice("npy", s.spec, start, n, s.source, s.offset + start * per,
                             (s.dtype.str, tuple(s.shape[1:])), labels=None if s.y is None else s.y[start:start + n]))
        return out
    return None


def array_slices(spec: str, x: np.ndarray, y: np.ndarray | None, *, block: int = 8192) -> list[Slice]:
    """Images already read (and in the fleet's format), cut into slices that carry them."""
    return [Slice("array", spec, s, min(block, len(x) - s), payload=x[s:s + block],
                  labels=None if y is None else y[s:s + block]) for s in range(0, len(x), block)]


def read_slice(sl: Slice, fmt: ImageFormat | None = None, strict: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(index (n,), images (n, C, H, W) float32 in ``fmt`` (None: native), labels or None) of one slice."""
    index = np.arange(sl.start, sl.start + sl.n, dtype=np.int64)
    if sl.kind == "array":
        return index, np.asarray(sl.payload, dtype=np.float32), sl.labels
    if sl.kind == "npy":
        dtype, shape = np.dtype(sl.meta[0]), tuple(sl.meta[1])
        count = sl.n * int(np.prod(shape, dtype=np.int64))
        with open_source(sl.source) as f:
            f.seek(sl.part)
            raw = read_array(f, dtype, count)
        if raw.size != count:
            raise SpecError(f"{sl.spec}: file ends inside images {sl.start}..{sl.start + sl.n}; the file is truncated")
        x = to_unit_images(raw.reshape((sl.n, *shape)), name=f"{sl.spec} images {sl.start}..", fmt=fmt, strict=strict)
        return index, x, sl.labels
    if sl.kind == "parquet":
        import pyarrow.parquet as pq

        from .sources.parquet_rows import table_images

        loc = storage.resolve(sl.source)
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.ParquetFile(f).read_row_group(sl.part)
        base = pathlib.Path(loc.path).parent if loc.is_local else None
        x, y = table_images(table, sl.spec, base=base, first_row=sl.start, fmt=fmt, strict=strict)
        if len(x) != sl.n:
            raise SpecError(f"{sl.spec}: row group {sl.part} of {loc} changed while it was read; read it again")
        return index, x, y
    raise UserError(f"unknown slice kind '{sl.kind}'")


def load_slices(slices: list[Slice], spec: str) -> Dataset:
    """All of ``slices`` read here, in order, as one dataset (native format; mixed sizes: the most common)."""
    parts = [read_slice(sl) for sl in slices]
    xs = [x for _, x, _ in parts]
    x = stack_images(xs, spec) if len({a.shape[1:] for a in xs}) > 1 else np.concatenate(xs)
    ys = [y for _, _, y in parts]
    return Dataset(x, None if any(y is None for y in ys) else np.concatenate(ys), spec)


def _parquet_slices(arg: str, spec: str) -> list[Slice]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    loc = storage.resolve(arg if storage.is_uri(arg) else str(pathlib.Path(arg).expanduser()))
    info = loc.info()
    if info.type == pafs.FileType.NotFound:
        raise SpecError(f"{spec}: '{loc}' does not exist; check the path or URI")
    if info.type == pafs.FileType.Directory:
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        files = sorted(i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not pathlib.PurePosixPath(i.path).name.startswith((".", "_")))
        if not files:
            raise SpecError(f"{spec}: no *.parquet files under '{loc}'")
    else:
        files = [loc.path]
    out, start = [], 0
    for path in files:
        source = path if loc.is_local else _uri_of(arg, loc, path)
        try:
            with loc.fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise SpecError(f"{spec}: cannot read parquet '{path}' ({type(e).__name__}: {e})") from None
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                out.append(Slice("parquet", spec, start, n, source, g))
                start += n
    if not out:
        raise SpecError(f"{spec}: parquet has no rows")
    return out


def _uri_of(arg: str, loc: storage.Location, path: str) -> str:
    """The URI of ``path`` on the filesystem of URI ``arg`` (its scheme and query kept)."""
    scheme, _, rest = arg.partition("://")
    query = ("?" + rest.partition("?")[2]) if "?" in rest else ""
    return f"{scheme}://{path}{query}"


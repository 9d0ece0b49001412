"""The streamed reader: an uncompressed ``npz:`` (or ``.npy``) read block by block, never whole, from a
local path or a ``pyarrow`` filesystem URI (``s3://``, ``gs://``, ``file://``: ranged reads)."""

from __future__ import annotations

import io
import logging
import pathlib
import zipfile
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..formats import LEGACY, ImageFormat, format_of
from . import safe_io
from .dataset import SpecError, need_path
from .images import check_labels, to_unit_images
from .spec import parse_spec

log = logging.getLogger("simex_ray.data")


@dataclass
class Stream:
    """Images of a file read block by block, never whole: ``len``, labels ``y`` and :meth:`blocks`.

    Each block goes through :func:`to_unit_images`, which works image by image,
    so the blocks concatenated equal ``load(spec).x``.
    """

    spec: str
    source: str  # a local path or a URI
    offset: int  # byte offset of the first image in the file
    dtype: np.dtype
    shape: tuple[int, ...]  # of the stored array, (N, ...)
    y: np.ndarray | None

    def __len__(self) -> int:
        return int(self.shape[0])

    def blocks(self, size: int = 8192, fmt: ImageFormat | None = LEGACY, strict: bool = False):
        """float32 (n, C, H, W) blocks in [0, 1] in ``fmt`` (see :func:`~simex_ray.data.load`), in file order."""
        per = int(np.prod(self.shape[1:], dtype=np.int64))
        with open_source(self.source) as f:
            f.seek(self.offset)
            for start in range(0, len(self), size):
                n = min(size, len(self) - start)
                raw = read_array(f, self.dtype, n * per)
                if raw.size != n * per:
                    raise SpecError(f"{self.spec}: file ends after {start + raw.size // max(per, 1)} of "
                                    f"{len(self)} images; the file is truncated")
                yield to_unit_images(raw.reshape((n, *self.shape[1:])), name=f"{self.spec} images {start}..",
                                     fmt=fmt, strict=strict)

    def native_format(self) -> ImageFormat:
        """The stored images' format (read from the first image only)."""
        return format_of(next(self.blocks(1, fmt=None)))


def open_source(source: str):
    """A seekable binary file of a local path or a URI (a ranged-read file on an object store)."""
    if storage.is_uri(source):
        loc = storage.resolve(source)
        return loc.fs.open_input_file(loc.path)
    return open(source, "rb")


def read_array(f, dtype: np.dtype, count: int) -> np.ndarray:
    """Up to ``count`` items of ``dtype`` from the file's position (fewer at its end)."""
    if isinstance(f, io.BufferedReader):
        return np.fromfile(f, dtype=dtype, count=count)
    buf = f.read(count * dtype.itemsize)
    return np.frombuffer(buf, dtype=dtype, count=len(buf) // dtype.itemsize)


def stream(spec: str) -> Stream | None:
    """A :class:`Stream` of ``npz:PATH`` whose ``x`` is stored uncompressed (``np.savez``, not
    ``savez_compressed``), or of an ``.npy`` file given as ``npz:``; PATH a local path or a URI.
    ``None`` when the spec has a variant, a class selector, another format, or a compressed or
    Fortran-ordered ``x`` (then use :func:`load`).
    """
    p = parse_spec(spec)
    if p.kind != "file" or p.name != "npz" or p.cls is not None or p.arg is None:
        return None
    if storage.is_uri(p.arg):
        source = p.arg
        loc = storage.resolve(source)
        if not loc.is_file():
            raise SpecError(f"{p.canonical}: '{loc}' does not exist or is not a file; check the URI")
    else:
        path = pathlib.Path(p.arg).expanduser()
        need_path(path, p.canonical)
        source = str(path)
    try:
        with open_source(source) as f:
            size = f.seek(0, io.SEEK_END)  # a local file or a pyarrow one alike
            safe_io.check_npz_file(f, size, ("x", "y"))
            if f.read(6) == b"\x93NUMPY":  # a bare .npy: the images, no labels
                f.seek(0)
                return _npy_stream(f, 0, source, p.canonical, None)
            f.seek(0)
            with zipfile.ZipFile(f) as z:
                names = z.namelist()
                if "x.npy" not in names:
                    return None
                info = z.getinfo("x.npy")
                y = None
                if "y.npy" in names:
                    with z.open("y.npy") as fy:
                        y = np.lib.format.read_array(fy, allow_pickle=False)
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)  # zip local file header: name and extra field lengths at 26 and 28
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            f.seek(start)
            return _npy_stream(f, start, source, p.canonical, y)
    except SpecError:
        raise
    except safe_io.Refused as e:
        raise SpecError(f"{p.canonical}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: let load() give its own one-line error
        log.debug("%s: not streamable (%s); loading it whole", p.canonical, e)
        return None


def _npy_stream(f, start: int, source: str, spec: str, y: np.ndarray | None) -> Stream | None:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject or len(shape) not in (3, 4) or dtype.kind not in "uifb":
        return None
    labels = None if y is None else check_labels(y, shape[0], f"{spec} key 'y'")
    return Stream(spec, source, f.tell(), dtype, tuple(shape), labels)

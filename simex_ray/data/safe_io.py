"""Guards for reading untrusted data files (numpy only, no Ray).

A spec such as ``pkl:/shared/x.pkl`` may name a file that someone else wrote,
and on a cluster the job that opens it runs with the cluster's rights. This
module is what :mod:`simex_ray.data` reads hostile-looking inputs through:

* :func:`load_pickle` unpickles with :class:`RestrictedUnpickler`: only numpy
  arrays, dtypes and numpy scalars (plus the tuples, lists, numbers and strings
  that pickle builds natively) can be created; any other global, e.g.
  ``os.system``, is refused before it is looked up, so no code in the file runs.
  numpy's own ``__setstate__`` methods only ever see states of the form numpy
  writes (plain dtypes, no object arrays, data of exactly the declared size):
  other states can crash numpy 2.x with a segfault. ``records=True`` also
  accepts the dicts and strings that pickle builds natively (CIFAR's batch
  files are dicts of an array, label lists and file names); still nothing runs.
* Memory bombs are refused *before* the memory is allocated: every size a file
  declares (an ``.npy`` header's shape, a zip member's uncompressed size, an
  idx header's dimensions, a pickle opcode's length) is checked first, against

  1. the cap ``SIMEX_MAX_DATA_BYTES`` (default 8 GiB; a byte count, ``K``/``M``/
     ``G``/``T`` suffixes are binary) on the bytes one array or one decompressed
     stream may take, and
  2. the file itself: a declared size must be consistent with the file's size,
     exactly for uncompressed ``.npy``/idx data, and at most
     :data:`DEFLATE_MAX_RATIO` times the compressed bytes for deflate (the
     format cannot expand more than about 1032:1, so a larger claim is a lie).

  A gzip pickle has no declared size, so its decompressed stream is cut off at
  the cap; a pickle may create at most ``cap / 256`` objects (a one-byte opcode
  can make a ~200-byte Python object), and the arrays its lists and tuples
  expand to (shared references included) must fit under the cap as well.

Refusals raise :class:`Refused` (a ``ValueError``) with a one-line message that
names the limit; :mod:`simex_ray.data` prefixes the spec and raises ``SpecError``.
Peak memory of a load is a small multiple of the cap (uint8 images become
float32, i.e. 4x).
"""

from __future__ import annotations

import ast
import gzip
import math
import os
import pathlib
import pickle
import re
import struct
import sys
import zipfile
from typing import Any, BinaryIO

import numpy as np
import numpy.lib.format as npy_format
from ..errors import UserError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.multiarray import scalar as _np_scalar  # type: ignore[no-redef]

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFLATE_MAX_RATIO",
    "MAX_BYTES_ENV",
    "Refused",
    "RestrictedUnpickler",
    "check_npz",
    "check_npz_file",
    "DataBudget",
    "load_pickle",
    "max_data_bytes",
    "read_idx",
]

MAX_BYTES_ENV = "SIMEX_MAX_DATA_BYTES"
DEFAULT_MAX_BYTES = 8 * 1024**3
# Deflate (zip, gzip) cannot expand data by more than ~1032:1 (a 258-byte match
# per ~2 bits); a declared size beyond that ratio is not what the bytes hold.
DEFLATE_MAX_RATIO = 1032
_DEFLATE_SLACK = 1024  # headers, tiny members
PICKLE_BYTES_PER_OBJECT = 256  # the object budget of a pickle is cap / this
_NPY_MAX_HEADER = 10000  # numpy's own default max_header_size
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_HINT = f"raise {MAX_BYTES_ENV} if the data is real"


class Refused(ValueError):
    """A file declares or would need more than the limits allow, or holds something unsafe."""

    def __init__(self, msg: str) -> None:
        super().__init__(" ".join(str(msg).split()))


def _human(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def max_data_bytes() -> int:
    """The cap from ``$SIMEX_MAX_DATA_BYTES`` (bytes; ``K``/``M``/``G``/``T`` binary suffixes), default 8 GiB."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", raw.lower())
    if not m or int(m.group(1)) <= 0:
        raise Refused(f"{MAX_BYTES_ENV}={raw!r} is not a positive byte count; use e.g. 8589934592 or 8G")
    return int(m.group(1)) * _UNITS[m.group(2)]


class DataBudget:
    """The bytes a source may read and build, all its files together: ``$SIMEX_MAX_DATA_BYTES`` (what bounds
    npz and pickle arrays, applied to Parquet tables and folders of images too). ``spend`` refuses in one line
    that names the cap as soon as a total would pass it, before that much is built."""

    def __init__(self, what: str):
        self.what, self.cap, self.spent = what, max_data_bytes(), 0

    def spend(self, nbytes: int, kind: str = "images") -> None:
        self.spent += int(nbytes)
        if self.spent > self.cap:
            raise Refused(f"{self.what}: its {kind} take more than {_cap_text(self.cap)}; {_HINT}")


def _cap_text(cap: int) -> str:
    return f"the {MAX_BYTES_ENV} cap of {_human(cap)} ({cap:,} bytes)"


def _nbytes(shape: Any, itemsize: int, what: str) -> int:
    """Exact byte count of ``shape`` (Python ints: no overflow); bad shapes raise ValueError."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise UserError(f"{what}: shape {shape!r} is not a tuple of integers")
    if any(d < 0 for d in dims):
        raise UserError(f"{what}: shape {dims} has a negative dimension")
    return math.prod(dims) * int(itemsize)


# --------------------------------------------------------------------------- pickle


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` inside a pickle.

    Pickles name ``numpy.ndarray`` only as the type argument of ``_reconstruct``;
    handing out the real class would let a pickle call ``ndarray(shape)`` and
    allocate any size. This token is immutable (no ``__dict__``) and refuses calls.
    """

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise Refused("refuses to call numpy.ndarray(...) directly (only pickled arrays are allowed); "
                      "convert the file to .npz")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()

# (module, name) -> attribute of RestrictedUnpickler (bound methods cannot be
# modified by a BUILD opcode, unlike plain functions) or a fixed object.
_ALLOWED: dict[tuple[str, str], str] = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy.core.multiarray", "scalar"): "_scalar",
    ("numpy._core.multiarray", "scalar"): "_scalar",
    ("numpy.core.numeric", "_frombuffer"): "_frombuffer",  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"): "_frombuffer",
    ("_codecs", "encode"): "_encode",  # bytes in protocols 0-2 (Python 3 writers)
    ("numpy", "ndarray"): "_ndarray",
    ("numpy", "dtype"): "_dtype",
}


def _counted(op: Any) -> Any:
    def run(self: "RestrictedUnpickler") -> None:
        self._ops += 1
        if self._ops > self._max_ops:
            raise Refused(f"pickle creates more than {self._max_ops:,} objects (1 per "
                          f"{PICKLE_BYTES_PER_OBJECT} bytes of {_cap_text(self._cap)}); store arrays, "
                          f"not lists of numbers, or {_HINT}")
        op(self)

    return run


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Unpickler for the MNIST pickle format: numpy arrays in tuples/lists, nothing else.

    ``find_class`` allows only numpy's array/dtype/scalar reconstructors (both
    the ``numpy.core`` and ``numpy._core`` spellings) and ``_codecs.encode`` for
    latin-1 (how Python 3 writes bytes in protocols 0-2); anything else raises
    :class:`Refused` without importing it. Calls and BUILD states must look
    like what numpy writes: ``_reconstruct(ndarray, (0,), b'b')``, dtype states
    equal to the dtype's own (byte order aside), array states with a plain
    non-object dtype and exactly ``prod(shape) * itemsize`` bytes of data.

    The pure-Python unpickler is used on purpose: every byte it needs goes
    through ``file.read(n)`` *before* it allocates ``n`` bytes (the C unpickler
    allocates first), so the reader given to it can refuse oversized claims,
    and each opcode is counted against an object budget.
    """

    dispatch = {k: _counted(v) for k, v in pickle._Unpickler.dispatch.items()}  # type: ignore[attr-defined]

    def _load_build(self) -> None:
        # numpy's __setstate__ methods trust their input: a dtype state with other
        # flags (e.g. "items are object pointers" on uint8), or an object-array
        # state with too short a list, makes numpy follow junk pointers (segfault).
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, self.stack[-1])
        elif isinstance(inst, np.ndarray):
            _check_array_state(self.stack[-1])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        if isinstance(inst, np.dtype):
            _check_dtype(inst)

    dispatch[pickle.BUILD[0]] = _counted(_load_build)

    def __init__(self, file: Any, *, cap: int | None = None, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self._cap = max_data_bytes() if cap is None else int(cap)
        self._max_ops = max(self._cap // PICKLE_BYTES_PER_OBJECT, 1)
        self._ops = 0
        self._ndarray = _NDARRAY

    def find_class(self, module: str, name: str) -> Any:
        attr = _ALLOWED.get((module, name))
        if attr is None:
            raise Refused(f"refuses to unpickle '{_clip(module)}.{_clip(name)}' (only numpy arrays, tuples and "
                          f"lists are allowed); convert the file to .npz")
        sys.audit("pickle.find_class", module, name)
        return getattr(self, attr)

    def _check(self, n: int, what: str) -> None:
        if n > self._cap:
            raise Refused(f"pickle builds {what} of {n:,} bytes, over {_cap_text(self._cap)}; {_HINT}")

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY:
            raise Refused("refuses to reconstruct an array of a type other than numpy.ndarray; convert the file to .npz")
        # numpy always pickles _reconstruct(ndarray, (0,), b'b'); BUILD then sets the real shape and bytes
        if type(shape) is not tuple or shape != (0,) or dtype not in (b"b", "b"):
            raise Refused(f"refuses _reconstruct(ndarray, {_clip(repr(shape))}, {_clip(repr(dtype))}): numpy pickles "
                          f"use ((0,), b'b'); convert the file to .npz")
        return _np_reconstruct(np.ndarray, (0,), b"b")

    def _dtype(self, obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
        # always a private copy, so a BUILD on it cannot touch numpy's shared dtypes
        d = np.dtype(obj, bool(align), True)
        _check_dtype(d)
        return d

    def _scalar(self, dtype: Any, obj: Any = None) -> Any:
        if not isinstance(dtype, np.dtype):
            raise UserError("numpy scalar without a dtype")
        self._check(dtype.itemsize, "a scalar")
        return _np_scalar(dtype, obj) if obj is not None else _np_scalar(dtype)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
            raise UserError("numpy _frombuffer needs bytes and a dtype")
        return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)  # size-checked by numpy

    def _encode(self, obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
            raise Refused("refuses to unpickle '_codecs.encode' other than for latin-1 strings; convert the file to .npz")
        return obj.encode("latin1")


def _check_dtype(d: np.dtype) -> None:
    """Plain, non-object dtypes only, equal to the one numpy builds from their type string."""
    if d.hasobject:
        raise Refused("refuses object arrays (only numbers: images and labels); convert the file to .npz")
    if d.fields is not None or d.subdtype is not None:
        raise Refused(f"refuses a structured or sub-array dtype {_clip(str(d))} (images and labels are plain numbers); "
                      f"convert the file to .npz")
    ref = np.dtype(d.str)
    if (d.flags, d.itemsize, d.alignment, d.kind) != (ref.flags, ref.itemsize, ref.alignment, ref.kind):
        raise Refused(f"refuses a pickled dtype whose state contradicts its type {d.str!r} (flags {d.flags}, "
                      f"itemsize {d.itemsize}); convert the file to .npz")


def _check_dtype_state(d: np.dtype, state: Any) -> None:
    """A dtype's BUILD state must be the one numpy writes for it: its own, byte order aside."""
    want = d.__reduce__()[2]
    ok = (isinstance(state, tuple) and len(state) == len(want)
          and [type(v) for v in state] == [type(v) for v in want]
          and state[0] == want[0] and state[2:] == want[2:]
          and (state[1] == "|" if want[1] == "|" else state[1] in ("<", ">", "=")))
    if not ok:
        raise Refused(f"refuses a pickled dtype state {_clip(repr(state))} that numpy would not write for "
                      f"{d.str!r}; convert the file to .npz")


def _check_array_state(state: Any) -> None:
    """The ndarray state pickles carry: ([version,] shape, dtype, fortran, raw bytes), sizes matching."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise UserError("pickled array state is not a 4- or 5-tuple")
    shape, dtype, _, raw = state[-4:]
    if not isinstance(dtype, np.dtype):
        raise UserError("pickled array state has no dtype")
    _check_dtype(dtype)
    if not isinstance(raw, (bytes, bytearray, str)):
        raise UserError(f"pickled array data is a {type(raw).__name__}, not bytes")
    n = _nbytes(shape, dtype.itemsize, "pickled array")
    if n != len(raw):
        raise UserError(f"pickled array of shape {shape} {dtype} needs {n:,} bytes, its data has {len(raw):,}")


def _clip(s: str, n: int = 80) -> str:
    s = repr(s)[1:-1]
    return s if len(s) <= n else s[: n - 3] + "..."


READ_CHUNK = 1 << 20  # what one read of a stream of unknown size may ask for at once


class _CappedReader:
    """``read``/``readline`` over a stream that refuse, before reading, to go past ``cap`` bytes.

    ``end`` is the exact size of an uncompressed file: a request past it is
    truncation, reported without allocating the requested size.
    """

    def __init__(self, f: BinaryIO, cap: int, end: int | None, what: str) -> None:
        self.f, self.cap, self.end, self.what, self.pos = f, cap, end, what, 0

    def _room(self, n: int) -> None:
        if self.end is not None and self.pos + n > self.end:
            raise UserError(f"pickle data was truncated ({n:,} bytes wanted at offset {self.pos:,} "
                             f"of a {self.end:,}-byte file)")
        if self.pos + n > self.cap:
            raise Refused(f"{self.what} needs more than {_cap_text(self.cap)} (it is larger, or an item in "
                          f"it claims {n:,} bytes); {_HINT}")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = (self.end if self.end is not None else self.cap + 1) - self.pos
        else:
            self._room(n)
        if self.end is None and n > READ_CHUNK:
            # A stream of unknown size (gzip): a claim is read piece by piece, so a 5-byte file that claims a
            # 64 MiB string costs what it holds, not what it claims (one read(n) would allocate n up front).
            parts, left = [], n
            while left > 0 and (part := self.f.read(min(left, READ_CHUNK))):
                parts.append(part)
                left -= len(part)
            data = b"".join(parts)
        else:
            data = self.f.read(n)
        self.pos += len(data)
        if self.pos > self.cap:
            self._room(0)
        return data

    def readline(self, size: int = -1) -> bytes:
        room = self.cap - self.pos + 1
        line = self.f.readline(room if size is None or size < 0 else min(size, room))
        self.pos += len(line)
        if self.pos > self.cap:
            self._room(0)
        return line


def load_pickle(path: str | os.PathLike, *, cap: int | None = None, records: bool = False) -> Any:
    """Unpickle an MNIST-style pickle (gzip optional) with :class:`RestrictedUnpickler` and the caps.

    ``records``: also accept dicts and ``str``/``bytes`` (a CIFAR batch: ``{b'data': array,
    b'labels': [...], b'filenames': [...]}``). Pickle builds both natively, so this allows no
    new global and runs nothing; they are counted in the expansion check like lists.
    Raises :class:`Refused` for anything unsafe or over the cap; other errors
    (truncation, bad opcodes) propagate as their own exception types.
    """
    cap = max_data_bytes() if cap is None else int(cap)
    path = pathlib.Path(path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if gz:
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
            reader = _CappedReader(stream, cap, None, "the decompressed pickle")
        else:
            if size > cap:
                raise Refused(f"pickle file is {size:,} bytes, over {_cap_text(cap)}; {_HINT}")
            stream = raw
            reader = _CappedReader(raw, cap, size, "the pickle")
        try:
            obj = RestrictedUnpickler(reader, cap=cap).load()
        finally:
            if gz:
                stream.close()
    _check_expansion(obj, cap, records)
    return obj


_NUMERIC_KINDS = "biuf"


def _check_expansion(obj: Any, cap: int, records: bool = False) -> None:
    """Refuse objects ``np.asarray`` would blow up: shared references (``[L, L, ...]``
    nested k deep is k**depth elements from a few bytes), cycles, or non-numbers.

    Sizes are counted once per distinct list/tuple (memoised by id), as 8 bytes per
    Python number and ``nbytes`` per array. ``records``: dicts are containers too
    (keys and values), strings and bytes leaves of their length.
    """
    kinds: tuple[type, ...] = (list, tuple, dict) if records else (list, tuple)

    def children(o: Any) -> list[Any]:
        return [*o.keys(), *o.values()] if isinstance(o, dict) else list(o)

    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        o, done = stack.pop()
        if isinstance(o, kinds):
            k = id(o)
            if done:
                total = sum(size[id(c)] if isinstance(c, kinds) else _leaf_bytes(c, records) for c in children(o))
                active.discard(k)
                size[k] = total
                if total > cap:
                    raise Refused(f"pickle's lists and tuples expand to {total:,} bytes of arrays "
                                  f"(shared references count each time), over {_cap_text(cap)}; {_HINT}")
                continue
            if k in size:
                continue
            if k in active:
                raise Refused("pickle holds a list or tuple that contains itself; convert the file to .npz")
            active.add(k)
            stack.append((o, True))
            stack.extend((c, False) for c in children(o) if isinstance(c, kinds) and id(c) not in size)
        else:
            _leaf_bytes(o, records)


def _leaf_bytes(o: Any, records: bool = False) -> int:
    if o is None or isinstance(o, (bool, int, float)):
        return 8
    if isinstance(o, (np.ndarray, np.generic)) and o.dtype.kind in _NUMERIC_KINDS:
        return int(o.nbytes)
    if records and isinstance(o, (str, bytes, bytearray)):
        return len(o)
    what = f"a {o.dtype} array" if isinstance(o, (np.ndarray, np.generic)) else f"a {type(o).__name__}"
    raise Refused(f"pickle holds {what} (only numpy arrays, tuples and lists of numbers are allowed); "
                  f"convert the file to .npz")


# --------------------------------------------------------------------------- npy / npz


class _Counting:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.n = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.n += len(data)
        return data


def _npy_header(fp: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of an .npy stream at its start; reads only the header."""
    c = _Counting(fp)
    version = npy_format.read_magic(c)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(c, max_header_size=_NPY_MAX_HEADER)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(c, max_header_size=_NPY_MAX_HEADER)
    elif version == (3, 0):  # 2.0 with a utf-8 header; numpy has no public reader for it
        (hlen,) = struct.unpack("<I", _exact(c, 4))
        if hlen > _NPY_MAX_HEADER:
            raise UserError(f".npy header of {hlen} bytes is over {_NPY_MAX_HEADER}")
        d = ast.literal_eval(_exact(c, hlen).decode("utf8"))
        if not isinstance(d, dict) or not {"descr", "shape"} <= set(d):
            raise UserError(".npy header is not a dict with 'descr' and 'shape'")
        shape, dtype = d["shape"], npy_format.descr_to_dtype(d["descr"])
    else:
        raise UserError(f".npy format version {version} is not supported")
    return shape, dtype, c.n


def _exact(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise UserError("EOF in .npy header")
    return data


def _check_npy(fp: BinaryIO, size: int, what: str, cap: int) -> None:
    shape, dtype, hlen = _npy_header(fp)
    n = _nbytes(shape, dtype.itemsize, what)
    if n > cap:
        raise Refused(f"{what}: .npy header declares shape {shape} {dtype} = {n:,} bytes, over {_cap_text(cap)}; {_HINT}")
    if hlen + n != size:
        raise UserError(f"{what}: .npy header declares shape {shape} {dtype} ({n:,} bytes of data) but "
                         f"{size - hlen:,} bytes follow the header")


def check_npz(path: str | os.PathLike, keys: tuple[str, ...] = ("x", "y")) -> None:
    """Check what ``np.load(path)[key]`` would read, before it allocates anything.

    For every zip member that ``key`` can resolve to (``key.npy`` or ``key``): the
    declared uncompressed size must be under the cap and, for deflate, at most
    :data:`DEFLATE_MAX_RATIO` times its compressed size; an ``.npy`` member's
    header must declare exactly the bytes the member holds. A bare ``.npy`` file
    is checked against the file size. Files of other kinds are left to ``np.load``.
    """
    with open(path, "rb") as f:
        check_npz_file(f, os.fstat(f.fileno()).st_size, keys)


def check_npz_file(f: BinaryIO, size: int, keys: tuple[str, ...] = ("x", "y")) -> None:
    """:func:`check_npz` of an open, seekable file of ``size`` bytes (a local file, or a random-access
    ``pyarrow`` file of an object store); it is left at its start."""
    cap = max_data_bytes()
    f.seek(0)
    magic = f.read(len(npy_format.MAGIC_PREFIX))
    f.seek(0)
    if magic == npy_format.MAGIC_PREFIX:
        _check_npy(f, size, "a bare .npy file (not an .npz)", cap)
    elif magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        names = {n for k in keys for n in (k, k + ".npy")}
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.filename in names:
                    _check_member(z, info, size, cap)
    f.seek(0)


def _check_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, archive: int, cap: int) -> None:
    what = f"npz member '{_clip(info.filename)}'"
    declared = info.file_size
    if declared > cap:
        raise Refused(f"{what} declares {declared:,} bytes uncompressed, over {_cap_text(cap)}; {_HINT}")
    if info.compress_type == zipfile.ZIP_DEFLATED:
        packed = min(info.compress_size, archive)
        if declared > DEFLATE_MAX_RATIO * packed + _DEFLATE_SLACK:
            raise Refused(f"{what} declares {declared:,} bytes uncompressed from {packed:,} compressed bytes, "
                          f"more than deflate's {DEFLATE_MAX_RATIO}:1 maximum; the file is corrupt or hostile")
    elif info.compress_type == zipfile.ZIP_STORED and declared > archive:
        raise Refused(f"{what} declares {declared:,} bytes, more than the whole {archive:,}-byte file")
    with z.open(info) as m:
        if m.read(len(npy_format.MAGIC_PREFIX)) != npy_format.MAGIC_PREFIX:
            return  # np.load returns the raw bytes: bounded by `declared`, checked above
    with z.open(info) as m:
        _check_npy(m, declared, what, cap)


# --------------------------------------------------------------------------- idx


def read_idx(path: str | os.PathLike, dtypes: dict[int, str]) -> np.ndarray:
    """Read an MNIST idx file (gzip optional) -> native-endian array, checking the header first.

    The declared dimensions must fit under the cap and match the file: exactly
    for a plain file; for gzip, within :data:`DEFLATE_MAX_RATIO` times the file
    size, and at most declared + 1 bytes are ever decompressed.
    """
    cap = max_data_bytes()
    path = pathlib.Path(path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f: Any = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        try:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in dtypes:
                raise UserError("bad idx magic number")
            ndim = head[3]
            dim_bytes = f.read(4 * ndim)
            if len(dim_bytes) != 4 * ndim:
                raise UserError(f"header declares {ndim} dimensions but the file ends inside it")
            dims = struct.unpack(f">{ndim}I", dim_bytes)
            dtype = np.dtype(dtypes[head[2]])
            n = _nbytes(dims, dtype.itemsize, "idx")
            hdr = 4 + 4 * ndim
            if n > cap:
                raise Refused(f"idx file '{path.name}' declares shape {dims} {dtype} = {n:,} bytes, "
                              f"over {_cap_text(cap)}; {_HINT}")
            if gz and n > DEFLATE_MAX_RATIO * size + _DEFLATE_SLACK:
                raise Refused(f"idx file '{path.name}' declares shape {dims} = {n:,} bytes, more than its "
                              f"{size:,} gzip bytes can hold (deflate expands at most {DEFLATE_MAX_RATIO}:1)")
            if not gz and hdr + n != size:
                raise UserError(f"header says {dims} but file holds {max(size - hdr, 0) // dtype.itemsize} values")
            data = f.read(n + 1)  # one extra byte tells "more data than declared"
        finally:
            if gz:
                f.close()
    if len(data) != n:
        got = "more" if len(data) > n else f"only {len(data) // dtype.itemsize}"
        raise UserError(f"header says {dims} but file holds {got} values")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))

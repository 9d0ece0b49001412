"""``load(spec)``: a spec resolved through the registries to a :class:`Dataset`, with an optional cache."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import tempfile
from dataclasses import replace

import numpy as np
import pyarrow.fs as pafs

from . import dataset
from .. import storage
from ..formats import LEGACY, FormatError, ImageFormat, convert
from .dataset import Dataset, SpecError, classes_of
from .spec import Spec, parse_spec, source, suggest
from .variants import apply_variant

log = logging.getLogger("simex_ray.data")


def load_node(p: Spec, root: pathlib.Path, seed: int) -> Dataset:
    """The dataset of parsed spec ``p`` without its class selector: read, or derived from its inner spec."""
    if p.kind == "builtin":
        return source(p.name).load(root)
    if p.kind == "file":
        assert p.arg is not None
        if storage.is_uri(p.arg):
            return replace(load_uri(p), spec=p.canonical)
        ds = source(p.name).load(pathlib.Path(p.arg).expanduser(), p.canonical)
        return replace(ds, spec=p.canonical)
    assert p.inner is not None
    inner = load_node(p.inner, root, seed)
    return apply_variant(p.name, inner, p.canonical, seed)


def load_uri(p: Spec) -> Dataset:
    """A file scheme's data at a ``pyarrow`` filesystem URI (``s3://``, ``gs://``, ``file://``).

    ``parquet:`` is read row group by row group and an uncompressed ``npz:`` block by block, both
    straight from the store (:mod:`.slices`); any other file (a compressed npz, pkl, idx) is copied
    to a temporary local file first, at most the data cap in size. A directory scheme (``folder:``)
    needs a local directory.
    """
    from . import safe_io
    from .slices import load_slices, plan_slices

    assert p.arg is not None
    src = source(p.name)
    if src.arg == "DIR":
        raise SpecError(f"{p.canonical}: {p.name}: reads a local directory, not a URI; copy it to this machine "
                        f"(e.g. `aws s3 sync`), or store the images as parquet:")
    loc = storage.resolve(p.arg)
    info = loc.info()
    if p.name == "parquet" or info.type == pafs.FileType.File and p.name == "npz":
        slices = plan_slices(f"{p.name}:{p.arg}")
        if slices is not None:
            return load_slices(slices, p.canonical)
    if info.type != pafs.FileType.File:
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a file"
        raise SpecError(f"{p.canonical}: '{loc}' {what}; check the URI")
    cap = safe_io.max_data_bytes()
    if info.size is not None and info.size > cap:
        raise SpecError(f"{p.canonical}: '{loc}' is {info.size:,} bytes, over the data cap of {cap:,} "
                        f"(raise {safe_io.MAX_BYTES_ENV} to read it)")
    with tempfile.TemporaryDirectory(prefix="simex-uri-") as d:
        local = pathlib.Path(d) / (loc.name or "data")
        with loc.fs.open_input_stream(loc.path) as f, open(local, "wb") as out:
            while chunk := f.read(1 << 22):
                out.write(chunk)
        return src.load(local, p.canonical)


def select_class(ds: Dataset, c: str, canonical: str) -> Dataset:
    """The rows of class ``c`` (a class name, else an integer label) of ``ds``, named ``canonical``."""
    if ds.y is None:
        raise SpecError(f"{canonical}: '#{c}' needs labels but '{ds.spec}' has none; drop the '#{c}' selector")
    label: int | None = None
    if ds.classes and c in ds.classes:
        label = ds.classes.index(c)
    elif re.fullmatch(r"\d+", c):
        label = int(c)
    mask = ds.y == label if label is not None else np.zeros(len(ds), dtype=bool)
    if not mask.any():
        avail = classes_of(ds)
        shown = ", ".join(avail[:40]) + (", ..." if len(avail) > 40 else "")
        hint = suggest(c, avail) if ds.classes else ""
        raise SpecError(f"unknown class '{c}' in '{canonical}'{hint}; available: {shown}")
    return ds.subset(np.nonzero(mask)[0], spec=canonical)


def load(spec: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0,
         cache: dict | None = None, fmt: ImageFormat | None = LEGACY, strict: bool = False) -> Dataset:
    """Load a spec -> Dataset (x float32 (N,C,H,W) in [0,1]); same spec+seed -> same arrays.

    ``fmt``: the format to convert to by the rule of :mod:`simex_ray.formats` (default the legacy
    1×28×28; ``None`` keeps the source's native format); ``strict`` refuses any conversion.

    ``cache``: a dict the caller keeps across calls; each base dataset (file
    read, variant derived) is then built once and every ``SPEC#CLASS`` is cut
    from the cached copy. Cached arrays are shared: treat them as read-only.
    """
    p = parse_spec(spec)
    root = dataset.data_dir(data_dir)
    key = (p.base.canonical, str(root), int(seed))
    ds = cache.get(key) if cache is not None else None
    if ds is None:
        ds = load_node(p.base, root, int(seed))
        if cache is not None:
            cache[key] = ds
    if p.cls is not None:
        ds = select_class(ds, p.cls, p.canonical)
    if fmt is not None:
        try:
            ds = replace(ds, x=convert(ds.x, fmt, strict=strict, name=p.canonical))
        except FormatError as e:
            raise SpecError(str(e)) from None
    log.debug("loaded %s: %d images", p.canonical, len(ds))
    return replace(ds, spec=p.canonical)


def native_format(spec: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0,
                  cache: dict | None = None) -> ImageFormat:
    """The format ``spec``'s images have before any conversion."""
    return load(spec, data_dir=data_dir, seed=seed, cache=cache, fmt=None).format

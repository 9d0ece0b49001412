"""``parquet:PATH`` (a file, or a directory of ``*.parquet`` files read in path order): column ``image`` (encoded PNG/JPEG bytes, binary or the HF-datasets struct
{bytes, path}) or list column ``pixels``; optional int column ``label``."""

from __future__ import annotations

import pathlib

from ..dataset import Dataset, SpecError, need_path
from ..safe_io import DataBudget, Refused
from ..spec import register_file
from .parquet_rows import table_images


def load_parquet(path: pathlib.Path, spec: str) -> Dataset:
    try:
        return _load_parquet(path, spec)
    except Refused as e:
        raise SpecError(str(e)) from None


def _load_parquet(path: pathlib.Path, spec: str) -> Dataset:
    import pyarrow.parquet as pq

    budget = DataBudget(spec)  # the tables' bytes before they are read (then their images, as decoded)
    if path.is_dir():  # a Parquet dataset: every *.parquet file under it, row group by row group, in path order
        from ..slices import load_slices, plan_slices

        slices = plan_slices(f"parquet:{path}")
        for source in dict.fromkeys(sl.source for sl in slices):
            budget.spend(_table_bytes(pq.ParquetFile(source).metadata), "tables")
        return load_slices(slices, spec)
    need_path(path, spec)
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:
        raise SpecError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    budget.spend(_table_bytes(meta), "tables")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise SpecError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    x, y = table_images(table, spec, base=path.parent, budget=DataBudget(spec))
    return Dataset(x, y, spec)


def _table_bytes(meta) -> int:
    """A Parquet file's data as read into memory (its row groups' uncompressed sizes), from its footer."""
    return sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))


register_file("parquet", "PATH", load_parquet,
              "Parquet file or directory of *.parquet files, column image (encoded PNG/JPEG bytes or the HF-datasets {bytes, path} struct) or list "
              "column pixels; optional int column label")

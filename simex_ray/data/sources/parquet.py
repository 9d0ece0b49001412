"""``parquet:PATH`` (a file, or a directory of ``*.parquet`` files read in path order): column ``image`` (encoded PNG/JPEG bytes, binary or the HF-datasets struct
{bytes, path}) or list column ``pixels``; optional int column ``label``."""

from __future__ import annotations

import pathlib

from ..dataset import Dataset, SpecError, need_path
from ..spec import register_file
from .parquet_rows import table_images


def load_parquet(path: pathlib.Path, spec: str) -> Dataset:
    if path.is_dir():  # a Parquet dataset: every *.parquet file under it, row group by row group, in path order
        from ..slices import load_slices, plan_slices

        return load_slices(plan_slices(f"parquet:{path}"), spec)
    need_path(path, spec)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise SpecError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    x, y = table_images(table, spec, base=path.parent)
    return Dataset(x, y, spec)


register_file("parquet", "PATH", load_parquet,
              "Parquet file or directory of *.parquet files, column image (encoded PNG/JPEG bytes or the HF-datasets {bytes, path} struct) or list "
              "column pixels; optional int column label")

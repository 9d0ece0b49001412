"""``parquet:PATH``: column ``image`` (encoded PNG/JPEG bytes, binary or the HF-datasets struct
{bytes, path}) or list column ``pixels``; optional int column ``label``."""

from __future__ import annotations

import pathlib

import numpy as np

from ..dataset import Dataset, SpecError, need_path
from ..images import check_labels, decode_image, flat_to_square, stack_images, to_unit_images
from ..spec import register_file


def load_parquet(path: pathlib.Path, spec: str) -> Dataset:
    need_path(path, spec)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise SpecError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    cols = table.column_names
    if "image" in cols:
        col = table.column("image").combine_chunks()
        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            data = col.field("bytes").to_pylist() if "bytes" in names else [None] * len(col)
            paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
        else:
            data, paths = col.to_pylist(), [None] * len(col)
        xs = []
        for i, (b, p) in enumerate(zip(data, paths)):
            if b is None and p is None:
                raise SpecError(f"{spec}: row {i} of column 'image' is empty; every row needs image bytes")
            src: bytes | pathlib.Path = b if b is not None else (path.parent / p)
            xs.append(decode_image(src, f"{spec} row {i}"))
        if not xs:
            raise SpecError(f"{spec}: parquet has no rows")
        x = stack_images(xs, spec)
    elif "pixels" in cols:
        vals = table.column("pixels").to_pylist()
        try:
            raw = np.asarray(vals)
        except ValueError:
            raw = np.asarray(vals, dtype=object)
        if raw.dtype == object:
            raise SpecError(f"{spec}: column 'pixels' rows differ in size; every image must have the same shape")
        x = to_unit_images(flat_to_square(raw, f"{spec} column 'pixels'"), name=f"{spec} column 'pixels'", fmt=None)
    else:
        raise SpecError(f"{spec}: no column 'image' (encoded PNG/JPEG bytes) or 'pixels' (columns: {', '.join(cols)})")
    y = None
    if "label" in cols:
        lab = table.column("label").to_pylist()
        if any(v is None for v in lab):
            raise SpecError(f"{spec}: column 'label' has missing values; fill or drop them")
        y = check_labels(np.asarray(lab), len(x), f"{spec} column 'label'")
    return Dataset(x, y, spec)


register_file("parquet", "PATH", load_parquet,
              "Parquet, column image (encoded PNG/JPEG bytes or the HF-datasets {bytes, path} struct) or list "
              "column pixels; optional int column label")

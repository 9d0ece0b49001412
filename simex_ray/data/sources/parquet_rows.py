"""The rows of a Parquet table as images: the one reader of ``parquet:`` files, whole or a row group at a time."""

from __future__ import annotations

import pathlib

import numpy as np

from ...formats import ImageFormat, convert
from ..dataset import SpecError
from ..safe_io import DataBudget
from ..images import check_labels, decode_image, flat_to_square, stack_images, to_unit_images


def inside(base: pathlib.Path, path: str, where: str) -> pathlib.Path:
    """``base / path`` when it resolves inside ``base`` (symbolic links followed); an absolute path or one that
    climbs out with ``..`` is refused: a data file never names what the job reads outside its dataset."""
    root = base.resolve()
    target = (root / path).resolve()
    if pathlib.PurePath(path).is_absolute() or not target.is_relative_to(root):
        raise SpecError(f"{where}: image path '{path}' is outside the dataset's directory {root}; paths must be "
                        f"relative to it and stay inside it")
    return target


def table_images(table, spec: str, *, base: pathlib.Path | None = None, first_row: int = 0,
                 fmt: ImageFormat | None = None, strict: bool = False,
                 budget: "DataBudget | None" = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(images (N, C, H, W), labels or None) of a Parquet table (a whole file or one row group):
    native, or in ``fmt`` by the rule. ``base``: where an HF-datasets ``path`` is relative to;
    ``first_row``: the table's first row in the file, for error messages; ``budget``: what the decoded
    images may take (:class:`~simex_ray.data.safe_io.DataBudget`), checked as they are decoded."""
    import pyarrow as pa

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
            where = f"{spec} row {first_row + i}"
            if b is None and p is None:
                raise SpecError(f"{where} of column 'image' is empty; every row needs image bytes")
            if b is None and base is None:
                raise SpecError(f"{where}: image given by path only; store the bytes in the file")
            src: bytes | pathlib.Path = b if b is not None else inside(base, p, where)
            img = decode_image(src, where, fmt=None if strict else fmt)
            if budget is not None:
                budget.spend(img.nbytes, "decoded images")
            xs.append(convert(img, fmt, strict=True, name=where) if strict and fmt is not None else img)
        if not xs:
            raise SpecError(f"{spec}: parquet has no rows")
        x = stack_images(xs, spec) if fmt is None else np.concatenate(xs)
    elif "pixels" in cols:
        raw = _pixel_rows(table.column("pixels").combine_chunks(), spec)
        if budget is not None:
            budget.spend(raw.size * 4, "images (float32)")
        x = to_unit_images(flat_to_square(raw, f"{spec} column 'pixels'"), name=f"{spec} column 'pixels'",
                           fmt=fmt, strict=strict)
    else:
        raise SpecError(f"{spec}: no column 'image' (encoded PNG/JPEG bytes) or 'pixels' (columns: {', '.join(cols)})")
    y = None
    if "label" in cols:
        lab = table.column("label").to_pylist()
        if any(v is None for v in lab):
            raise SpecError(f"{spec}: column 'label' has missing values; fill or drop them")
        y = check_labels(np.asarray(lab), len(x), f"{spec} column 'label'")
    return x, y


def _pixel_rows(col, spec: str) -> np.ndarray:
    """A list column of equally long pixel rows -> (N, P) array, through Arrow's buffers, not Python lists
    (8,192 28×28 rows measured 0.48 s -> 0.23 s as int64 lists, 0.01 s as fixed-size uint8 lists); rows of
    different lengths or with missing values are refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise SpecError(f"{spec}: column 'pixels' must hold a list of numbers per row, got {col.type}")
    if col.null_count:
        raise SpecError(f"{spec}: column 'pixels' has missing rows; fill or drop them")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise SpecError(f"{spec}: column 'pixels' rows differ in size; every image must have the same shape")
    values = col.flatten()
    if values.null_count:
        raise SpecError(f"{spec}: column 'pixels' has missing values; fill or drop them")
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise SpecError(f"{spec}: column 'pixels' must hold numbers, got {values.type}")
    return values.to_numpy(zero_copy_only=False).reshape(len(col), int(lengths[0]) if len(lengths) else 0)

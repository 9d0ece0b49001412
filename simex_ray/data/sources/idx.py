"""``idx:DIR``: MNIST idx-ubyte files in a directory (``*images*`` / ``*labels*``, .gz optional; train then test)."""

from __future__ import annotations

import pathlib

import numpy as np

from .. import safe_io
from ..dataset import Dataset, SpecError, need_path
from ..images import check_labels, to_unit_images
from ..spec import register_file

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: pathlib.Path, spec: str) -> np.ndarray:
    try:
        return safe_io.read_idx(path, _IDX_DTYPES)  # header checked against the file and the cap first
    except safe_io.Refused as e:
        raise SpecError(f"{spec}: {e}") from None
    except Exception as e:
        raise SpecError(f"{spec}: cannot read idx file '{path.name}' ({type(e).__name__}: {e}); expected MNIST idx-ubyte format") from None


def _idx_order(p: pathlib.Path) -> tuple[int, str]:
    n = p.name.lower()
    return (1 if ("t10k" in n or "test" in n) else 0, n)


def load_idx(path: pathlib.Path, spec: str) -> Dataset:
    need_path(path, spec, "directory")
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    imgs = sorted((p for p in files if "images" in p.name.lower()), key=_idx_order)
    if not imgs:
        raise SpecError(f"{spec}: no '*images*' idx files in '{path}'; expected e.g. train-images-idx3-ubyte(.gz), t10k-images-idx3-ubyte(.gz)")
    by_name = {p.name.lower(): p for p in files}
    xs, ys = [], []
    for ip in imgs:
        stem = ip.name.lower().removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
        lp = by_name.get(stem) or by_name.get(stem + ".gz")
        x = to_unit_images(_read_idx(ip, spec), name=f"{spec} {ip.name}", fmt=None)
        xs.append(x)
        ys.append(None if lp is None else check_labels(_read_idx(lp, spec), len(x), f"{spec} {lp.name}"))
    if any(y is None for y in ys) and not all(y is None for y in ys):
        missing = [ip.name for ip, y in zip(imgs, ys) if y is None]
        raise SpecError(f"{spec}: no labels file for {', '.join(missing)}; add the matching '*labels*' file or remove the images")
    y_all = None if ys[0] is None else np.concatenate(ys)  # type: ignore[arg-type]
    return Dataset(np.concatenate(xs), y_all, spec)


register_file("idx", "DIR", load_idx,
              "MNIST idx-ubyte files (*images* / *labels*, .gz optional), train then test")

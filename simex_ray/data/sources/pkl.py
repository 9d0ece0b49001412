"""``pkl:PATH``: the MNIST pickle format, a tuple of (x, y) pairs (gzip optional).

Read with the restricted unpickler of :mod:`simex_ray.data.safe_io`: only numpy
arrays, tuples and lists are built, nothing in the file is executed.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from .. import safe_io
from ..dataset import Dataset, SpecError, need_path
from ..images import check_labels, flat_to_square, to_unit_images
from ..spec import register_file
from ...errors import UserError


def _ndim(a: Any) -> int:
    try:
        return np.asarray(a).ndim
    except ValueError:  # ragged, e.g. an (x, y) pair of a ((x, y), (x, y)) pickle
        return 0


def _pairs_from_pickle(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and _ndim(obj[0]) >= 2:
        return [tuple(obj)]  # a single (x, y) pair
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in obj):
        return [tuple(p) for p in obj]
    raise UserError("expected a tuple of (x, y) pairs like the MNIST pickle (train, valid, test)")


def load_pkl(path: pathlib.Path, spec: str) -> Dataset:
    need_path(path, spec)
    try:
        obj = safe_io.load_pickle(path)  # restricted unpickler: numpy arrays, tuples, lists only
        pairs = _pairs_from_pickle(obj)
    except safe_io.Refused as e:
        raise SpecError(f"{spec}: {e}") from None
    except Exception as e:
        raise SpecError(f"{spec}: cannot read MNIST-style pickle ({type(e).__name__}: {e}); expected a tuple of (x, y) pairs, gzip optional") from None
    xs, ys = [], []
    for i, (x, y) in enumerate(pairs):
        try:
            x = flat_to_square(np.asarray(x), f"{spec} part {i}")
            xs.append(to_unit_images(x, name=f"{spec} part {i}", fmt=None))
            ys.append(None if y is None else check_labels(y, len(x), f"{spec} part {i} labels"))
        except SpecError:
            raise
        except (ValueError, TypeError) as e:  # ragged nesting, objects where numbers belong
            raise SpecError(f"{spec} part {i}: not a rectangular numeric array ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); expected (N,H,W) images") from None
    x_all = np.concatenate(xs)
    y_all = None if any(y is None for y in ys) else np.concatenate(ys)  # type: ignore[arg-type]
    return Dataset(x_all, y_all, spec)


register_file("pkl", "PATH", load_pkl,
              "MNIST-style pickle, a tuple of (x, y) pairs, gzip optional (restricted unpickler: nothing in it runs)")

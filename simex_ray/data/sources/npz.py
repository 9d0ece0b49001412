"""``npz:PATH``: a NumPy ``.npz`` with key ``x`` and optional key ``y`` (or a bare ``.npy`` of images).

``x`` is (N,H,W) or (N,H,W,C), uint8 0..255 or float in [0,1]; ``y`` (N,) int
labels. Declared sizes are checked against the file and the cap before numpy
allocates (:func:`simex_ray.data.safe_io.check_npz`). An uncompressed ``x`` can
also be read block by block: :func:`simex_ray.data.streaming.stream`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from .. import safe_io
from ..dataset import Dataset, SpecError, need_path
from ..images import check_labels, to_unit_images
from ..spec import register_file


def load_npz(path: pathlib.Path, spec: str) -> Dataset:
    need_path(path, spec)
    try:
        safe_io.check_npz(path, ("x", "y"))  # declared sizes vs the file and the cap, before np.load allocates
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a bare .npy file: the images, no labels
            return Dataset(to_unit_images(loaded, name=f"{spec} (.npy)", fmt=None), None, spec)
        with loaded as z:
            keys = list(z.keys())
            if "x" not in keys:
                raise SpecError(f"{spec}: no key 'x' in npz (keys: {', '.join(keys) or 'none'}); save with np.savez(path, x=images, y=labels)")
            x_raw = z["x"]
            y_raw = z["y"] if "y" in keys else None
    except SpecError:
        raise
    except safe_io.Refused as e:
        raise SpecError(f"{spec}: {e}") from None
    except Exception as e:
        raise SpecError(f"{spec}: cannot read npz ({type(e).__name__}: {e}); save with np.savez(path, x=images, y=labels)") from None
    x = to_unit_images(x_raw, name=f"{spec} key 'x'", fmt=None)
    y = None if y_raw is None else check_labels(y_raw, len(x), f"{spec} key 'y'")
    return Dataset(x, y, spec)


register_file("npz", "PATH", load_npz,
              "NumPy .npz, key x (N,H,W) or (N,H,W,C) uint8 0..255 or float in [0,1], optional key y (N,) int "
              "labels; a bare .npy of images works too")

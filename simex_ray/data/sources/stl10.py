"""Built-in ``stl10``: STL-10 (Coates, Ng & Lee 2011), the labelled train + test images, 13,000, 3x96x96.

Read from torchvision's layout under the data dir::

    stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt

``*_X.bin``: uint8 images, each 3 planes of 96x96 stored column-major; ``*_y.bin``: uint8 labels
1..10 (here 0..9); ``class_names.txt``: one name a line. The 100k unlabelled images are not used.
Missing files are downloaded once with torchvision (the archive is ~2.6 GB).
"""

from __future__ import annotations

import pathlib

import numpy as np

from .. import safe_io
from ..dataset import Dataset, SpecError
from ..images import to_unit_images
from ..spec import register_builtin
from .fetch import fetch_torchvision

_FOLDER = "stl10_binary"
_SPLITS = ("train", "test")
_SIDE = 96
_IMAGE_BYTES = 3 * _SIDE * _SIDE


def _read_bin(path: pathlib.Path, unit: int) -> np.ndarray:
    """A raw uint8 file of whole ``unit``-byte records, size-checked before it is read."""
    size, cap = path.stat().st_size, safe_io.max_data_bytes()
    if size > cap:
        raise SpecError(f"stl10: {path} is {size:,} bytes, over the {safe_io.MAX_BYTES_ENV} cap of {cap:,}; "
                        f"raise it if the data is real")
    if size % unit:
        raise SpecError(f"stl10: {path} holds {size:,} bytes, not a whole number of {unit}-byte records; "
                        f"delete '{path.parent}' to download it again")
    return np.fromfile(path, dtype=np.uint8)


def _split(base: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = _read_bin(base / f"{split}_X.bin", _IMAGE_BYTES).reshape(-1, 3, _SIDE, _SIDE)
    x = x.transpose(0, 1, 3, 2)  # stored column-major: (N, C, W, H) -> (N, C, H, W)
    y = _read_bin(base / f"{split}_y.bin", 1).astype(np.int64)
    if len(y) != len(x) or (len(y) and (y.min() < 1 or y.max() > 10)):
        raise SpecError(f"stl10: {base}/{split}_y.bin has {len(y)} labels (expected {len(x)}, in 1..10); "
                        f"delete '{base}' to download it again")
    return x, y - 1


def load_stl10(root: pathlib.Path) -> Dataset:
    base = pathlib.Path(root) / _FOLDER
    need = [base / f"{s}_{k}.bin" for s in _SPLITS for k in "Xy"]
    if not all(f.is_file() for f in need):
        fetch_torchvision("stl10", pathlib.Path(root), "STL10", [{"split": "test"}],
                          f"put {_FOLDER}/ (unpacked from stl10_binary.tar.gz, cs.stanford.edu/~acoates/stl10) there")
    xs, ys = zip(*(_split(base, s) for s in _SPLITS))
    names_file = base / "class_names.txt"
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() else []
    return Dataset(to_unit_images(np.concatenate(xs), name="stl10", fmt=None), np.concatenate(ys), "stl10",
                   tuple(names) or None)


register_builtin("stl10", load_stl10,
                 "STL-10 labelled colour photos, 10 classes, 13k, 3x96x96 (torchvision; downloaded once, ~2.6 GB)")

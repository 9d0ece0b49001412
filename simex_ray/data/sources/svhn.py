"""Built-in ``svhn``: Street View House Numbers (Netzer et al. 2011), cropped digits, train + test, 99,289, 3x32x32.

Read from ``train_32x32.mat`` and ``test_32x32.mat`` directly in the data dir (torchvision's layout),
MATLAB v5 files with ``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1) in 1..10, where 10 is the digit 0;
labels here are the digits 0..9 (no class names: the label is the digit). The ``extra`` split is not
used. Missing files are downloaded once with torchvision.
"""

from __future__ import annotations

import pathlib

import numpy as np

from .. import safe_io
from ..dataset import Dataset, SpecError
from ..images import check_labels, to_unit_images
from ..spec import register_builtin
from .fetch import fetch_torchvision

_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _read_mat(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    fix = f"delete '{path}' to download it again"
    cap = safe_io.max_data_bytes()
    if path.stat().st_size > cap:
        raise SpecError(f"svhn: {path} is {path.stat().st_size:,} bytes, over the {safe_io.MAX_BYTES_ENV} cap "
                        f"of {cap:,}; raise it if the data is real")
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:
        raise SpecError(f"svhn: cannot read {path} ({type(e).__name__}: {e}); {fix}") from None
    X, y = mat.get("X"), mat.get("y")
    if not isinstance(X, np.ndarray) or X.ndim != 4 or X.shape[:3] != (32, 32, 3) or y is None:
        raise SpecError(f"svhn: {path}: expected X (32, 32, 3, N) and y (N, 1), got X "
                        f"{getattr(X, 'shape', None)}; {fix}")
    labels = check_labels(np.asarray(y).reshape(-1), X.shape[3], f"svhn: {path} 'y'")
    labels[labels == 10] = 0  # SVHN labels the digit 0 as 10
    return np.transpose(X, (3, 2, 0, 1)), labels  # (H, W, C, N) -> (N, C, H, W)


def load_svhn(root: pathlib.Path) -> Dataset:
    root = pathlib.Path(root)
    if not all((root / f).is_file() for f in _FILES.values()):
        fetch_torchvision("svhn", root, "SVHN", [{"split": s} for s in _FILES],
                          "put train_32x32.mat and test_32x32.mat (ufldl.stanford.edu/housenumbers) there")
    xs, ys = zip(*(_read_mat(root / f) for f in _FILES.values()))
    return Dataset(to_unit_images(np.concatenate(xs), name="svhn", fmt=None), np.concatenate(ys), "svhn")


register_builtin("svhn", load_svhn,
                 "SVHN house-number digits 0-9, 99k, 3x32x32 (torchvision; downloaded once, ~250 MB)")

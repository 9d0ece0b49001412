"""Built-ins ``cifar10`` and ``cifar100``: CIFAR-10 / CIFAR-100 (Krizhevsky 2009), train + test, 60k, 3x32x32.

Read from the "python version" layout under the data dir, the one torchvision downloads and unpacks::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Each file is a pickled dict (``data``: uint8 (N, 3072), rows R, G, B planes of 32x32; ``labels``
or ``fine_labels``; the meta file's ``label_names`` / ``fine_label_names``), keys ``bytes`` or
``str``. It is read with the restricted unpickler (:func:`~simex_ray.data.safe_io.load_pickle`,
``records=True``): nothing in a file runs. Missing files are downloaded once with torchvision.
CIFAR-100 uses the 100 fine labels.
"""

from __future__ import annotations

import pathlib
from functools import partial
from typing import Any

import numpy as np

from .. import safe_io
from ..dataset import Dataset, SpecError
from ..images import check_labels, to_unit_images
from ..spec import register_builtin
from .fetch import fetch_torchvision

_SETS = {
    # name: (folder, train files, test files, meta file, labels key, names key, torchvision class, archive)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names", "CIFAR10", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta",
                 "fine_labels", "fine_label_names", "CIFAR100", "cifar-100-python.tar.gz"),
}
_PIXELS = 3 * 32 * 32


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def read_record(path: pathlib.Path, name: str) -> dict[str, Any]:
    """One CIFAR pickle -> dict with ``str`` keys, via the restricted unpickler; SpecError (one line) if bad."""
    fix = f"delete '{path.parent}' to download it again"
    try:
        obj = safe_io.load_pickle(path, records=True)
    except safe_io.Refused as e:
        raise SpecError(f"{name}: {path}: {e}") from None
    except Exception as e:
        raise SpecError(f"{name}: cannot read {path} ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{name}: {path} holds a {type(obj).__name__}, not a CIFAR dict; {fix}")
    return {_text(k): v for k, v in obj.items()}


def _batch(path: pathlib.Path, name: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    rec = read_record(path, name)
    where = f"{name}: {path}"
    if "data" not in rec or labels_key not in rec:
        raise SpecError(f"{where} has no '{'data' if 'data' not in rec else labels_key}' entry (keys: "
                        f"{', '.join(sorted(rec))}); delete '{path.parent}' to download it again")
    data = rec["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _PIXELS or data.dtype != np.uint8:
        shape = getattr(data, "shape", type(data).__name__)
        raise SpecError(f"{where}: 'data' is {shape}, expected uint8 (N, {_PIXELS}); delete '{path.parent}' "
                        f"to download it again")
    x = data.reshape(-1, 3, 32, 32)  # (N, 3, 32, 32): rows hold the R, G, B planes in turn
    return x, check_labels(rec[labels_key], len(x), f"{where} '{labels_key}'")


def load_cifar(name: str, root: pathlib.Path) -> Dataset:
    folder, train, test, meta, labels_key, names_key, cls_name, archive = _SETS[name]
    base = pathlib.Path(root) / folder
    files = [base / f for f in (*train, *test, meta)]
    if not all(f.is_file() for f in files):
        fetch_torchvision(name, pathlib.Path(root), cls_name, [{"train": True}, {"train": False}],
                          f"put {folder}/ (unpacked from {archive}, www.cs.toronto.edu/~kriz/cifar.html) there")
    xs, ys = zip(*(_batch(base / f, name, labels_key) for f in (*train, *test)))
    names = read_record(base / meta, name).get(names_key)
    classes = tuple(_text(v) for v in names) if isinstance(names, (list, tuple)) and names else None
    return Dataset(to_unit_images(np.concatenate(xs), name=name, fmt=None), np.concatenate(ys), name, classes)


register_builtin("cifar10", partial(load_cifar, "cifar10"),
                 "CIFAR-10 colour photos, 10 classes (airplane..truck), 60k, 3x32x32 (torchvision; downloaded once)")
register_builtin("cifar100", partial(load_cifar, "cifar100"),
                 "CIFAR-100 colour photos, 100 fine classes, 60k, 3x32x32 (torchvision; downloaded once)")

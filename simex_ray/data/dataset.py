"""The data types every part of :mod:`simex_ray.data` shares: the dataset, its two errors, the data root."""

from __future__ import annotations

from ..errors import UserError

import os
import pathlib
from dataclasses import dataclass

import numpy as np

from ..errors import squash
from ..formats import ImageFormat, format_of


class SpecError(UserError):
    """Bad, unknown or malformed spec, or bad file content. One-line message with the fix."""

    def __init__(self, msg: str) -> None:
        super().__init__(squash(msg))


class DataUnavailable(RuntimeError):
    """A built-in dataset is not cached and cannot be downloaded. One-line message."""

    def __init__(self, msg: str) -> None:
        super().__init__(squash(msg))


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` float32 (N, C, H, W) in [0, 1], labels ``y`` int64 (N,) or None."""

    x: np.ndarray
    y: np.ndarray | None
    spec: str
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def format(self) -> ImageFormat:
        return format_of(self.x)

    def subset(self, idx: np.ndarray, spec: str | None = None) -> "Dataset":
        """Rows ``idx`` of this dataset (same classes; spec unchanged unless given)."""
        return Dataset(
            x=self.x[idx],
            y=None if self.y is None else self.y[idx],
            spec=self.spec if spec is None else spec,
            classes=self.classes,
        )


def classes_of(ds: Dataset) -> list[str]:
    """Selector values of the classes present in ``ds``: names if it has them, else ``"0"``.. labels."""
    if ds.y is None:
        raise SpecError(f"{ds.spec}: has no labels, so it has no classes; use a labelled dataset for per-class fleets")
    present = np.unique(ds.y)
    if ds.classes:
        return [ds.classes[i] if 0 <= i < len(ds.classes) else str(i) for i in present.tolist()]
    return [str(i) for i in present.tolist()]


def data_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """Data root: ``explicit`` > ``$SIMEX_DATA`` > ``~/.cache/simex``."""
    if explicit:
        return pathlib.Path(explicit).expanduser()
    env = os.environ.get("SIMEX_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/simex").expanduser()


def need_path(path: pathlib.Path, spec: str, kind: str = "file") -> None:
    """Raise a one-line SpecError unless ``path`` is an existing ``file`` (or ``directory``)."""
    ok = path.is_dir() if kind == "directory" else path.is_file()
    if not ok:
        what = "does not exist" if not path.exists() else f"is not a {kind}"
        raise SpecError(f"{spec}: {kind} '{path}' {what}; check the path (relative paths are from {os.getcwd()})")

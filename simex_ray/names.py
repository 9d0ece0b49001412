"""One rule for showing member and dataset names to people (progress lines, tables, figures).

Specs that name files carry whole paths (``npz:/very/long/path/a.npz``);
shown whole they fill a figure with labels, cut to a fixed width they all
look alike. The rule: every file path is shown by its shortest trailing part
that tells it apart from the other paths shown with it (``a.npz``,
``x/a.npz`` next to ``y/a.npz``), without the file scheme, keeping variant
prefixes and class selectors (``rotated:a.npz#3``). Where that still leaves
two names alike (``npz:d`` and ``folder:d``), the scheme stays; failing that,
the full spec. JSON output always keeps the full spec.

The file schemes are the ones registered in :mod:`simex_ray.data.spec`
(:func:`~simex_ray.data.spec.file_schemes`), so a new file source is shortened too.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

from .data.spec import file_schemes


@lru_cache(maxsize=8)
def _file_pattern(schemes: tuple[str, ...]) -> re.Pattern:
    return re.compile(rf"(?P<scheme>{'|'.join(map(re.escape, schemes))}):(?P<path>[^#]+)")


def _shortest_suffixes(paths: list[str]) -> dict[str, str]:
    parts = {p: [q for q in p.rstrip("/").split("/") if q] or [p] for p in paths}
    out = {}
    for p, comps in parts.items():
        for k in range(1, len(comps) + 1):
            tail = "/".join(comps[-k:])
            clash = any(o != p and "/".join(oc[-k:]) == tail for o, oc in parts.items())
            if not clash:
                out[p] = tail
                break
        else:
            out[p] = p
    return out


def display_names(names: Iterable[str]) -> dict[str, str]:
    """{full name: short display name}, unique and in the given order."""
    file_re = _file_pattern(file_schemes())
    names = list(dict.fromkeys(names))
    paths = sorted({m.group("path") for n in names for m in file_re.finditer(n)})
    short = _shortest_suffixes(paths)
    for keep_scheme in (False, True):
        def sub(m: re.Match) -> str:
            tail = short[m.group("path")]
            return f"{m.group('scheme')}:{tail}" if keep_scheme else tail

        shown = {n: file_re.sub(sub, n) for n in names}
        if len(set(shown.values())) == len(shown):
            return shown
    return {n: n for n in names}


def display_name(name: str, among: Iterable[str] = ()) -> str:
    """The display name of ``name`` when shown next to ``among``."""
    return display_names([name, *among])[name]

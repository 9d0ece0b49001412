"""The spec grammar, and the registries of sources and variants it is made of.

::

    SPEC     := BASE ['#' CLASS]
    BASE     := BUILTIN | FILE | VARIANT
    BUILTIN  := a registered built-in name                  (e.g. digits)
    FILE     := a registered file scheme ':' PATH or DIR    (e.g. npz:/data/x.npz)
    VARIANT  := a registered variant ':' BASE               (e.g. rotated:digits)

Every built-in, file scheme and variant is registered once, by the module that
implements it (:mod:`simex_ray.data.sources`, :mod:`simex_ray.data.variants`),
with :func:`register_builtin`, :func:`register_file` or :func:`register_variant`.
Everything that lists them is read from these registries: the error messages
(:func:`forms`), the command-line help (:func:`spec_help`), the long listing
(:func:`describe`) and the file schemes that :mod:`simex_ray.names` shortens
(:func:`file_schemes`). Listings keep registration order.
"""

from __future__ import annotations

import difflib
import pathlib
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from .dataset import Dataset, SpecError
from ..errors import UserError

__all__ = [
    "BUILTINS",
    "FILE_PREFIXES",
    "VARIANTS",
    "Source",
    "Spec",
    "Variant",
    "describe",
    "file_schemes",
    "forms",
    "norm_name",
    "parse_spec",
    "register_builtin",
    "register_file",
    "register_variant",
    "source",
    "spec_help",
    "split_specs",
    "suggest",
    "variant",
    "with_class",
]


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Source:
    """A registered data source: a built-in dataset or a file scheme.

    ``load`` is ``load(root)`` for a built-in (``root``: the data directory) and
    ``load(path, spec)`` for a file scheme (``path`` expanded, ``spec`` the
    canonical spec to name in errors); either returns a :class:`Dataset`.
    ``arg`` is what a file scheme takes, ``"PATH"`` or ``"DIR"``; ``help`` one line.
    """

    name: str
    kind: str  # "builtin" | "file"
    load: Callable[..., Dataset]
    help: str
    arg: str | None = None


@dataclass(frozen=True)
class Variant:
    """A registered variant: ``apply(x, rng)`` -> the new images for native images ``x`` (N, C, H, W).

    ``rng`` is seeded from (seed, canonical variant spec), so a variant is
    deterministic given its spec and seed. Labels and classes are kept.
    """

    name: str
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    help: str


_SOURCES: dict[str, Source] = {}
_VARIANTS: dict[str, Variant] = {}


def _check_new(name: str) -> None:
    if name != norm_name(name) or not name or ":" in name or "#" in name:
        raise UserError(f"bad source/variant name {name!r}: use lower case, '-' not '_', no ':', '#' or spaces")
    if name in _SOURCES or name in _VARIANTS:
        raise UserError(f"'{name}' is registered already")


def register_builtin(name: str, load: Callable[[pathlib.Path], Dataset], help: str) -> Source:
    """Register built-in dataset ``name``; ``load(root)`` returns its :class:`Dataset`."""
    _check_new(name)
    _SOURCES[name] = src = Source(name, "builtin", load, help)
    return src


def register_file(scheme: str, arg: str, load: Callable[[pathlib.Path, str], Dataset], help: str) -> Source:
    """Register file scheme ``scheme:`` taking a ``arg`` (``"PATH"`` or ``"DIR"``); ``load(path, spec)``."""
    if arg not in ("PATH", "DIR"):
        raise UserError(f"file scheme '{scheme}': arg must be 'PATH' or 'DIR', got {arg!r}")
    _check_new(scheme)
    _SOURCES[scheme] = src = Source(scheme, "file", load, help, arg)
    return src


def register_variant(name: str, apply: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                     help: str) -> Variant:
    """Register variant ``name:`` (see :class:`Variant`)."""
    _check_new(name)
    _VARIANTS[name] = v = Variant(name, apply, help)
    return v


def source(name: str) -> Source:
    """The registered built-in or file scheme ``name`` (KeyError if none)."""
    return _SOURCES[name]


def variant(name: str) -> Variant:
    """The registered variant ``name`` (KeyError if none)."""
    return _VARIANTS[name]


class _Names(Mapping[str, str]):
    """A live, read-only {name: text} view of one kind of registered item, in registration order."""

    def __init__(self, table: Mapping[str, Source | Variant], kind: str | None, field: str) -> None:
        self._table, self._kind, self._field = table, kind, field

    def _has(self, item: Source | Variant) -> bool:
        return self._kind is None or getattr(item, "kind", None) == self._kind

    def __getitem__(self, name: str) -> str:
        item = self._table[name]
        if not self._has(item):
            raise KeyError(name)
        return getattr(item, self._field)

    def __iter__(self) -> Iterator[str]:
        return (n for n, item in list(self._table.items()) if self._has(item))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


BUILTINS: Mapping[str, str] = _Names(_SOURCES, "builtin", "help")  # name -> one-line description
FILE_PREFIXES: Mapping[str, str] = _Names(_SOURCES, "file", "arg")  # scheme -> "PATH" | "DIR"
VARIANTS: Mapping[str, str] = _Names(_VARIANTS, None, "help")  # name -> one-line description


def file_schemes() -> tuple[str, ...]:
    """The registered file schemes (``npz``, ``pkl``, ...), in registration order."""
    return tuple(FILE_PREFIXES)


def forms() -> str:
    """Every valid form, on one line: the tail of each spec error message."""
    return (
        "valid: built-ins " + ", ".join(BUILTINS)
        + "; files " + ", ".join(f"{p}:{a}" for p, a in FILE_PREFIXES.items())
        + "; variants " + ", ".join(f"{v}:SPEC" for v in VARIANTS)
        + "; class selector SPEC#CLASS"
    )


def spec_help() -> str:
    """The one-line command-line help of a dataset spec argument."""
    return (
        "dataset spec: built-in (" + ", ".join(BUILTINS) + "), "
        "file (" + ", ".join(f"{p}:{a}" for p, a in FILE_PREFIXES.items()) + "), "
        "variant (" + ", ".join(f"{v}:SPEC" for v in VARIANTS) + "), "
        "class selector SPEC#CLASS"
    )


def describe() -> str:
    """Every form with its one-line help, one per line (for long help texts and docs)."""
    rows = [(n, BUILTINS[n]) for n in BUILTINS]
    rows += [(f"{p}:{a}", _SOURCES[p].help) for p, a in FILE_PREFIXES.items()]
    rows += [(f"{v}:SPEC", h) for v, h in VARIANTS.items()]
    rows.append(("SPEC#CLASS", "only class CLASS of SPEC (a class name, else an integer label)"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {h}" for k, h in rows)


# --------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class Spec:
    """Parsed spec. ``kind`` is ``builtin`` | ``file`` | ``variant``.

    ``name`` is the builtin name, file prefix or variant name; ``arg`` the path of
    a file spec; ``inner`` the wrapped spec of a variant; ``cls`` the class selector.
    """

    kind: str
    name: str
    arg: str | None = None
    inner: "Spec | None" = None
    cls: str | None = None

    @property
    def base(self) -> "Spec":
        """This spec without its class selector."""
        return replace(self, cls=None) if self.cls is not None else self

    @property
    def canonical(self) -> str:
        if self.kind == "builtin":
            s = self.name
        elif self.kind == "file":
            s = f"{self.name}:{self.arg}"
        else:
            assert self.inner is not None
            s = f"{self.name}:{self.inner.canonical}"
        return s if self.cls is None else f"{s}#{self.cls}"

    def __str__(self) -> str:
        return self.canonical


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def norm_name(s: str) -> str:
    """Built-in and prefix names are case/whitespace-insensitive, and ``_`` means ``-``."""
    return "".join(s.split()).lower().replace("_", "-")


def _parse_base(text: str, whole: str) -> Spec:
    text = text.strip()
    if not text:
        raise SpecError(f"empty dataset spec in {whole!r}; {forms()}")
    head, sep, rest = text.partition(":")
    if sep:
        prefix = norm_name(head)
        if prefix in FILE_PREFIXES:
            path = rest.strip()
            if not path:
                raise SpecError(
                    f"'{prefix}:' needs a {FILE_PREFIXES[prefix]}, e.g. {prefix}:/data/x"
                    f"{'.' + prefix if FILE_PREFIXES[prefix] == 'PATH' else ''}; {forms()}"
                )
            return Spec("file", prefix, arg=path)
        if prefix in VARIANTS:
            if not rest.strip():
                raise SpecError(f"'{prefix}:' needs a dataset spec after it, e.g. {prefix}:digits; {forms()}")
            return Spec("variant", prefix, inner=_parse_base(rest, whole))
        hint = suggest(prefix, [*FILE_PREFIXES, *VARIANTS])
        raise SpecError(f"unknown spec prefix '{head.strip()}:' in {whole!r}{hint}; {forms()}")
    name = norm_name(text)
    if name in BUILTINS:
        return Spec("builtin", name)
    if "#" in text:
        raise SpecError(f"class selector '#...' must come last, once, in {whole!r}; {forms()}")
    hint = suggest(name, BUILTINS)
    raise SpecError(f"unknown dataset '{text}'{hint}; {forms()}")


def parse_spec(spec: str) -> Spec:
    """Validate a spec's grammar (no I/O) and return it parsed; raises SpecError."""
    if not isinstance(spec, str):
        raise SpecError(f"dataset spec must be a string, got {type(spec).__name__}; {forms()}")
    text = spec.strip()
    if not text:
        raise SpecError(f"empty dataset spec; {forms()}")
    cls: str | None = None
    if "#" in text:
        base, _, c = text.rpartition("#")
        # "#" followed by something with a path separator belongs to a file path.
        if "/" not in c and "\\" not in c:
            c = c.strip()
            if not c:
                raise SpecError(f"empty class after '#' in {spec!r}; use SPEC#CLASS, e.g. digits#3")
            text, cls = base, c
    parsed = _parse_base(text, spec)
    return replace(parsed, cls=cls) if cls is not None else parsed


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs (``"a,rotated:b,npz:/p/x.npz"``); blanks dropped."""
    parts = [p.strip() for p in (text or "").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise SpecError(f"no dataset specs given (comma-separated list expected); {forms()}")
    return parts


def with_class(spec: str, c: str | int) -> str:
    """Canonical ``spec#c``; ``spec`` must not already carry a selector."""
    p = parse_spec(spec)
    if p.cls is not None:
        raise SpecError(f"{spec!r} already selects class '{p.cls}'; pass the spec without '#{p.cls}'")
    c = str(c).strip()
    if not c or "#" in c:
        raise SpecError(f"bad class {c!r} for {spec!r}; use a label like 3 or a class name")
    return replace(p, cls=c).canonical

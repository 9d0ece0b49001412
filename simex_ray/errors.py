"""The one rule for turning an exception into a one-line message (CLI, HTTP, logs), and the product's own
error type: what a user can fix."""

from __future__ import annotations

from typing import Iterable


class UserError(ValueError):
    """A mistake the user can fix (a bad flag, spec, file, member name...), said in one line that names the fix.

    The CLI reports these (and their subclasses) as usage errors; any other exception is reported as a bug.
    A ValueError, so code that checks values keeps catching it."""


class OperationalError(RuntimeError):
    """A run that failed for a reason outside the code and the input (a lost node, a cluster without room,
    training that crashed more often than its retries): reported in one line, not as a bug."""


class FleetError(RuntimeError):
    """A fleet directory that cannot be used; the message names the file and the fix. (Here, not in
    :mod:`simex_ray.fleet`, so that the CLI's error rule needs no torch.)"""


class UnknownMemberError(UserError, KeyError):
    """A member name a fleet does not have (also a KeyError: a lookup by name failed)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def check_members(requested: Iterable[str], available: Iterable[str]) -> list[str]:
    """``requested`` as a list when every name is one of ``available``; else :class:`UnknownMemberError` naming
    the unknown ones and what there is. The one check of member names: the CLI, the engine, Serve and batch
    scoring all ask it."""
    requested, available = list(requested), list(available)
    known = set(available)
    unknown = [n for n in requested if n not in known]
    if unknown:
        shown = ", ".join(available[:20]) + (f" and {len(available) - 20} more" if len(available) > 20 else "")
        raise UnknownMemberError(f"unknown member(s) {', '.join(unknown)}; fleet has: {shown}")
    return requested


def _lines(e: BaseException | str) -> list[str]:
    # KeyError's str() is the repr of its key ('x' in quotes); its message is args[0].
    text = e.args[0] if isinstance(e, KeyError) and e.args else e
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def one_line(e: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an error message, stripped, at most ``limit`` characters.

    An exception with no message gives its type name.
    """
    lines = _lines(e)
    text = lines[0] if lines else (type(e).__name__ if isinstance(e, BaseException) else "")
    return clip(text, limit) if limit else text


def last_line(e: BaseException | str) -> str:
    """The last non-empty line: Ray wraps a worker's error in a traceback whose last line is the error itself."""
    lines = _lines(e)
    return lines[-1] if lines else (type(e).__name__ if isinstance(e, BaseException) else "")


def squash(text: object) -> str:
    """A multi-line message as one line: whitespace runs become single spaces."""
    return " ".join(str(text).split())


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."

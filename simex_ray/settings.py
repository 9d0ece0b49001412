"""Frozen settings dataclasses from presets or JSON files: the one rule of every ``--protocol`` and
``--preset`` flag. Errors are one line and name the valid choices."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, TypeVar
from .errors import UserError

T = TypeVar("T")


def settings_from_dict(cls: type[T], d: Mapping[str, Any], what: str) -> T:
    """A frozen settings dataclass from a JSON object: unknown keys are a one-line error naming the
    known ones; lists become tuples."""
    if not isinstance(d, dict):
        raise UserError(f"need a JSON object of {what} settings")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_settings(text: str | None, presets: Mapping[str, T], *, what: str, default: str = "default",
                  base: str | None = None) -> T:
    """``None``: the ``default`` preset; a preset name; or a JSON file of fields.

    A file's fields override a preset: its ``"base"`` key names it, else ``base`` (else ``default``).
    """
    if text is None:
        return presets[default]
    if text in presets:
        return presets[text]
    path = Path(text)
    if not path.is_file():
        raise UserError(f"unknown {what} '{text}'; known: {', '.join(presets)}, or a JSON file of "
                         f"{what} settings")
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} file {text}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise UserError(f"{what} file {text}: need a JSON object of {what} settings")
    start = fields.pop("base", base or default)
    if start not in presets:
        raise UserError(f"{what} file {text}: unknown base '{start}'; presets: {', '.join(presets)}")
    cls = type(presets[start])
    try:
        return settings_from_dict(cls, {**dataclasses.asdict(presets[start]), **fields}, what)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what} file {text}: {e}") from None

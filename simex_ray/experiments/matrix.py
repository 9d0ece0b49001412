"""Delta matrix: every unknown dataset against every fleet member.

Rows are unknown datasets (their held-out test split by default, the same
5:1 split ``simex train`` uses), columns are reference autoencoders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import data
from ..fleet import Fleet
from ..data.unknown import conversion_note, read_unknown
from ..errors import UserError
from ..results import write_json, write_table

log = logging.getLogger(__name__)


def delta_matrix(fleet: Fleet, unknown: list[str], *, samples: int | None = None, seed: int = 0,
                 split: str = "test", loss: str | None = None, data_dir=None,
                 on_row: Callable[[str, dict], None] | None = None, strict: bool = False,
                 on_scored: Callable[[str, np.ndarray, Any], None] | None = None,
                 score_spec: Callable[[str], tuple[Any, str | None]] | None = None) -> dict[str, Any]:
    """Delta(X_i | Y_j) for each unknown spec i and member j; each unknown converted to the fleet's
    format by the rule (``strict``: refused), what was converted listed under ``conversions``.
    ``on_scored(spec, images, ScoreResult)`` sees each unknown's images and answer (e.g. to draw them).
    ``score_spec(spec) -> (ScoreResult, conversion)`` scores an unknown instead (e.g. on Ray Data: no images
    are read here, and ``on_scored`` is not called)."""
    if split not in ("test", "train", "all"):
        raise UserError(f"unknown split '{split}'; known: test, train, all")
    for spec in unknown:
        data.parse_spec(spec)
    members = fleet.names
    delta, normalized, rankings, sizes = [], [], {}, {}
    cache: dict = {}  # each base dataset read and derived once, however many 'SPEC#c' rows cut from it
    fmt = fleet.image_format
    conv = dict(fmt=fmt, strict=strict)
    conversions = {}
    for spec in unknown:
        if score_spec is not None:
            result, step = score_spec(spec)
            if step:
                conversions[spec] = step
            _row(spec, result, members, delta, normalized, rankings, sizes, on_row)
            continue
        x, _ = read_unknown(spec, split=split, samples=samples, seed=seed, data_dir=data_dir, stream=False,
                            cache=cache, **conv)
        step = conversion_note(spec, fmt, seed=seed, data_dir=data_dir, cache=cache)
        if step:
            conversions[spec] = step
        result = fleet.score(x, loss=loss)
        if on_scored is not None:
            on_scored(spec, x, result)
        _row(spec, result, members, delta, normalized, rankings, sizes, on_row)
    matched = [spec for spec in unknown if spec in members]
    return {
        "unknown": unknown,
        "references": members,
        "loss": loss or fleet.loss,
        "split": split,
        "image_format": str(fmt),
        "conversions": conversions,
        "seed": seed,
        "n": sizes,
        "delta": delta,
        "delta_normalized": normalized,
        "ranking": rankings,
        "most_similar": {spec: rankings[spec][0] for spec in unknown},
        # For unknowns that are also references: does each rank itself first?
        "self_top1": {spec: rankings[spec][0] == spec for spec in matched},
    }


def _row(spec, result, members, delta, normalized, rankings, sizes, on_row) -> None:
    delta.append([result.delta[m] for m in members])
    normalized.append([result.delta_normalized[m] for m in members])
    rankings[spec], sizes[spec] = result.ranking, result.n
    if on_row is not None:
        on_row(spec, result.to_json())


def write_matrix(result: dict[str, Any], out_dir, name: str = "delta_matrix") -> dict[str, Path]:
    """Write ``name``.json, ``name``.parquet (long table) and ``name``.png (heatmap)."""
    from ..plots import heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "parquet": out / f"{name}.parquet", "png": out / f"{name}.png"}
    write_json(paths["json"], result)
    rows = [
        {"unknown": u, "reference": r, "delta": result["delta"][i][j],
         "delta_normalized": result["delta_normalized"][i][j]}
        for i, u in enumerate(result["unknown"]) for j, r in enumerate(result["references"])
    ]
    write_table(paths["parquet"], rows)
    heatmap(result["delta"], result["unknown"], result["references"], paths["png"],
            title=f"Δ(X | Y), {result['loss']} ({result['split']} split; box = most similar)",
            xlabel="reference autoencoder Y", ylabel="unknown data X")
    return paths


def format_matrix(result: dict[str, Any]) -> str:
    """The matrix as a fixed-width text table; '*' marks each row's minimum."""
    from ..names import display_names

    shown = display_names([*result["unknown"], *result["references"]])
    refs = [shown[r] for r in result["references"]]
    unknown = [shown[u] for u in result["unknown"]]
    corner = "unknown X / reference Y"
    w0 = max(len(u) for u in unknown + [corner])
    w = max(10, *(len(r) for r in refs))
    lines = [f"{corner:<{w0}}  " + "  ".join(f"{r:>{w}}" for r in refs)]
    for u, row in zip(unknown, result["delta"]):
        best = int(np.argmin(row))
        cells = [f"{v:.5f}{'*' if j == best else ' '}" for j, v in enumerate(row)]
        lines.append(f"{u:<{w0}}  " + "  ".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)

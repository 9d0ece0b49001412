"""Figures (matplotlib, headless). Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from .errors import UserError
from .results import write_figure


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never needs a display
    import matplotlib.pyplot as plt

    return plt


def heatmap(matrix, rows: Sequence[str], cols: Sequence[str], path, *, title: str,
            xlabel: str, ylabel: str, cmap: str = "viridis_r", fmt: str = "{:.3g}",
            mark_row_min: bool = True) -> Path:
    """Annotated heatmap; with ``mark_row_min`` each row's smallest cell is boxed.

    Row and column names are shown by the display-name rule (``simex_ray.names``).
    """
    from .names import display_names

    shown = display_names([*rows, *cols])
    rows, cols = [shown[r] for r in rows], [shown[c] for c in cols]
    plt = pyplot()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.0 + 0.6 * len(rows)), dpi=120)
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = m[np.isfinite(m)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if (cmap.endswith("_r") and m[i, j] > mid) or (not cmap.endswith("_r") and m[i, j] < mid) else "black")
        if mark_row_min and np.isfinite(m[i]).any():
            j = int(np.nanargmin(m[i]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out, write and close ``fig``; creates the folder."""
    fig.tight_layout()
    path = write_figure(path, fig)
    pyplot().close(fig)
    return path


def image_grid(rows: Sequence[np.ndarray], path, *, row_labels: Sequence[str], cell_labels=None,
               title: str | None = None, cell_inches: float = 1.15) -> Path:
    """A grid of images: one row per array (k, C, H, W) of floats in [0, 1], at most k columns.

    C = 3 is shown as RGB, C = 1 with a grey colormap (black 0, white 1; never rescaled, so rows
    compare). ``row_labels``: one per row, left of it; ``cell_labels``: per row a list of texts
    shown under each image (None: none). Rows may be shorter than the longest (blank cells).
    """
    plt = pyplot()
    rows = [np.asarray(r, dtype=np.float32) for r in rows]
    if len(row_labels) != len(rows):
        raise UserError(f"{len(rows)} rows but {len(row_labels)} row labels")
    for r in rows:
        if r.ndim != 4 or r.shape[1] not in (1, 3):
            raise UserError(f"each row must be images (k, C, H, W) with C 1 or 3, got shape {r.shape}")
    ncols = max(1, *(len(r) for r in rows)) if rows else 1
    h, w = rows[0].shape[2:] if rows else (1, 1)
    aspect = h / w
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False, dpi=100,
                             figsize=(1.8 + cell_inches * ncols, 0.5 + (cell_inches * aspect + 0.35) * len(rows)))
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.set_axis_off()
                continue
            img = np.clip(row[j], 0.0, 1.0)
            if img.shape[0] == 3:
                ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
            else:
                ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if cell_labels is not None and cell_labels[i] is not None:
                ax.set_xlabel(cell_labels[i][j], fontsize=8)
        axes[i, 0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)

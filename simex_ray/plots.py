"""Figures (matplotlib, headless). Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path

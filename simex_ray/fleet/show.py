"""Seeing why: unknown images next to their reconstructions by the most similar references (the paper's
Fig. 1a).

:func:`reconstruction_grid` is the data (which images, which references, every reconstruction and its
δ); :func:`draw_reconstructions` draws it; :func:`show_reconstructions` does both for one unknown
dataset and :func:`show_matrix` for several, one PNG each. The references are the first ``top`` of
``result.ranking`` (the ranking the result was scored with); each reconstruction is labelled with its
δ, computed by the fleet's scoring engine with the result's loss, so the label is the very per-sample
δ that went into Δ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from ..formats import convert
from ..losses import LOSSES
from ..names import display_names
from .fleet import Fleet
from .manifest import slug
from .result import ScoreResult
from ..errors import UserError, UnknownMemberError

# Each ranking's per-reference value, shown beside Δ when the ranking is not raw Δ.
_RANKED_BY = {"normalized": "delta_normalized", "calibrated": "delta_calibrated",
              "in_distribution": "in_distribution", "typicality": "typicality", "distribution": "distribution",
              "typicality_latent": "typicality_latent"}


@dataclass
class ReconstructionGrid:
    """k unknown images and their reconstructions by the top references, with δ per image.

    ``index``: (k,) positions of the images in the unknown data, ascending; ``inputs``: (k, C, H, W);
    ``references``: member names, most similar first; ``reconstructions``: (top, k, C, H, W);
    ``delta``: (top, k) per-image δ (``loss``); ``dataset_delta``: Δ(X | reference), (top,), from the
    result; ``method``: the ranking that chose the references, ``score``: each reference's value under
    it, (top,) (None where the result has none).
    """

    index: np.ndarray
    inputs: np.ndarray
    references: list[str]
    reconstructions: np.ndarray
    delta: np.ndarray
    dataset_delta: np.ndarray
    loss: str
    method: str
    score: list[float | None]

    def cell_labels(self) -> list[list[str]]:
        """The text under each reconstruction: its δ."""
        return [[f"δ={v:.4g}" for v in row] for row in self.delta]

    def row_labels(self, among: Iterable[str] = ()) -> list[str]:
        """'input X' and, per reference, its rank, display name (next to ``among``) and Δ."""
        shown = display_names([*self.references, *among])
        labels = ["input X"]
        for r, (name, d, s) in enumerate(zip(self.references, self.dataset_delta, self.score), start=1):
            extra = f"\n{self.method} {s:.4g}" if self.method != "raw" and s is not None else ""
            labels.append(f"#{r} {shown[name]}\nΔ={d:.4g}{extra}")
        return labels


def sample_images(x, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of ``k`` images of ``x`` (N, C, H, W): (positions ascending, images).

    ``x`` is an array (or memory map, or tensor) or an iterable of such blocks, read once; both give
    the same sample for the same seed and images (each image draws one uniform key from the seeded
    generator, in order; the k smallest keys win), and memory stays at k images for a stream.
    """
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    blocks = [x] if isinstance(x, np.ndarray) or hasattr(x, "__getitem__") and hasattr(x, "__len__") else x
    keys, index, images = np.zeros(0), np.zeros(0, dtype=np.int64), None
    offset = 0
    for block in blocks:
        if torch.is_tensor(block):
            block = block.detach().cpu().numpy()
        n = len(block)
        if n == 0:
            continue
        block_keys = rng.random(n)
        take = np.sort(np.argsort(block_keys, kind="stable")[:k])  # only these can be among the k smallest
        new = np.asarray(block[take], dtype=np.float32)
        keys = np.concatenate([keys, block_keys[take]])
        index = np.concatenate([index, take + offset])
        images = new if images is None else np.concatenate([images, new])
        keep = np.sort(np.argsort(keys, kind="stable")[:k])
        keys, index, images = keys[keep], index[keep], images[keep]
        offset += n
    if images is None:
        raise UserError("no images to show")
    return index, images


@torch.inference_mode()
def reconstruction_grid(fleet: Fleet, x, result: ScoreResult, *, k: int = 8, top: int = 3,
                        seed: int = 0) -> ReconstructionGrid:
    """The data of the figure: ``k`` images of ``x`` (a seeded sample, :func:`sample_images`) through the
    first ``top`` references of ``result.ranking``.

    ``x``: the unknown images ``result`` was scored on, (N, C, H, W) in [0, 1] (an iterable of blocks is
    read once); images not in the fleet's format are converted by the rule of
    :mod:`simex_ray.formats`. δ uses the result's loss (each member's own when the result's is "mixed").
    """
    if top < 1:
        raise UserError(f"top must be >= 1, got {top}")
    references = result.ranking[:top]
    missing = [n for n in references if n not in fleet.models]
    if missing:
        raise UnknownMemberError(f"the result ranks member(s) {', '.join(missing)} that this fleet lacks; fleet has: "
                       f"{', '.join(fleet.names)}")
    index, inputs = sample_images(x, k, seed)
    inputs = convert(inputs, fleet.image_format)
    loss = result.loss if result.loss in LOSSES else None
    delta = fleet.engine.per_sample(inputs, references, loss)  # (top, k): the scoring engine's own δ
    xt = torch.as_tensor(inputs).to(fleet.device)
    recon = np.stack([fleet.models[name](xt).float().cpu().numpy() for name in references])  # (top, k, C, H, W)
    scores = getattr(result, _RANKED_BY[result.method]) if result.method in _RANKED_BY else result.delta
    return ReconstructionGrid(
        index=index, inputs=inputs, references=list(references), reconstructions=recon, delta=delta,
        dataset_delta=np.array([result.delta[n] for n in references]), loss=result.loss, method=result.method,
        score=[scores.get(n) for n in references])


def draw_reconstructions(grid: ReconstructionGrid, out_png, *, title: str | None = None) -> Path:
    """Draw ``grid``: the inputs on top, one row of reconstructions per reference under it; returns the
    PNG's path."""
    from ..plots import image_grid

    if title is None:
        title = (f"reconstructions by the {len(grid.references)} most similar references "
                 f"(δ = {grid.loss}, ranking {grid.method}; smaller = more similar)")
    return image_grid([grid.inputs, *grid.reconstructions], out_png, row_labels=grid.row_labels(),
                      cell_labels=[None, *grid.cell_labels()], title=title)


def show_reconstructions(fleet: Fleet, x, result: ScoreResult, out_png, *, k: int = 8, top: int = 3,
                         seed: int = 0, title: str | None = None) -> Path:
    """Write the figure of :func:`reconstruction_grid` to ``out_png`` (folders created); returns its path."""
    grid = reconstruction_grid(fleet, x, result, k=k, top=top, seed=seed)
    return draw_reconstructions(grid, out_png, title=title)


def show_path(out_dir, unknown: str) -> Path:
    """Where :func:`show_matrix` writes the figure of ``unknown``: ``OUT_DIR/<slug>.png``, the slug of
    fleet weight files (readable, file-system safe, unique per spec: ``rotated_digits-1f0e3dad.png``)."""
    return Path(out_dir) / f"{slug(unknown)}.png"


def show_matrix(fleet: Fleet, unknowns: Mapping[str, object] | Iterable[tuple[str, object]], out_dir, *,
                results: Mapping[str, ScoreResult] | None = None, k: int = 8, top: int = 3, seed: int = 0,
                loss: str | None = None, method: str | None = None) -> dict[str, Path]:
    """One :func:`show_reconstructions` figure per unknown dataset, at :func:`show_path`.

    ``unknowns``: spec -> images (N, C, H, W), as a mapping or (spec, images) pairs (read one at a time);
    ``results``: the results already scored, by spec; an unknown without one is scored here with
    ``loss`` and ``method`` (an iterable of blocks is then read into memory once, to be scored and shown). Returns {spec: PNG path}, in the given order.
    """
    results = results or {}
    pairs = list(unknowns.items()) if isinstance(unknowns, Mapping) else unknowns
    out: dict[str, Path] = {}
    for spec, x in pairs:
        result = results.get(spec)
        if result is None:
            if not (hasattr(x, "__getitem__") and hasattr(x, "__len__")):  # a stream: scored and shown, so kept
                x = np.concatenate([np.asarray(b, dtype=np.float32) for b in x])
            result = fleet.score(x, loss=loss, method=method)
        out[spec] = show_reconstructions(fleet, x, result, show_path(out_dir, spec), k=k, top=top, seed=seed,
                                         title=f"{spec}: reconstructions by its {top} most similar references "
                                               f"(δ = {result.loss}, ranking {result.method})")
    return out

"""The answer of a fleet to unknown data: Δ per member, every ranking, calibration and composition.

:class:`ScoreResult` and :data:`SCORE_FIELDS` are the one answer contract: ``simex score --json``, the
HTTP response of ``POST /v1/score`` and ``simex query --json`` are all derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .manifest import Member

QUANTILES = np.linspace(0.0, 1.0, 101)
IN_DISTRIBUTION_LEVEL = 0.95
# How `ranking` orders references: the one measured best on the offline suite (README, "Which ranking":
# raw Δ put every dataset's own reference first in 77 of 80 cases, typicality 71, calibrated 51); every
# ranking is in the output all the same.
RANKINGS = ("raw", "normalized", "calibrated", "in_distribution", "typicality")
DEFAULT_RANKING = "raw"


def calibration_of(per_sample: np.ndarray) -> dict[str, Any]:
    """A member's own held-out δ distribution as a quantile sketch (101 quantiles, the mean, n)."""
    d = np.asarray(per_sample, dtype=np.float64)
    if not len(d):
        return {}
    return {"quantiles": np.quantile(d, QUANTILES).tolist(), "mean": float(d.mean()), "n": int(len(d))}


def percentile_in(calibration: dict[str, Any], delta: np.ndarray) -> np.ndarray:
    """Where each δ falls in the member's own held-out distribution: 0 (best) .. 1 (worst seen)."""
    q = np.asarray(calibration["quantiles"], dtype=np.float64)
    return np.interp(delta, q, QUANTILES, left=0.0, right=1.0)


# The answer contract: every key of ``ScoreResult.to_json`` in order. The CLI JSON, the HTTP response
# model and `simex query` are derived from this list (a test fails if any of them drops a field).
SCORE_FIELDS = ("n", "loss", "ranking_method", "ranking", "delta", "ranking_raw", "delta_normalized",
                "ranking_normalized", "delta_calibrated", "ranking_calibrated", "in_distribution",
                "ranking_in_distribution", "typicality", "ranking_typicality", "composition")


@dataclass
class ScoreResult:
    """Δ of one unknown dataset against every member, four ways; smaller Δ = more similar.

    ``delta``: mean δ (raw). ``delta_normalized``: divided by the reference's
    mean L2 sample norm (paper section 5.3). ``delta_calibrated``: divided by
    the reference's own held-out Δ(Y_test | Y), so 1 means "as well as the
    reference's own unseen data". ``in_distribution``: the share of samples
    whose δ lies below the reference's own 95th percentile (larger = more
    similar). A reference without a calibration sketch gets None for the last
    two. ``typicality``: |log(Δ / Δ(Y_test | Y))|, two-sided: 0 when X reconstructs exactly as well
    as the reference's own unseen data, larger when it reconstructs worse *or better* (data easier
    than the reference's own, such as smooth upscaled digits, is not "like" it either).
    ``ranking`` follows ``method`` (default :data:`DEFAULT_RANKING`).
    ``composition``: the share of samples whose nearest member (per sample, by
    the same method) is each reference.
    """

    n: int
    loss: str
    delta: dict[str, float]
    delta_normalized: dict[str, float]
    delta_calibrated: dict[str, float | None] = field(default_factory=dict)
    in_distribution: dict[str, float | None] = field(default_factory=dict)
    typicality: dict[str, float | None] = field(default_factory=dict)
    composition: dict[str, float] = field(default_factory=dict)
    method: str = DEFAULT_RANKING
    per_sample: np.ndarray | None = field(default=None, repr=False)  # (members, N) raw δ
    nearest: list[str] | None = field(default=None, repr=False)  # per sample, by ``method``
    nearest_score: np.ndarray | None = field(default=None, repr=False)  # its per-sample score under ``method``

    def ranking_by(self, method: str) -> list[str]:
        from ..ranking import rank

        if method not in RANKINGS:
            raise ValueError(f"unknown ranking '{method}'; known: {', '.join(RANKINGS)}")
        scores = {"raw": self.delta, "normalized": self.delta_normalized, "calibrated": self.delta_calibrated,
                  "in_distribution": self.in_distribution, "typicality": self.typicality}[method]
        known = {k: v for k, v in scores.items() if v is not None}
        missing = sorted(k for k in self.delta if k not in known)  # uncalibrated members go last
        return rank(known, reverse=method == "in_distribution") + missing

    @property
    def ranking(self) -> list[str]:
        return self.ranking_by(self.method)

    @property
    def ranking_raw(self) -> list[str]:
        return self.ranking_by("raw")

    @property
    def ranking_normalized(self) -> list[str]:
        return self.ranking_by("normalized")

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "loss": self.loss, "ranking_method": self.method, "ranking": self.ranking,
                "delta": self.delta, "ranking_raw": self.ranking_raw,
                "delta_normalized": self.delta_normalized, "ranking_normalized": self.ranking_normalized,
                "delta_calibrated": self.delta_calibrated, "ranking_calibrated": self.ranking_by("calibrated"),
                "in_distribution": self.in_distribution,
                "ranking_in_distribution": self.ranking_by("in_distribution"),
                "typicality": self.typicality, "ranking_typicality": self.ranking_by("typicality"),
                "composition": self.composition}

    def per_sample_table(self, names: list[str], labels=None):
        """One row per sample: index, label, δ per member, nearest member, its calibrated score."""
        import pandas as pd

        if self.per_sample is None:
            raise ValueError("scored without per-sample values")
        table = {"index": np.arange(self.n)}
        if labels is not None:
            table["label"] = np.asarray(labels)
        for k, name in enumerate(names):
            table[f"delta/{name}"] = self.per_sample[k]
        table["nearest"] = self.nearest
        table[f"nearest_{self.method}"] = self.nearest_score
        return pd.DataFrame(table)


def per_sample_scores(method: str, per_sample: np.ndarray, members: list["Member"]) -> np.ndarray | None:
    """(members, N) per-sample scores under ``method``, smaller = nearer; None when a member lacks
    what the method needs (a calibration sketch)."""
    d = np.asarray(per_sample, dtype=np.float64)
    if method == "raw":
        return d
    if method == "normalized":
        return d / np.array([m.metrics.get("ref_mean_l2", 1.0) for m in members])[:, None]
    if any(not m.calibration for m in members):
        return None
    if method == "calibrated":
        return d / np.array([m.calibration["mean"] for m in members])[:, None]
    if method == "in_distribution":  # per sample: its percentile in each member's own distribution
        return np.stack([percentile_in(m.calibration, row) for m, row in zip(members, d)])
    if method == "typicality":  # per sample: how far from the middle of each member's own distribution
        return np.stack([np.abs(percentile_in(m.calibration, row) - 0.5) for m, row in zip(members, d)])
    raise ValueError(f"unknown ranking '{method}'; known: {', '.join(RANKINGS)}")


def score_result(per_sample: np.ndarray, members: list["Member"], loss: str, method: str = DEFAULT_RANKING,
                 keep_per_sample: bool = False) -> ScoreResult:
    """Every aggregate, ranking and the composition from the (members, N) per-sample δ."""
    names = [m.name for m in members]
    d = np.asarray(per_sample, dtype=np.float64)
    mean = d.mean(axis=1)
    delta = dict(zip(names, mean.tolist()))
    norm = {m.name: delta[m.name] / m.metrics.get("ref_mean_l2", 1.0) for m in members}
    calibrated = {m.name: (delta[m.name] / m.calibration["mean"] if m.calibration else None) for m in members}
    in_dist = {}
    for m, row in zip(members, d):
        in_dist[m.name] = (float(np.mean(row < m.calibration["quantiles"][int(IN_DISTRIBUTION_LEVEL * 100)]))
                           if m.calibration else None)
    with np.errstate(divide="ignore"):
        typical = {m.name: (float(abs(np.log(delta[m.name] / m.calibration["mean"]))) if m.calibration else None)
                   for m in members}
    scores = per_sample_scores(method, d, members)
    used = method
    if scores is None:  # a member without a calibration sketch: rank by raw Δ
        used, scores = "raw", d
    nearest_idx = np.argmin(scores, axis=0)
    nearest = [names[i] for i in nearest_idx]
    composition = {name: float(np.mean(nearest_idx == k)) for k, name in enumerate(names)}
    return ScoreResult(n=d.shape[1], loss=loss, delta=delta, delta_normalized=norm, delta_calibrated=calibrated,
                       in_distribution=in_dist, typicality=typical, composition=composition, method=used,
                       per_sample=d if keep_per_sample else None, nearest=nearest if keep_per_sample else None,
                       nearest_score=scores[nearest_idx, np.arange(d.shape[1])] if keep_per_sample else None)




def mean_l2_norm(x) -> float:
    """Mean L2 norm of the samples (N, 1, 28, 28): the paper's normaliser (section 5.3)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return float(np.linalg.norm(x, axis=1).mean()) if len(x) else 1.0

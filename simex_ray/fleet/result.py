"""The answer of a fleet to unknown data: Δ per member, every ranking, calibration and composition.

:class:`ScoreResult` and :data:`SCORE_FIELDS` are the one answer contract: ``simex score --json``, the
HTTP response of ``POST /v1/score`` and ``simex query --json`` are all derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from . import mixture
from .manifest import Member
from ..choices import DEFAULT_RANKING, LATENT_RANKING, RANKINGS
from ..errors import UserError

QUANTILES = np.linspace(0.0, 1.0, 101)
IN_DISTRIBUTION_LEVEL = 0.95
# How `ranking` orders references (the names in :mod:`simex_ray.choices`): chosen on the first half of
# bench/rankings.py's suites and kept because it also won on the second (docs/results.md, "Rankings that
# hold"): typicality_latent where every member has latent moments, distribution otherwise
# (:func:`default_ranking`); every ranking is in the output all the same.
# An answer whose carried rankings agree on its first member less than this is flagged (`confident` false; the
# CLI prints one line). Measured on bench/rankings.py: docs/results.md, "Rankings that hold".
WEAK_AGREEMENT = 0.6


def calibration_of(per_sample: np.ndarray) -> dict[str, Any]:
    """A member's own held-out δ distribution as a quantile sketch (101 quantiles, the mean, n)."""
    d = np.asarray(per_sample, dtype=np.float64)
    if not len(d):
        return {}
    return {"quantiles": np.quantile(d, QUANTILES).tolist(), "mean": float(d.mean()), "n": int(len(d))}


# The distribution ranking: X's δ through a member against the member's own held-out δ (its calibration
# sketch), as a distance between distributions. In the member's own percentile space, where its own unseen
# data is uniform, the Wasserstein-1 distance of X's percentiles from U(0, 1), plus how far X's δ falls
# outside the held-out range, in units of the held-out log-δ interquartile range (below the best and above the
# worst: both directions count). Everything is a mean over images, so batches merge exactly (a sketch of
# SKETCH_LEVELS shares and two tail means per member).
SKETCH_LEVELS = np.linspace(0.0, 1.0, 21)


def distribution_sketch(calibration: dict[str, Any], delta: np.ndarray) -> list[float]:
    """[mean shortfall below the held-out range, share of X at or below each of SKETCH_LEVELS in the member's
    percentile space, mean excess above the range] of per-sample δ ``delta`` (shortfall and excess in log δ,
    divided by the held-out log-δ interquartile range)."""
    q = np.asarray(calibration["quantiles"], dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    pct = percentile_in(calibration, d)
    log_q, log_d = np.log(np.maximum(q, 1e-12)), np.log(np.maximum(d, 1e-12))
    scale = max(float(log_q[75] - log_q[25]), 1e-6)
    below = np.maximum(log_q[0] - log_d, 0.0) / scale
    above = np.maximum(log_d - log_q[-1], 0.0) / scale
    shares = (pct[None, :] <= SKETCH_LEVELS[:, None] + 1e-12).mean(axis=1)
    return [float(below.mean()), *shares.tolist(), float(above.mean())]


def distribution_of(sketch: list[float]) -> float:
    """The distance of a :func:`distribution_sketch`: W1 of the percentiles from uniform (trapezoids over the
    levels) plus both tail terms; 0 = distributed exactly like the member's own unseen data."""
    s = np.asarray(sketch, dtype=np.float64)
    gap = np.abs(s[1:-1] - SKETCH_LEVELS)
    return float(np.trapezoid(gap, SKETCH_LEVELS) + s[0] + s[-1])


def percentile_in(calibration: dict[str, Any], delta: np.ndarray) -> np.ndarray:
    """Where each δ falls in the member's own held-out distribution: 0 (best) .. 1 (worst seen)."""
    q = np.asarray(calibration["quantiles"], dtype=np.float64)
    return np.interp(delta, q, QUANTILES, left=0.0, right=1.0)


# The answer contract: one row per key of ``ScoreResult.to_json``, in its order:
#   (JSON type, how a whole dataset's value follows from its batches', description).
# The HTTP response model (``api.score_response_model``) is built from the types, and
# :func:`merge_results` (what `simex query` runs on its batch answers) from the second column:
#   "sum": added; "same": one value for every batch; "mean": the batch-size weighted mean of the
#   batches' values (a per-member mean or share over images); "derived": computed from the merged
#   values, never averaged (typicality from delta_calibrated, every ranking by ScoreResult).
# ``ScoreResult.to_json`` writes exactly these keys, in this order; a row naming no value of ScoreResult,
# or with an unknown merge, fails at import (``_check_contract``).
SCORE_CONTRACT: dict[str, tuple[Any, str, str]] = {
    "n": (int, "sum", "number of images scored"),
    "loss": (str, "same", "reconstruction error δ: mse or issim"),
    "ranking_method": (str, "same", "how `ranking` orders members: " + ", ".join(RANKINGS)),
    "ranking": (list[str], "derived", "members, most similar first"),
    "delta": (dict[str, float], "mean", "Δ(X | member) per member; smaller = more similar"),
    "ranking_raw": (list[str], "derived", "members by Δ, smallest first"),
    "delta_normalized": (dict[str, float], "mean", "Δ / the reference's mean L2 sample norm"),
    "ranking_normalized": (list[str], "derived", "members by normalized Δ, smallest first"),
    "delta_calibrated": (dict[str, float | None], "mean",
                         "Δ / Δ(Y_test | Y), the reference's own held-out Δ (1 = like its own unseen data); "
                         "null for a member without a calibration sketch"),
    "ranking_calibrated": (list[str], "derived", "members by calibrated Δ, smallest first"),
    "in_distribution": (dict[str, float | None], "mean",
                        "share of images whose δ is below the reference's own 95th percentile"),
    "ranking_in_distribution": (list[str], "derived", "members by in_distribution, largest first"),
    "typicality": (dict[str, float | None], "derived",
                   "|log(Δ / Δ(Y_test | Y))|: 0 = reconstructs exactly like the reference's own unseen data"),
    "ranking_typicality": (list[str], "derived", "members by typicality, smallest first"),
    "distribution_sketch": (dict[str, list[float] | None], "mean",
                            "per member: X's δ in the member's own held-out δ distribution (mean shortfall below its "
                            "range, the shares at or below 21 percentile levels, mean excess above; the tails in "
                            "held-out log-δ interquartile ranges); null without a calibration sketch"),
    "distribution": (dict[str, float | None], "derived",
                     "distance of X's δ distribution from the member's own held-out one (W1 in its percentile space "
                     "plus the tails); 0 = distributed like the reference's own unseen data"),
    "ranking_distribution": (list[str], "derived", "members by distribution, smallest first"),
    "latent_calibrated": (dict[str, float | None], "mean",
                          "mean latent distance z of X's bottleneck codes from the member's training codes "
                          "(Mahalanobis, Ledoit-Wolf), divided by that of the reference's own held-out split (1 = "
                          "like its own unseen data); null for a member without latent moments"),
    "typicality_latent": (dict[str, float | None], "derived",
                          "|log(delta_calibrated)| + |log(latent_calibrated)|: typicality in δ and in the codes; "
                          "0 = like the reference's own unseen data in both"),
    "ranking_typicality_latent": (list[str], "derived", "members by typicality_latent, smallest first"),
    "composition_method": (str, "same", "how `composition` was estimated: matching (distribution matching "
                           "against the fleet's cross sketches) or nearest (the share of images nearest to each "
                           "member; fleets without cross sketches, or a subset of their members)"),
    "composition_gram": (dict[str, list[float]], "same",
                         "matching: per member, its row of AᵀA, A the references' predicted δ statistics (fixed by "
                         "the fleet); empty with nearest"),
    "composition_moments": (dict[str, float], "mean",
                            "matching: per member, Aᵀb, b X's δ CDF shares on every member's grid and its shares "
                            "nearest to each member (a mean over images); empty with nearest"),
    # with matching, merge_results solves composition again from the merged moments (never averaged)
    "composition": (dict[str, float], "mean",
                    "the estimated share of X from each reference: matching, the mixture weights π (≥ 0, Σ = 1) "
                    "solved from composition_gram and composition_moments; nearest, the share of images nearest "
                    "to each member"),
    "agreement": (float, "derived", "share of the carried rankings (" + ", ".join(RANKINGS) + ") that put `ranking`'s "
                  "first member first (rankings a member has no value for are left out); 1 = they all agree"),
    "margin": (float | None, "derived", "how far `ranking`'s second member is behind its first, in "
               "`ranking_method`'s units (Δ for raw); null with fewer than two members"),
    "confident": (bool, "derived", f"agreement >= {WEAK_AGREEMENT}: false marks an answer to check"),
}
SCORE_FIELDS = tuple(SCORE_CONTRACT)
MERGES = ("sum", "same", "mean", "derived")


def distributions_of(sketches: dict[str, list[float] | None]) -> dict[str, float | None]:
    """The distribution distance per member from its sketch (None stays None); derived, never averaged."""
    return {name: (None if sk is None else distribution_of(sk)) for name, sk in sketches.items()}


def typicality_latent(delta_calibrated, latent_calibrated):
    """|log(Δ / own Δ)| + |log(z̄ / own z̄)|, elementwise: the ``typicality_latent`` ranking's one formula.

    ``delta_calibrated``: mean δ of X through a member over the mean δ of the member's own held-out split;
    ``latent_calibrated``: mean latent distance z of X's codes over that of the own held-out split (scalars,
    or arrays of them: one per member). Both terms are two-sided: a set that reconstructs, or codes, *better*
    than the reference's own unseen data is not like it either. 0 only when X is like the member's own unseen
    data in both. A ratio that is not positive (0, or NaN) gives inf: such a member is never first. O(1) per
    member. bench/rankings.py benchmarks this very function (docs/results.md, "Rankings that hold")."""
    a, b = np.asarray(delta_calibrated, dtype=np.float64), np.asarray(latent_calibrated, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.abs(np.log(np.where(a > 0, a, 0.0))) + np.abs(np.log(np.where(b > 0, b, 0.0))))


def typicality_latents_of(delta_calibrated: dict[str, float | None],
                          latent_calibrated: dict[str, float | None]) -> dict[str, float | None]:
    """:func:`typicality_latent` per member (None where either ratio is None); derived, never averaged."""
    out = {}
    for name, a in delta_calibrated.items():
        b = latent_calibrated.get(name)
        out[name] = None if a is None or b is None else float(typicality_latent(a, b))
    return out


def has_latent(member: "Member") -> bool:
    """Whether a member has latent moments to rank by (fleets trained before them have none)."""
    return bool(member.latent.get("file")) and float(member.latent.get("own_mean", 0.0)) > 0 \
        and bool(member.calibration)


def default_ranking(members: list["Member"]) -> str:
    """The ranking of an answer that names none: :data:`LATENT_RANKING` when every member has latent moments,
    :data:`DEFAULT_RANKING` otherwise (an older fleet)."""
    return LATENT_RANKING if members and all(has_latent(m) for m in members) else DEFAULT_RANKING


def typicality_of(delta_calibrated: dict[str, float | None]) -> dict[str, float | None]:
    """|log(Δ / Δ(Y_test | Y))| per member from its calibrated Δ (None stays None): the one rule, used
    by :func:`score_result` and by :func:`merge_results`. It is not a mean over images."""
    with np.errstate(divide="ignore"):
        return {name: (None if v is None else float(abs(np.log(v)))) for name, v in delta_calibrated.items()}


@dataclass
class ScoreResult:
    """Δ of one unknown dataset against every member, every way; smaller Δ = more similar.

    ``delta``: mean δ (raw). ``delta_normalized``: divided by the reference's
    mean L2 sample norm (paper section 5.3). ``delta_calibrated``: divided by
    the reference's own held-out Δ(Y_test | Y), so 1 means "as well as the
    reference's own unseen data". ``in_distribution``: the share of samples
    whose δ lies below the reference's own 95th percentile (larger = more
    similar). A reference without a calibration sketch gets None for the last
    two. ``typicality``: |log(Δ / Δ(Y_test | Y))|, two-sided: 0 when X reconstructs exactly as well
    as the reference's own unseen data, larger when it reconstructs worse *or better* (data easier
    than the reference's own, such as smooth upscaled digits, is not "like" it either).
    ``distribution``: the distance of X's δ distribution from the reference's own held-out one.
    ``latent_calibrated``: the mean latent distance z of X's codes over that of the reference's own
    held-out split; ``typicality_latent``: :func:`typicality_latent` of the two ratios (None for a member
    without latent moments).
    ``ranking`` follows ``method`` (what :func:`score_result` used; :func:`default_ranking` when none was
    asked).
    ``composition``: the share of X from each reference. ``composition_method`` "matching" (a fleet with
    cross sketches): the mixture weights by distribution matching (:mod:`.mixture`), from
    ``composition_gram`` and ``composition_moments``; "nearest": the share of samples whose nearest member
    (per sample, by the same method) is each reference.
    """

    n: int
    loss: str
    delta: dict[str, float]
    delta_normalized: dict[str, float]
    delta_calibrated: dict[str, float | None] = field(default_factory=dict)
    in_distribution: dict[str, float | None] = field(default_factory=dict)
    typicality: dict[str, float | None] = field(default_factory=dict)
    distribution_sketch: dict[str, list[float] | None] = field(default_factory=dict)
    distribution: dict[str, float | None] = field(default_factory=dict)
    latent_calibrated: dict[str, float | None] = field(default_factory=dict)
    typicality_latent: dict[str, float | None] = field(default_factory=dict)
    composition: dict[str, float] = field(default_factory=dict)
    composition_method: str = "nearest"
    composition_gram: dict[str, list[float]] = field(default_factory=dict)
    composition_moments: dict[str, float] = field(default_factory=dict)
    method: str = DEFAULT_RANKING
    per_sample: np.ndarray | None = field(default=None, repr=False)  # (members, N) raw δ
    nearest: list[str] | None = field(default=None, repr=False)  # per sample, by ``method``
    nearest_score: np.ndarray | None = field(default=None, repr=False)  # its per-sample score under ``method``

    def scores_by(self, method: str) -> dict[str, float]:
        """The values ``method`` ranks by, for the members that have one (larger = more similar only for
        ``in_distribution``)."""
        if method not in RANKINGS:
            raise UserError(f"unknown ranking '{method}'; known: {', '.join(RANKINGS)}")
        scores = {"raw": self.delta, "normalized": self.delta_normalized, "calibrated": self.delta_calibrated,
                  "in_distribution": self.in_distribution, "typicality": self.typicality,
                  "distribution": self.distribution, "typicality_latent": self.typicality_latent}[method]
        return {k: v for k, v in scores.items() if v is not None}

    def ranking_by(self, method: str) -> list[str]:
        from ..ranking import rank

        known = self.scores_by(method)
        missing = sorted(k for k in self.delta if k not in known)  # uncalibrated members go last
        return rank(known, reverse=method == "in_distribution") + missing

    @property
    def agreement(self) -> float:
        """The share of the rankings with a value for every member that put :attr:`ranking`'s first first."""
        first = self.ranking[0] if self.delta else None
        votes = [self.ranking_by(m)[0] == first for m in RANKINGS if len(self.scores_by(m)) == len(self.delta)]
        return float(np.mean(votes)) if votes else 1.0

    @property
    def margin(self) -> float | None:
        scores = self.scores_by(self.method)
        order = [k for k in self.ranking if k in scores]
        if len(order) < 2:
            return None
        return float(abs(scores[order[1]] - scores[order[0]]))

    @property
    def confident(self) -> bool:
        return self.agreement >= WEAK_AGREEMENT

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
        """Every key of :data:`SCORE_FIELDS`, in order (the answer contract)."""
        return {key: self.field_value(key) for key in SCORE_FIELDS}

    def field_value(self, key: str) -> Any:
        """The value of one answer field: ``ranking_method`` is :attr:`method`, ``ranking_<m>`` the
        ranking by method m, anything else the attribute of that name."""
        if key == "ranking_method":
            return self.method
        if key == "ranking":
            return self.ranking
        if key.startswith("ranking_"):
            return self.ranking_by(key[len("ranking_"):])
        return getattr(self, key)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ScoreResult":
        """The result a :meth:`to_json` answer (or a POST /v1/score answer) describes. Only the measured
        fields are needed: the "derived" ones of :data:`SCORE_CONTRACT` (typicality, when absent, and
        every ranking) are computed again from them."""
        needed = [k for k, (_, merge, _) in SCORE_CONTRACT.items() if merge != "derived"]
        if "distribution_sketch" not in d:  # an answer from before the distribution ranking: none for any member
            d = {**d, "distribution_sketch": {name: None for name in d.get("delta", {})}}
        if "latent_calibrated" not in d:  # an answer from before latent moments: none for any member
            d = {**d, "latent_calibrated": {name: None for name in d.get("delta", {})}}
        if "composition_method" not in d:  # an answer from before composition by matching: nearest
            d = {**d, "composition_method": "nearest", "composition_gram": {}, "composition_moments": {}}
        missing = [k for k in needed if k not in d]
        if missing:
            raise UserError(f"a score answer lacks {', '.join(missing)}")
        values = {k: (d[k] if k == "composition_method" else dict(d[k])) for k in needed
                  if k in cls.__dataclass_fields__ and k not in ("n", "loss")}
        typicality = dict(d["typicality"]) if d.get("typicality") is not None else \
            typicality_of(values["delta_calibrated"])
        return cls(n=int(d["n"]), loss=d["loss"], method=d["ranking_method"], typicality=typicality,
                   distribution=distributions_of(values["distribution_sketch"]),
                   typicality_latent=typicality_latents_of(values["delta_calibrated"], values["latent_calibrated"]),
                   **values)

    def per_sample_table(self, names: list[str], labels=None):
        """One row per sample: index, label, δ per member, nearest member, its calibrated score."""
        import pandas as pd

        if self.per_sample is None:
            raise UserError("scored without per-sample values")
        table = {"index": np.arange(self.n)}
        if labels is not None:
            table["label"] = np.asarray(labels)
        for k, name in enumerate(names):
            table[f"delta/{name}"] = self.per_sample[k]
        table["nearest"] = self.nearest
        table[f"nearest_{self.method}"] = self.nearest_score
        return pd.DataFrame(table)


def _check_contract() -> None:
    """Every row of SCORE_CONTRACT names a value ScoreResult has and a known merge (at import: a row
    without one fails here, not in a user's answer)."""
    fields = set(ScoreResult.__dataclass_fields__)
    for key, (_, merge, _) in SCORE_CONTRACT.items():
        ranking = key.startswith("ranking_") and key[len("ranking_"):] in RANKINGS
        derived = isinstance(getattr(ScoreResult, key, None), property)
        if not (key in fields or key in ("ranking", "ranking_method") or ranking or derived):
            raise ImportError(f"SCORE_CONTRACT field '{key}' is not a value of ScoreResult")
        if merge not in MERGES:
            raise ImportError(f"SCORE_CONTRACT field '{key}' has an unknown merge '{merge}'; known: "
                              f"{', '.join(MERGES)}")


_check_contract()


def merge_results(parts: Iterable[ScoreResult]) -> ScoreResult:
    """One dataset's result from the results of its batches (disjoint parts, the same members): ``n``
    added, every "mean" field of :data:`SCORE_CONTRACT` the batch-size weighted mean (None when any
    batch has None), typicality recomputed from the merged calibrated Δ (:func:`typicality_of`), the
    rankings derived by :class:`ScoreResult`; a "matching" composition solved again from the merged
    ``composition_moments`` (:func:`composition_of`), never averaged. Per-sample values are not kept."""
    parts = list(parts)
    if not parts:
        raise UserError("no results to merge")
    n = sum(p.n for p in parts)
    means = {}
    for key in (k for k, (_, merge, _) in SCORE_CONTRACT.items() if merge == "mean"):
        acc: dict[str, Any] = {}
        for p in parts:
            for name, v in getattr(p, key).items():
                if v is None or (name in acc and acc[name] is None):
                    acc[name] = None
                else:
                    acc[name] = acc.get(name, 0.0) + np.asarray(v, dtype=np.float64) * p.n
        means[key] = {name: (None if v is None else (v / n).tolist()) for name, v in acc.items()}
    first = parts[0]
    for p in parts[1:]:
        if (p.loss, p.method) != (first.loss, first.method):
            raise UserError(f"cannot merge results of different losses or rankings "
                             f"({first.loss}/{first.method} and {p.loss}/{p.method})")
        if (p.composition_method, p.composition_gram) != (first.composition_method, first.composition_gram):
            raise UserError("cannot merge results of different compositions (fleets with and without cross "
                            "sketches, or different members)")
    if first.composition_method == "matching":  # π from the merged moments, never averaged
        means["composition"] = composition_of(first.composition_gram, means["composition_moments"])
    return ScoreResult(n=n, loss=first.loss, method=first.method, typicality=typicality_of(means["delta_calibrated"]),
                       composition_method=first.composition_method, composition_gram=first.composition_gram,
                       distribution=distributions_of(means["distribution_sketch"]),
                       typicality_latent=typicality_latents_of(means["delta_calibrated"], means["latent_calibrated"]),
                       **means)


def composition_of(gram: dict[str, list[float]], moments: dict[str, float]) -> dict[str, float]:
    """The mixture weights π per member from an answer's ``composition_gram`` and ``composition_moments``
    (:func:`~.mixture.mixture_weights`); derived, never averaged."""
    names = list(gram)
    w = mixture.mixture_weights(np.array([gram[k] for k in names]), np.array([moments[k] for k in names]))
    return dict(zip(names, w.tolist()))


def per_sample_scores(method: str, per_sample: np.ndarray, members: list["Member"],
                      latent: np.ndarray | None = None) -> np.ndarray | None:
    """(members, N) per-sample scores under ``method``, smaller = nearer; None when a member lacks
    what the method needs (a calibration sketch; for typicality_latent also latent moments and ``latent``,
    the (members, N) latent distances z)."""
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
    if method == "distribution":  # a distance between distributions has no per-sample value: nearest by δ
        return d
    if method == "typicality_latent":
        # a set's typicality in δ and codes; per sample, the composition is nearest by δ, as for distribution:
        # the per-sample typicality_latent put 3 of 43 first-half mixtures within 0.08, nearest by δ 16
        # (bench/rankings.py, "typicality_latent_samples"; docs/results.md, "Rankings that hold")
        if latent is None or not all(has_latent(m) for m in members) or not np.isfinite(latent).all():
            return None
        return d
    raise UserError(f"unknown ranking '{method}'; known: {', '.join(RANKINGS)}")


def score_result(per_sample: np.ndarray, members: list["Member"], loss: str, method: str | None = None,
                 keep_per_sample: bool = False, latent: np.ndarray | None = None) -> ScoreResult:
    """Every aggregate, ranking and the composition from the (members, N) per-sample δ and, for members with
    latent moments, the (members, N) latent distances z (``latent``; NaN rows for members without).

    ``method`` None: :func:`default_ranking`. A ranking some member cannot take (no calibration sketch, no
    latent moments) falls back to :data:`DEFAULT_RANKING`, then raw; ``ranking_method`` says which was used."""
    names = [m.name for m in members]
    d = np.asarray(per_sample, dtype=np.float64)
    z = np.full(d.shape, np.nan) if latent is None else np.asarray(latent, dtype=np.float64)
    lat = {m.name: (float(row.mean() / m.latent["own_mean"]) if has_latent(m) and np.isfinite(row).all() else None)
           for m, row in zip(members, z)}
    mean = d.mean(axis=1)
    delta = dict(zip(names, mean.tolist()))
    norm = {m.name: delta[m.name] / m.metrics.get("ref_mean_l2", 1.0) for m in members}
    calibrated = {m.name: (delta[m.name] / m.calibration["mean"] if m.calibration else None) for m in members}
    in_dist = {}
    for m, row in zip(members, d):
        in_dist[m.name] = (float(np.mean(row < m.calibration["quantiles"][int(IN_DISTRIBUTION_LEVEL * 100)]))
                           if m.calibration else None)
    typical = typicality_of(calibrated)
    sketches = {m.name: (distribution_sketch(m.calibration, row) if m.calibration else None)
                for m, row in zip(members, d)}
    used = method or default_ranking(members)
    scores = per_sample_scores(used, d, members, latent)
    if scores is None and used == LATENT_RANKING:  # a member without latent moments (or no z): the default
        used = DEFAULT_RANKING
        scores = per_sample_scores(used, d, members)
    if scores is None:  # a member without a calibration sketch: rank by raw Δ
        used, scores = "raw", d
    nearest_idx = np.argmin(scores, axis=0)
    nearest = [names[i] for i in nearest_idx]
    composition = {name: float(np.mean(nearest_idx == k)) for k, name in enumerate(names)}
    cross = {m.name: m.cross_sketch for m in members}
    how, gram, moments = "nearest", {}, {}
    # every reference's held-out δ through every member, in the loss scored (the sketches are in the members'
    # own loss): distribution matching
    if mixture.covers(cross, names) and all(m.config.get("loss") == loss for m in members):
        how = "matching"
        gram = dict(zip(names, mixture.composition_gram(cross, names).tolist()))
        moments = dict(zip(names, mixture.composition_moments(d, cross, names).tolist()))
        composition = composition_of(gram, moments)
    return ScoreResult(n=d.shape[1], loss=loss, delta=delta, delta_normalized=norm, delta_calibrated=calibrated,
                       in_distribution=in_dist, typicality=typical, distribution_sketch=sketches,
                       distribution=distributions_of(sketches), latent_calibrated=lat,
                       typicality_latent=typicality_latents_of(calibrated, lat), composition=composition,
                       composition_method=how, composition_gram=gram, composition_moments=moments, method=used,
                       per_sample=d if keep_per_sample else None, nearest=nearest if keep_per_sample else None,
                       nearest_score=scores[nearest_idx, np.arange(d.shape[1])] if keep_per_sample else None)




def mean_l2_norm(x) -> float:
    """Mean L2 norm of the samples (N, 1, 28, 28): the paper's normaliser (section 5.3)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return float(np.linalg.norm(x, axis=1).mean()) if len(x) else 1.0

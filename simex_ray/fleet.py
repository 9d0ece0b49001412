"""A fleet: one trained autoencoder per reference part, on disk and in memory.

Directory layout::

    FLEET/manifest.json                   members, configs, fingerprints, metrics, sha256
    FLEET/weights/<member>-<sha16>.pt     one state_dict per member (torch.save), named by its content
    FLEET/checkpoints/                    per-epoch training checkpoints (resume)

FLEET is a local path or a URI (``file://``, ``s3://``, ``gs://``): every read and write goes
through :mod:`simex_ray.storage` (``pyarrow.fs``). Writes are atomic on every filesystem
(local: temporary file + fsync + ``os.replace``; object stores: temporary key, then moved),
weights are written before the manifest that lists them, and loading verifies every weight
file's sha256 and uses ``torch.load(weights_only=True)``.

Retraining in place. A weight file's name carries the first 16 hex digits of its sha256, so a
retrained member gets a new file and never overwrites the one an older manifest lists: a reader
holding that manifest finds the bytes it expects, or no file at all, never different bytes. The
same weights get the same name and are not written again.

Collection, one generation of grace. After :func:`write_manifest` publishes a manifest it deletes
the weight files under ``weights/`` that neither the new manifest nor the one it replaced lists, so
a reader that read the previous manifest still finds its files. A reader further behind finds a file
gone; :meth:`Fleet.load` then re-reads the manifest and loads that member's current record (a few
times at most, and only while the manifest keeps changing), or fails with one line when the manifest
still lists the missing file or no longer has the member. Only names this module writes are
collected: ``<slug>-<sha16>.pt``, and the older ``<slug>.pt`` of a member either manifest has;
anything else (temporary files of writes in flight, a user's files) is kept. Weights written by this
process and not yet listed in a manifest are kept too (threads adding members), and nothing is
collected when the previous manifest cannot be read. Collection assumes one writing process per
fleet at a time, as the manifest itself does (it is rewritten whole).

Fleets whose manifest lists ``weights/<slug>.pt`` (written before content-hashed names) load as
before: the manifest holds each path. The format stays 1: the ``weights`` field is still a path
relative to the fleet, which readers without this change read the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from . import storage
from .losses import check_loss
from .models import create_autoencoder
from .training import TrainConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "weights"
FORMAT_VERSION = 1
HASH_CHARS = 16  # of the sha256 in a weight file's name
RELOADS = 3  # re-reads of the manifest while loading a member whose file was collected

_HASHED = re.compile(rf"^[A-Za-z0-9_-][A-Za-z0-9._-]*-[0-9a-f]{{8}}-[0-9a-f]{{{HASH_CHARS}}}\.pt$")
_manifest_lock = threading.Lock()
_unpublished: set[str] = set()  # weight files this process wrote that no manifest lists yet


class FleetError(RuntimeError):
    """A fleet directory that cannot be used; the message names the file and the fix."""


class StaleWeightsError(FleetError):
    """A member's weight file is missing or differs from the manifest's sha256: the fleet may have
    been retrained since the manifest was read (:meth:`Fleet.load` reads it again)."""


@dataclass
class Member:
    """One reference part and its trained autoencoder's record in the manifest."""

    name: str  # the reference spec, with '#class' for per-class members
    spec: str  # the reference spec without the class selector
    config: dict[str, Any]  # resolved TrainConfig
    fingerprint: str  # sha256 of the reference training data
    weights: str = ""  # path relative to the fleet directory
    sha256: str = ""
    class_: str | None = None
    data_seed: int | None = None  # drew the member's samples, split and variant images (config["seed"]: the model's)
    n_train: int = 0
    n_test: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # train_delta, test_delta, ref_mean_l2, ...
    history: list[dict] = field(default_factory=list)
    # The member's own held-out δ distribution: {"quantiles": 101 values at 0%, 1%, ..., 100%,
    # "mean": Δ(Y_test | A(Y)), "n": test images}; empty for fleets trained before it existed.
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return self.config["loss"]

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["class"] = d.pop("class_")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Member":
        """A manifest record; keys that are not Member fields (added by a caller) are ignored."""
        d = dict(d)
        d["class_"] = d.pop("class", None)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def slug(name: str) -> str:
    """A file-system-safe, unique file stem for a member name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-60:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def sha256_file(path: storage.PathLike) -> str:
    """sha256 of a file: a local path, a URI or a :class:`~simex_ray.storage.Location`."""
    return storage.resolve(path).sha256()


def atomic_write_bytes(path: storage.PathLike, data: bytes) -> None:
    """Replace a file (a local path, a URI or a Location) atomically on its filesystem."""
    storage.resolve(path).write_bytes_atomic(data)


def save_weights(fleet_dir: storage.PathLike, member: Member, state_dict: dict[str, torch.Tensor]) -> Member:
    """Write one member's weights atomically, named by their sha256; fills ``member.weights`` and
    ``sha256``. A file of that name and size already holds these bytes, so it is not written again.

    Publish the manifest that lists them (:func:`write_manifest`) only after this returns.
    """
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    blob = buf.getvalue()
    digest = hashlib.sha256(blob).hexdigest()
    rel = f"{WEIGHTS}/{slug(member.name)}-{digest[:HASH_CHARS]}.pt"
    path = storage.resolve(fleet_dir).join(rel)
    with _manifest_lock:  # before the file exists, so a collection in another thread keeps it
        _unpublished.add(path.path)
    if path.size() != len(blob):  # None when there is no such file
        path.write_bytes_atomic(blob)
    member.weights, member.sha256 = rel, digest
    return member


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def read_manifest(fleet_dir: storage.PathLike) -> dict[str, Any]:
    loc = storage.resolve(fleet_dir)
    path = loc.join(MANIFEST)
    try:
        if not loc.is_dir():
            raise FleetError(f"fleet directory {loc} does not exist; create one with `simex train --out {loc}`")
        if not path.is_file():
            raise FleetError(f"{path} is missing; {loc} is not a fleet (create one with `simex train`)")
        text = path.read_text()
        for _ in range(3 if not loc.is_local else 0):  # a read torn by a concurrent publish: read again
            if _parses(text):
                break
            time.sleep(0.05)
            text = path.read_text()
    except OSError as e:  # unreachable store, no permission, ...
        raise FleetError(f"cannot read {path} ({storage._first_line(e)}); check the path and its credentials") \
            from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FleetError(f"{path} is corrupted ({e}); re-run `simex train` to rewrite it") from None
    if not isinstance(manifest, dict) or "members" not in manifest:
        raise FleetError(f"{path} has no 'members'; re-run `simex train` to rewrite it")
    version = manifest.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FleetError(f"{path} has format {version}, newer than this simex reads ({FORMAT_VERSION}); "
                         f"upgrade simex-ray, or retrain the fleet with this version")
    return manifest


def write_manifest(fleet_dir: storage.PathLike, members: Iterable[Member], **extra: Any) -> Path | str:
    """Publish the manifest atomically: call it after every weight file it lists is written.

    Then collects the weight files neither it nor the manifest it replaced lists (module docstring).
    Returns its path (a Path for a local fleet, the URI otherwise)."""
    members = list(members)
    losses = sorted({m.loss for m in members})
    manifest = {
        "format": FORMAT_VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loss": losses[0] if len(losses) == 1 else "mixed",
        "members": [m.to_json() for m in members],
        **extra,
    }
    fleet = storage.resolve(fleet_dir)
    loc = fleet.join(MANIFEST)
    with _manifest_lock:
        previous = _previous_members(fleet)
        loc.write_bytes_atomic((json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
        listed = [m.to_json() for m in members]
        _unpublished.difference_update(fleet.join(m["weights"]).path for m in listed if m["weights"])
        if previous is not None:
            collect_weights(fleet, listed + previous)
    return loc.user_path


def _previous_members(fleet: storage.Location) -> list[dict[str, Any]] | None:
    """The members of the manifest about to be replaced ([] when there is none); None when it
    cannot be read, so nothing is collected."""
    try:
        if not fleet.join(MANIFEST).exists():
            return []
        return list(read_manifest(fleet)["members"])
    except (FleetError, OSError) as e:
        log.warning("%s; weight files are not collected this time", storage._first_line(e))
        return None


def collect_weights(fleet_dir: storage.PathLike, members: Iterable[dict[str, Any]]) -> list[str]:
    """Delete the weight files under ``weights/`` that no record in ``members`` (manifest records)
    lists, that this process is not about to publish, and whose name this module writes; returns
    their relative paths. A failed deletion is logged, never raised: the manifest is published."""
    fleet = storage.resolve(fleet_dir)
    members = list(members)
    listed = {posixpath.normpath(m.get("weights") or "") for m in members}
    legacy = {f"{slug(m['name'])}.pt" for m in members if "name" in m}  # weights/<slug>.pt, older fleets
    removed = []
    try:
        names = fleet.join(WEIGHTS).listdir()
    except OSError as e:
        log.warning("cannot list %s (%s); weight files are not collected", fleet.join(WEIGHTS),
                    storage._first_line(e))
        return removed
    for name in names:
        rel = f"{WEIGHTS}/{name}"
        path = fleet.join(rel)
        if rel in listed or path.path in _unpublished or not (_HASHED.match(name) or name in legacy):
            continue
        try:
            if path.is_file():
                path.remove()
                removed.append(rel)
        except OSError as e:
            log.warning("cannot remove unused weight file %s (%s)", path, storage._first_line(e))
    if removed:
        log.info("%s: removed %d unused weight file(s)", fleet, len(removed))
    return removed


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
        from .ranking import rank

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


class Fleet:
    """Trained autoencoders keyed by member name; ``score`` needs no Ray.

    >>> fleet = Fleet.load("F")
    >>> fleet.score(x).ranking   # x: (N, 1, 28, 28) float in [0, 1]
    """

    def __init__(self, members: dict[str, Member], models: dict[str, torch.nn.Module],
                 path: Path | str | None = None, device: torch.device | str = "cpu"):
        if set(members) != set(models):
            raise ValueError("members and models must have the same names")
        self.members, self.models, self.path, self.device = members, models, path, torch.device(device)
        self._engine = None  # built on first use (``engine``)

    @classmethod
    def load(cls, fleet_dir: storage.PathLike, *, device: str | torch.device = "cpu",
             names: Iterable[str] | None = None) -> "Fleet":
        """Read the manifest and every (or the named) member, verifying sha256.

        ``fleet_dir``: a local path or a URI (``file://``, ``s3://``, ``gs://``); ``path`` is then
        a Path or the URI string."""
        loc = storage.resolve(fleet_dir)
        manifest = read_manifest(loc)
        device = torch.device(device)
        members = {m["name"]: Member.from_json(m) for m in manifest["members"]}
        if not members:
            raise FleetError(f"{loc.join(MANIFEST)} lists no members; train some with `simex train`")
        if names is not None:
            names = list(names)
            unknown = [n for n in names if n not in members]
            if unknown:
                raise FleetError(f"unknown member(s) {', '.join(unknown)}; fleet has: {', '.join(members)}")
            members = {n: members[n] for n in names}
        models = {}
        for name in list(members):
            members[name], models[name] = _load_current(loc, members[name], device)
        return cls(members, models, loc.user_path, device)

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def loss(self) -> str:
        losses = {m.loss for m in self.members.values()}
        return losses.pop() if len(losses) == 1 else "mixed"

    @property
    def engine(self):
        """The :class:`~simex_ray.scoring.ScoringEngine` over every member (built once)."""
        from .scoring import ScoringEngine

        if self._engine is None:
            self._engine = ScoringEngine(self.models, {n: m.loss for n, m in self.members.items()},
                                         device=self.device)
        return self._engine

    def per_sample_delta(self, name: str, x, loss: str | None = None) -> np.ndarray:
        """δ of each sample of ``x`` (N, 1, 28, 28) through member ``name``: (N,)."""
        return self.engine.per_sample(x, [name], loss)[0]

    def score(self, x, *, loss: str | None = None, members: Iterable[str] | None = None,
              method: str = DEFAULT_RANKING, per_sample: bool = False) -> ScoreResult:
        """Δ(X | Y_k) for every member k, every ranking and the composition (see :class:`ScoreResult`).

        ``x``: (N, 1, 28, 28) floats in [0, 1], or an iterable of such blocks.
        ``per_sample`` keeps the (members, N) δ and each sample's nearest member.
        """
        if loss is not None:
            check_loss(loss)
        if method not in RANKINGS:
            raise ValueError(f"unknown ranking '{method}'; known: {', '.join(RANKINGS)}")
        names = list(members) if members is not None else self.names
        unknown = [n for n in names if n not in self.members]
        if unknown:
            raise KeyError(f"unknown member(s) {', '.join(unknown)}; fleet has: {', '.join(self.names)}")
        d = self.engine.per_sample(x, names, loss)
        if d.shape[1] == 0:
            raise ValueError("cannot score an empty batch")
        return score_result(d, [self.members[n] for n in names], loss or self.loss, method, per_sample)


def _load_current(loc: storage.Location, member: Member, device) -> tuple[Member, torch.nn.Module]:
    """``member``'s model; when its weight file is gone or changed because the fleet was retrained
    since the manifest was read, the member's current record and model (the manifest read again)."""
    for _ in range(RELOADS):
        try:
            return member, load_member_model(loc, member, device)
        except StaleWeightsError:
            current = next((m for m in read_manifest(loc)["members"] if m.get("name") == member.name), None)
            if current is None:
                raise FleetError(f"member '{member.name}' is no longer in {loc.join(MANIFEST)} (the fleet "
                                 f"changed while loading); load it again") from None
            fresh = Member.from_json(current)
            if (fresh.weights, fresh.sha256) == (member.weights, member.sha256):
                raise  # the manifest still lists this very file: it is missing or damaged
            member = fresh
    return member, load_member_model(loc, member, device)


def load_member_model(fleet_dir: storage.PathLike, member: Member, device="cpu") -> torch.nn.Module:
    """The model of one manifest record, its weight file verified against the record's sha256
    (raises :class:`StaleWeightsError` when the file is missing or differs)."""
    path = storage.resolve(fleet_dir).join(member.weights)
    try:
        # One read: the bytes whose sha256 is checked are the bytes that are loaded.
        blob = path.read_bytes() if member.weights and path.is_file() else None
    except FileNotFoundError:  # collected between the check and the read
        blob = None
    except OSError as e:
        raise FleetError(f"weight file {path} of member '{member.name}' cannot be read "
                         f"({storage._first_line(e)}); check the path and its credentials") from None
    if blob is None:
        raise StaleWeightsError(f"weight file {path} of member '{member.name}' is missing; "
                                f"re-run `simex train` with the same --out to rebuild it")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != member.sha256:
        raise StaleWeightsError(f"weight file {path} of member '{member.name}' is corrupted (sha256 mismatch); "
                                f"delete it and re-run `simex train` with the same --out")
    try:
        # weights_only: a fleet may come from elsewhere; never unpickle code.
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        model = create_autoencoder(TrainConfig.from_dict(member.config).architecture)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise FleetError(f"weight file {path} of member '{member.name}' cannot be loaded ({type(e).__name__}); "
                         f"delete it and re-run `simex train`") from None
    return model.to(device).eval()


def mean_l2_norm(x) -> float:
    """Mean L2 norm of the samples (N, 1, 28, 28): the paper's normaliser (section 5.3)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return float(np.linalg.norm(x, axis=1).mean()) if len(x) else 1.0

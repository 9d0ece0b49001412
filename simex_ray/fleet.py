"""A fleet: one trained autoencoder per reference part, on disk and in memory.

Directory layout::

    FLEET/manifest.json          members, configs, fingerprints, metrics, sha256
    FLEET/weights/<member>.pt    one state_dict per member (torch.save)
    FLEET/checkpoints/           per-epoch training checkpoints (resume)

Writes are atomic (temporary file + ``os.replace``), loading verifies every
weight file's sha256 and uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .losses import check_loss, per_sample_delta
from .models import create_autoencoder
from .training import TrainConfig, as_tensor

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class FleetError(RuntimeError):
    """A fleet directory that cannot be used; the message names the file and the fix."""


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
        d = dict(d)
        d["class_"] = d.pop("class", None)
        return cls(**d)


def slug(name: str) -> str:
    """A file-system-safe, unique file stem for a member name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-60:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(fleet_dir: Path, member: Member, state_dict: dict[str, torch.Tensor]) -> Member:
    """Write one member's weights atomically; fills ``member.weights`` and ``sha256``."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    rel = f"weights/{slug(member.name)}.pt"
    atomic_write_bytes(Path(fleet_dir) / rel, buf.getvalue())
    member.weights, member.sha256 = rel, hashlib.sha256(buf.getvalue()).hexdigest()
    return member


def read_manifest(fleet_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(fleet_dir) / MANIFEST
    if not Path(fleet_dir).is_dir():
        raise FleetError(f"fleet directory {fleet_dir} does not exist; create one with `simex train --out {fleet_dir}`")
    if not path.is_file():
        raise FleetError(f"{path} is missing; {fleet_dir} is not a fleet (create one with `simex train`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FleetError(f"{path} is corrupted ({e}); re-run `simex train` to rewrite it") from None
    if not isinstance(manifest, dict) or "members" not in manifest:
        raise FleetError(f"{path} has no 'members'; re-run `simex train` to rewrite it")
    return manifest


def write_manifest(fleet_dir: str | os.PathLike, members: Iterable[Member], **extra: Any) -> Path:
    members = list(members)
    losses = sorted({m.loss for m in members})
    manifest = {
        "format": FORMAT_VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loss": losses[0] if len(losses) == 1 else "mixed",
        "members": [m.to_json() for m in members],
        **extra,
    }
    path = Path(fleet_dir) / MANIFEST
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return path


@dataclass
class ScoreResult:
    """Delta of one unknown dataset against every member; smaller = more similar."""

    n: int
    loss: str
    delta: dict[str, float]
    delta_normalized: dict[str, float]

    @property
    def ranking(self) -> list[str]:
        return sorted(self.delta, key=lambda name: (self.delta[name], name))

    @property
    def ranking_normalized(self) -> list[str]:
        return sorted(self.delta_normalized, key=lambda name: (self.delta_normalized[name], name))

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "loss": self.loss, "delta": self.delta, "ranking": self.ranking,
                "delta_normalized": self.delta_normalized, "ranking_normalized": self.ranking_normalized}


class Fleet:
    """Trained autoencoders keyed by member name; ``score`` needs no Ray.

    >>> fleet = Fleet.load("F")
    >>> fleet.score(x).ranking   # x: (N, 1, 28, 28) float in [0, 1]
    """

    def __init__(self, members: dict[str, Member], models: dict[str, torch.nn.Module],
                 path: Path | None = None, device: torch.device | str = "cpu"):
        if set(members) != set(models):
            raise ValueError("members and models must have the same names")
        self.members, self.models, self.path, self.device = members, models, path, torch.device(device)

    @classmethod
    def load(cls, fleet_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
             names: Iterable[str] | None = None) -> "Fleet":
        """Read the manifest and every (or the named) member, verifying sha256."""
        fleet_dir = Path(fleet_dir)
        manifest = read_manifest(fleet_dir)
        members = {m["name"]: Member.from_json(m) for m in manifest["members"]}
        if not members:
            raise FleetError(f"{fleet_dir / MANIFEST} lists no members; train some with `simex train`")
        if names is not None:
            names = list(names)
            unknown = [n for n in names if n not in members]
            if unknown:
                raise FleetError(f"unknown member(s) {', '.join(unknown)}; fleet has: {', '.join(members)}")
            members = {n: members[n] for n in names}
        models = {name: load_member_model(fleet_dir, m, device) for name, m in members.items()}
        return cls(members, models, fleet_dir, device)

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def loss(self) -> str:
        losses = {m.loss for m in self.members.values()}
        return losses.pop() if len(losses) == 1 else "mixed"

    @torch.no_grad()
    def per_sample_delta(self, name: str, x, loss: str | None = None, batch_size: int = 512) -> np.ndarray:
        """delta of each sample of ``x`` (N, 1, 28, 28) through member ``name``: (N,)."""
        model, loss = self.models[name], loss or self.members[name].loss
        x = as_tensor(x, self.device)
        out = [per_sample_delta(b, model(b), loss).cpu() for b in torch.split(x, batch_size)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def score(self, x, *, loss: str | None = None, members: Iterable[str] | None = None,
              batch_size: int = 512) -> ScoreResult:
        """Delta(X | Y_k) for every member k: the mean per-sample error of ``x``."""
        if loss is not None:
            check_loss(loss)
        names = list(members) if members is not None else self.names
        unknown = [n for n in names if n not in self.members]
        if unknown:
            raise KeyError(f"unknown member(s) {', '.join(unknown)}; fleet has: {', '.join(self.names)}")
        if len(x) == 0:
            raise ValueError("cannot score an empty batch")
        delta = {n: float(self.per_sample_delta(n, x, loss, batch_size).mean()) for n in names}
        norm = {n: delta[n] / self.members[n].metrics.get("ref_mean_l2", 1.0) for n in names}
        used = loss or self.loss
        return ScoreResult(n=len(x), loss=used, delta=delta, delta_normalized=norm)


def load_member_model(fleet_dir: Path, member: Member, device="cpu") -> torch.nn.Module:
    path = Path(fleet_dir) / member.weights
    if not member.weights or not path.is_file():
        raise FleetError(f"weight file {path} of member '{member.name}' is missing; "
                         f"re-run `simex train` with the same --out to rebuild it")
    digest = sha256_file(path)
    if digest != member.sha256:
        raise FleetError(f"weight file {path} of member '{member.name}' is corrupted (sha256 mismatch); "
                         f"delete it and re-run `simex train` with the same --out")
    try:
        # weights_only: a fleet may come from elsewhere; never unpickle code.
        state = torch.load(path, map_location="cpu", weights_only=True)
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

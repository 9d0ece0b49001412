"""A fleet in memory: one trained autoencoder per reference part, loaded and verified; ``score`` needs no Ray."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .. import storage
from ..formats import ImageFormat
from ..losses import check_loss
from ..models import create_autoencoder
from ..training import TrainConfig
from .manifest import (MANIFEST, RELOADS, FleetError, Member, StaleWeightsError, common_format, common_loss,
                       read_manifest, read_moments, read_weights)
from .result import RANKINGS, ScoreResult, score_result
from ..errors import UserError, check_members

class Fleet:
    """Trained autoencoders keyed by member name; ``score`` needs no Ray.

    >>> fleet = Fleet.load("F")
    >>> fleet.score(x).ranking   # x: (N, 1, 28, 28) float in [0, 1]
    """

    def __init__(self, members: dict[str, Member], models: dict[str, torch.nn.Module],
                 path: Path | str | None = None, device: torch.device | str = "cpu",
                 moments: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        if set(members) != set(models):
            raise UserError("members and models must have the same names")
        self.members, self.models, self.path, self.device = members, models, path, torch.device(device)
        self.moments = dict(moments or {})  # {member: (μ, P)}: the latent moments of the members that have them
        self._engine = None  # built on first use (``engine``)
        self.precision = "fp32"  # of the engine's forward passes: "bf16" under bfloat16 autocast (set before scoring)

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
            members = {n: members[n] for n in check_members(names, members)}
        models, moments = {}, {}
        for name in list(members):
            members[name], models[name], found = _load_current(loc, members[name], device)
            if found is not None:
                moments[name] = found
        return cls(members, models, loc.user_path, device, moments)

    @classmethod
    def from_records(cls, fleet_dir: storage.PathLike, records: Iterable[dict], *,
                     device: str | torch.device = "cpu") -> "Fleet":
        """The members of these manifest records (a manifest already read and checked, e.g. by
        :func:`~simex_ray.fleet.manifest.verify_fleet`), each weight file verified as it is loaded; the
        manifest itself is not read. A file that changed since raises :class:`StaleWeightsError`."""
        loc = storage.resolve(fleet_dir)
        device = torch.device(device)
        members = {r["name"]: Member.from_json(r) for r in records}
        if not members:
            raise FleetError(f"no members to load from {loc}")
        models = {name: load_member_model(loc, m, device) for name, m in members.items()}
        moments = {name: found for name, m in members.items() if (found := read_moments(loc, m)) is not None}
        return cls(members, models, loc.user_path, device, moments)

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def image_format(self) -> ImageFormat:
        """The one format every member takes (a fleet of mixed formats cannot be scored as one)."""
        return common_format(self.members.values())

    @property
    def loss(self) -> str:
        return common_loss(self.members.values())

    @property
    def engine(self):
        """The :class:`~simex_ray.scoring.ScoringEngine` over every member (built once)."""
        from ..scoring import ScoringEngine

        if self._engine is None:
            self._engine = ScoringEngine(self.models, {n: m.loss for n, m in self.members.items()},
                                         device=self.device, precision=self.precision, moments=self.moments)
        return self._engine

    def per_sample_delta(self, name: str, x, loss: str | None = None) -> np.ndarray:
        """δ of each sample of ``x`` (N, 1, 28, 28) through member ``name``: (N,)."""
        return self.engine.per_sample(x, [name], loss)[0]

    def per_sample(self, x, names: Iterable[str] | None = None, loss: str | None = None) -> np.ndarray:
        """(len(names), 2, N): the per-sample δ and latent distance z (NaN without moments) of every member
        named, from one fused pass: what a scorer hands to :func:`~simex_ray.fleet.result.score_result`."""
        return self.engine.per_sample(x, names, loss, latent=True)

    def score(self, x, *, loss: str | None = None, members: Iterable[str] | None = None,
              method: str | None = None, per_sample: bool = False) -> ScoreResult:
        """Δ(X | Y_k) for every member k, every ranking and the composition (see :class:`ScoreResult`).

        ``x``: (N, C, H, W) floats in [0, 1], or an iterable of such blocks.
        ``method``: the ranking; None: the default (:func:`~simex_ray.fleet.result.default_ranking`).
        ``per_sample`` keeps the (members, N) δ and each sample's nearest member.
        """
        if loss is not None:
            check_loss(loss)
        if method is not None and method not in RANKINGS:
            raise UserError(f"unknown ranking '{method}'; known: {', '.join(RANKINGS)}")
        names = check_members(members, self.names) if members is not None else self.names
        both = self.per_sample(x, names, loss)
        if both.shape[-1] == 0:
            raise UserError("cannot score an empty batch")
        return score_result(both[:, 0], [self.members[n] for n in names], loss or self.loss, method, per_sample,
                            latent=both[:, 1])


def _load_current(loc: storage.Location, member: Member, device) -> tuple[Member, torch.nn.Module, tuple | None]:
    """``member``'s model and latent moments (None without); when a file of it is gone or changed because
    the fleet was retrained since the manifest was read, the member's current record, model and moments (the
    manifest read again)."""
    for _ in range(RELOADS):
        try:
            return member, load_member_model(loc, member, device), read_moments(loc, member)
        except StaleWeightsError:
            current = next((m for m in read_manifest(loc)["members"] if m.get("name") == member.name), None)
            if current is None:
                raise FleetError(f"member '{member.name}' is no longer in {loc.join(MANIFEST)} (the fleet "
                                 f"changed while loading); load it again") from None
            fresh = Member.from_json(current)
            if (fresh.weights, fresh.sha256, fresh.latent) == (member.weights, member.sha256, member.latent):
                raise  # the manifest still lists this very file: it is missing or damaged
            member = fresh
    return member, load_member_model(loc, member, device), read_moments(loc, member)


def load_member_model(fleet_dir: storage.PathLike, member: Member, device="cpu") -> torch.nn.Module:
    """The model of one manifest record, its weight file verified against the record's sha256
    (raises :class:`StaleWeightsError` when the file is missing or differs)."""
    path = storage.resolve(fleet_dir).join(member.weights)
    blob = read_weights(fleet_dir, member)  # one read: the bytes whose sha256 is checked are the bytes loaded
    try:
        # weights_only: a fleet may come from elsewhere; never unpickle code.
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        cfg = TrainConfig.from_dict(member.config)
        model = create_autoencoder(cfg.architecture, cfg.image_format)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise FleetError(f"weight file {path} of member '{member.name}' cannot be loaded ({type(e).__name__}); "
                         f"delete it and re-run `simex train`") from None
    return model.to(device).eval()



"""Turn reference specs into fleet members and their data (Ray-free).

Shared by the local trainer, the Ray Train adapter, and the experiments so
the same flags always give the same members, data and manifest records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass

import numpy as np

from . import data, storage
from .fleet import MANIFEST, FleetError, Member, calibration_of, mean_l2_norm, read_manifest, save_weights, \
    write_manifest
from .training import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class MemberPlan:
    """One member to train: its manifest record and its reference data."""

    member: Member
    x_train: np.ndarray  # (N, 1, 28, 28) float32
    x_test: np.ndarray

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def run_key(self) -> str:
        """Identity of a training run; epochs excluded so more epochs resume."""
        cfg = {k: v for k, v in self.member.config.items() if k != "epochs"}
        blob = json.dumps({"config": cfg, "fingerprint": self.member.fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _record(name: str, spec: str, class_: str | None, train: data.Dataset, test: data.Dataset,
            config: TrainConfig, data_seed: int) -> MemberPlan:
    member = Member(
        name=name, spec=spec, class_=class_, config=config.to_dict(), data_seed=data_seed,
        fingerprint=data.fingerprint(train), n_train=len(train), n_test=len(test),
        metrics={"ref_mean_l2": mean_l2_norm(train.x)},
    )
    return MemberPlan(member, train.x, test.x)


def plan_fleet(refs: list[str], config: TrainConfig, *, samples: int | None = None,
               per_class: bool = False, seed: int = 0, data_dir=None, cache: dict | None = None) -> list[MemberPlan]:
    """Load every reference and split it 5:1; one plan per member (``cache``: see :func:`data.load`).

    With ``per_class`` each labelled reference yields one member per class,
    named ``SPEC#CLASS``; ``samples`` is then drawn per class. ``seed`` is the
    data seed (samples, splits, variants); ``config.seed`` the model seed.
    """
    for spec in refs:  # fail on grammar before any slow loading
        data.parse_spec(spec)
    plans: list[MemberPlan] = []
    for spec in refs:
        if not per_class:
            train, test = data.prepare(spec, samples=samples, seed=seed, data_dir=data_dir, cache=cache)
            plans.append(_record(train.spec, spec, None, train, test, config, seed))
            continue
        for part in data.prepare_by_class(spec, samples=samples, seed=seed, data_dir=data_dir, cache=cache):
            plans.append(_record(part.spec, spec, part.name, part.train, part.test, config, seed))
    names = [p.name for p in plans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise data.SpecError(f"reference(s) given twice: {', '.join(dupes)}")
    return plans


def is_trained(existing: Member | None, plan: MemberPlan) -> bool:
    """True when ``existing`` already holds this plan's finished training."""
    return (existing is not None and existing.sha256 != ""
            and existing.fingerprint == plan.member.fingerprint
            and existing.config == plan.member.config)


class FleetWriter:
    """Adds finished members to a fleet directory, rewriting the manifest each time.

    Members already in the manifest are kept (in their order), so training a
    fleet in several runs, or resuming one, never loses finished work.
    ``out`` is a local path or a URI (:mod:`simex_ray.storage`); each member's weights are
    written (atomically) before the manifest that lists them, so a reader never finds a
    manifest naming a missing or partial weight file.
    """

    def __init__(self, out, extra: dict | None = None, order: list[str] | None = None):
        self.out = storage.resolve(out)
        self.extra = extra or {}
        self.order = list(order or [])
        self._lock = threading.Lock()
        self.members: dict[str, Member] = {}
        if self.out.join(MANIFEST).exists():
            try:
                manifest = read_manifest(self.out)
                self.members = {m["name"]: Member.from_json(m) for m in manifest["members"]}
            except FleetError as e:
                log.warning("%s; members will be retrained", e)
        # Manifest order: members already in the fleet, then new ones as given.
        self.order = list(self.members) + [n for n in self.order if n not in self.members]

    def pending(self, plans: list[MemberPlan]) -> list[MemberPlan]:
        """The plans still to train: not in the manifest, changed, or with bad weights."""
        todo = []
        for plan in plans:
            old = self.members.get(plan.name)
            if is_trained(old, plan) and self._weights_intact(old):
                log.info("%s: already trained, skipping", plan.name)
            else:
                todo.append(plan)
        return todo

    def _weights_intact(self, member: Member) -> bool:
        if not member.weights:
            return False
        path = self.out.join(member.weights)
        return path.is_file() and path.sha256() == member.sha256

    def has(self, plan: MemberPlan) -> bool:
        """True once this run wrote ``plan``'s member (same data and config)."""
        return is_trained(self.members.get(plan.name), plan)

    def add(self, plan: MemberPlan, state_dict, history: list[dict]) -> Member:
        member = plan.member
        last = history[-1] if history else {}
        member.metrics.update({k: float(last[k]) for k in ("train_delta", "test_delta", "elapsed_s") if k in last})
        member.metrics["epochs_trained"] = float(last.get("epoch", 0))
        member.history = history
        member.calibration = own_calibration(member, state_dict, plan.x_test)
        save_weights(self.out, member, state_dict)  # the weights first ...
        with self._lock:  # ... then the manifest that lists them
            self.members[member.name] = member
            rank = {n: i for i, n in enumerate(self.order)}
            ordered = sorted(self.members.values(), key=lambda m: rank.get(m.name, len(rank)))
            write_manifest(self.out, ordered, **self.extra)
        return member


def own_calibration(member: Member, state_dict, x_test: np.ndarray) -> dict:
    """The member's δ distribution on its own held-out test split (the calibration sketch)."""
    import torch

    from .models import create_autoencoder
    from .scoring import ScoringEngine

    if not len(x_test):
        return {}
    model = create_autoencoder(member.architecture)
    model.load_state_dict({k: torch.as_tensor(v).cpu() for k, v in state_dict.items()})
    d = ScoringEngine({member.name: model}, {member.name: member.loss}).per_sample(x_test)[0]
    return calibration_of(d)


def train_fleet_local(plans: list[MemberPlan], out, *, on_epoch=None, extra: dict | None = None):
    """Train every pending member in this process, one after another (no Ray).

    ``on_epoch(member_name, metrics)`` is called after each epoch.
    Returns the FleetWriter holding the manifest records.
    """
    from .training import train_member

    import io

    import torch

    from .fleet import slug

    writer = FleetWriter(out, extra, order=[p.name for p in plans])
    for plan in writer.pending(plans):
        config = TrainConfig.from_dict(plan.member.config)
        # Like the Ray path: a checkpoint per epoch, so a re-run continues where this one stopped.
        ckpt = writer.out.join("checkpoints", "local", f"{slug(plan.name)}-{plan.run_key}.pt")
        resume = None
        if ckpt.is_file():
            try:
                resume = torch.load(io.BytesIO(ckpt.read_bytes()), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged checkpoint: start this member over
                log.warning("%s: unreadable checkpoint %s; training from scratch", plan.name, ckpt)
            if resume is not None and resume["epoch"] > config.epochs:
                resume = None  # trained longer than now asked: start over rather than pretend

        def save(epoch, metrics, state, name=plan.name, path=ckpt):
            buf = io.BytesIO()
            torch.save(state, buf)
            path.write_bytes_atomic(buf.getvalue())
            if on_epoch is not None:
                on_epoch(name, metrics)

        model, history = train_member(plan.x_train, plan.x_test, config, resume=resume, on_epoch=save)
        writer.add(plan, model.state_dict(), history)
    return writer


def train_and_load(plans: list[MemberPlan], out=None, *, on_epoch=None, extra: dict | None = None):
    """:func:`train_fleet_local` into ``out`` (None: a temporary directory, removed) -> the loaded Fleet.

    A fleet loaded from a temporary directory has ``path = None``.
    """
    import tempfile

    from .fleet import Fleet

    if out is not None:
        train_fleet_local(plans, out, on_epoch=on_epoch, extra=extra)
        return Fleet.load(out)
    with tempfile.TemporaryDirectory(prefix="simex-fleet-") as tmp:
        train_fleet_local(plans, tmp, on_epoch=on_epoch, extra=extra)
        fleet = Fleet.load(tmp)
    fleet.path = None
    return fleet

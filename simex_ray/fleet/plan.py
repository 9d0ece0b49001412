"""Turn reference specs into fleet members and their data, and write finished members (Ray-free).

Shared by the local trainer, the Ray Train adapter, and the experiments so
the same flags always give the same members, data and manifest records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .. import data, storage
from ..data.slices import read_slice
from ..data.streamed import StreamedReference
from ..formats import FormatError, ImageFormat, conversion
from ..training import TrainConfig
from .latent import LATENT_ESTIMATOR, LATENT_SAMPLES, encode_all, fit_moments, training_subset
from .manifest import MANIFEST, FleetError, Member, read_manifest, save_moments, save_weights, write_manifest
from .result import calibration_of, mean_l2_norm
from ..choices import STREAM_BYTES, STREAM_MODES
from ..errors import UserError

log = logging.getLogger("simex_ray.plan")


@dataclass
class MemberPlan:
    """One member to train: its manifest record and its reference data, in memory or streamed.

    A streamed member (``stream``) has no arrays here: whoever trains it reads its slices."""

    member: Member
    x_train: np.ndarray | None  # (N, C, H, W) float32; None when streamed
    x_test: np.ndarray | None
    stream: StreamedReference | None = None

    def test_images(self):
        """The held-out split: an array, or (streamed) an iterator of blocks read now."""
        return self.stream.test_blocks() if self.stream is not None else self.x_test

    def train_sample(self, cap: int = LATENT_SAMPLES) -> np.ndarray:
        """At most ``cap`` images of the training split, a subset seeded by the data seed (streamed: the
        first ``cap`` of the split's seeded shuffled order, only as many slices read as that needs)."""
        seed = int(self.member.data_seed or 0)
        if self.stream is not None:
            return training_subset(self.stream.train_batches(0, cap, seed), seed, cap)
        if self.x_train is None:  # a plan whose images were let go: no moments (it ranks as older fleets do)
            return np.zeros((0, *self.member.image_format.shape), np.float32)
        return training_subset(self.x_train, seed, cap)

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
            config: TrainConfig, data_seed: int, split: str) -> MemberPlan:
    member = Member(
        name=name, spec=spec, class_=class_, config=config.to_dict(), data_seed=data_seed,
        fingerprint=data.fingerprint(train), n_train=len(train), n_test=len(test), split=split,
        metrics={"ref_mean_l2": mean_l2_norm(train.x)},
    )
    return MemberPlan(member, train.x, test.x)


def _streamed(spec: str, config: TrainConfig, *, seed: int, strict: bool, mode: str) -> MemberPlan | None:
    """The plan of ``spec`` streamed where it trains, or None when it is read here (too small, a sample, or
    not readable in slices)."""
    if mode == "never":
        return None
    ref = StreamedReference.plan(spec, config.format, seed=seed, strict=strict)
    if ref is None or (mode == "auto" and ref.rows * config.format.pixels * 4 <= STREAM_BYTES):
        return None
    if ref.rows < 2:
        raise data.SpecError(f"{spec}: need at least 2 images to split into train and test, got {ref.rows}")
    read_slice(ref.slices[0], ref.fmt, strict)  # a bad file or format fails now, not on a worker
    n_train, n_test = ref.counts()
    member = Member(name=spec, spec=spec, class_=None, config=config.to_dict(), data_seed=seed,
                    fingerprint=ref.fingerprint(), n_train=n_train, n_test=n_test, split=data.ROW_HASH)
    log.info("%s: %d images, streamed where it trains", spec, ref.rows)
    return MemberPlan(member, None, None, stream=ref)


def resolve_format(refs: list[str], requested: str = "auto", *, seed: int = 0, data_dir=None,
                   cache: dict | None = None) -> ImageFormat:
    """The fleet's format: ``requested`` (CxHxW), or with ``auto`` the references' common native format;
    references of different native formats refuse in one line that names them."""
    if str(requested).strip().lower() != "auto":
        return ImageFormat.parse(requested)
    found: dict[ImageFormat, list[str]] = {}
    for spec in refs:
        found.setdefault(data.native_format(spec, seed=seed, data_dir=data_dir, cache=cache), []).append(spec)
    if len(found) > 1:
        named = "; ".join(f"{f}: {', '.join(specs)}" for f, specs in sorted(found.items()))
        raise FormatError(f"the references differ in image format ({named}); pick one with --image-format "
                          f"CxHxW (e.g. {max(found, key=lambda f: len(found[f]))}) and the rest are converted")
    return next(iter(found))


def conversions(refs: list[str], fmt: ImageFormat, *, seed: int = 0, data_dir=None,
                cache: dict | None = None) -> dict[str, str]:
    """{reference: what the conversion rule does to it} for each reference not already in ``fmt``."""
    out = {}
    for spec in refs:
        step = conversion(data.native_format(spec, seed=seed, data_dir=data_dir, cache=cache), fmt)
        if step:
            out[spec] = step
    return out


def plan_fleet(refs: list[str], config: TrainConfig, *, samples: int | None = None,
               per_class: bool = False, seed: int = 0, data_dir=None, cache: dict | None = None,
               strict: bool = False, stream: str = "auto") -> list[MemberPlan]:
    """Load every reference and split it 5:1; one plan per member (``cache``: see :func:`data.load`).

    ``stream``: ``auto`` streams a whole reference (no ``samples``, no ``per_class``) that can be read in
    slices and is larger than :data:`STREAM_BYTES` (its images are then read where it trains, never here);
    ``always`` streams every such reference whatever its size; ``never`` reads every reference here.

    Images are converted to ``config.image_format`` by the rule (``strict``: refuse instead).
    With ``per_class`` each labelled reference yields one member per class,
    named ``SPEC#CLASS``; ``samples`` is then drawn per class. ``seed`` is the
    data seed (samples, splits, variants); ``config.seed`` the model seed.
    """
    for spec in refs:  # fail on grammar before any slow loading
        data.parse_spec(spec)
    plans: list[MemberPlan] = []
    cache = {} if cache is None else cache
    fmt = dict(fmt=config.format, strict=strict)
    if stream not in STREAM_MODES:
        raise UserError(f"unknown stream mode '{stream}'; known: {', '.join(STREAM_MODES)}")
    for spec in refs:
        if not per_class and not samples:
            if (streamed := _streamed(spec, config, seed=seed, strict=strict, mode=stream)) is not None:
                plans.append(streamed)
                continue
        if not per_class:
            train, test = data.prepare(spec, samples=samples, seed=seed, data_dir=data_dir, cache=cache, **fmt)
            plans.append(_record(train.spec, spec, None, train, test, config, seed, data.split_rule(samples)))
            continue
        for part in data.prepare_by_class(spec, samples=samples, seed=seed, data_dir=data_dir, cache=cache, **fmt):
            plans.append(_record(part.spec, spec, part.name, part.train, part.test, config, seed,
                                 data.STRATIFIED))
    names = [p.name for p in plans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise data.SpecError(f"reference(s) given twice: {', '.join(dupes)}")
    return plans


def is_trained(existing: Member | None, plan: MemberPlan) -> bool:
    """True when ``existing`` already holds this plan's finished training."""
    return (existing is not None and existing.sha256 != ""
            and existing.fingerprint == plan.member.fingerprint
            and TrainConfig.from_dict(existing.config) == TrainConfig.from_dict(plan.member.config))


class FleetWriter:
    """Adds finished members to a fleet directory, rewriting the manifest each time.

    Members already in the manifest are kept (in their order), so training a
    fleet in several runs, or resuming one, never loses finished work.
    ``out`` is a local path or a URI (:mod:`simex_ray.storage`); each member's weights are
    written (atomically) before the manifest that lists them, so a reader never finds a
    manifest naming a missing or partial weight file.
    """

    def __init__(self, out, extra: dict | None = None, order: list[str] | None = None, *, flush_s: float = 0.0):
        self.out = storage.resolve(out)
        self.extra = extra or {}
        self.order = list(order or [])
        # A manifest of M members costs O(M) to write; rewriting it for each of M members is O(M^2),
        # which dominated training 1,000 small members. With flush_s > 0 it is written at most that
        # often (and by flush()); the weights still always land before the manifest that lists them.
        self.flush_s, self._last_write, self._dirty = float(flush_s), float("-inf"), False
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
        """The plans still to train: not in the manifest, changed, or with bad weights.

        A trained member without latent moments (a fleet from before them) is not retrained: its moments are
        computed now from its weights and its plan's data, and the manifest is rewritten with them."""
        todo, added = [], False
        for plan in plans:
            old = self.members.get(plan.name)
            if is_trained(old, plan) and self._weights_intact(old):
                log.info("%s: already trained, skipping", plan.name)
                if not old.latent:
                    added = self._add_moments(plan, old) or added
            else:
                todo.append(plan)
        if added:
            self.flush()
        return todo

    def _add_moments(self, plan: MemberPlan, member: Member) -> bool:
        """Fit a trained member's latent moments from its stored weights (no training); True when it got them."""
        import io

        import torch

        from .manifest import read_weights

        state = torch.load(io.BytesIO(read_weights(self.out, member)), map_location="cpu", weights_only=True)
        _, latent, moments = own_statistics(member, state, plan.test_images(), plan.train_sample())
        if moments is None:
            return False
        member.latent = latent
        save_moments(self.out, member, *moments)
        with self._lock:
            self._dirty = True
        log.info("%s: latent moments added (trained before them)", member.name)
        return True

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
        if history and "ref_mean_l2" in history[0]:  # a streamed member's, measured while it trained
            member.metrics.setdefault("ref_mean_l2", float(history[0]["ref_mean_l2"]))
        member.history = history
        member.calibration, member.latent, moments = own_statistics(member, state_dict, plan.test_images(),
                                                                    plan.train_sample())
        save_weights(self.out, member, state_dict)  # the weights first ...
        if moments is not None:
            save_moments(self.out, member, *moments)
        with self._lock:  # ... then the manifest that lists them
            self.members[member.name] = member
            self._dirty = True
            if time.monotonic() - self._last_write >= self.flush_s:
                self._write()
        return member

    def add_cross_sketches(self, plans: list[MemberPlan]) -> bool:
        """Every member's cross sketch (:func:`~.mixture.cross_sketches`), once the fleet's member set is final:
        the held-out test split of every plan (at most :data:`CROSS_SAMPLES` images) scored through every
        member in one fused pass; the manifest is rewritten. True when they were computed.

        Skipped (the composition of the fleet's answers stays the nearest rule) when the fleet holds a member
        with no plan here or a plan not yet trained (a member added or trained separately: a later run over
        the whole fleet computes them), when the sketches already cover the members, or when the members mix
        image formats, or it has more than :data:`CROSS_MAX_MEMBERS` members. No training: only the members'
        forward passes."""
        from .fleet import Fleet
        from .manifest import common_format
        from .mixture import covers, cross_sketches

        by_name = {p.name: p for p in plans}
        names = [n for n in self.order if n in self.members] + [n for n in self.members if n not in self.order]
        if not 2 <= len(names) <= CROSS_MAX_MEMBERS or set(names) != set(by_name) or \
                not all(is_trained(self.members[n], by_name[n]) for n in names):
            return False
        if covers({n: self.members[n].cross_sketch for n in names}, names):
            return False
        if any(by_name[n].stream is None and by_name[n].x_test is None for n in names):
            return False  # a plan whose images were let go
        try:
            common_format([self.members[n] for n in names])
        except FleetError as e:
            log.warning("no cross sketches: %s", e)
            return False
        fleet = Fleet.from_records(self.out, [self.members[n].to_json() for n in names])
        held = {n: fleet.per_sample(first_images(by_name[n].test_images(), CROSS_SAMPLES), names)[:, 0]
                for n in names}
        if any(d.shape[-1] == 0 for d in held.values()):
            return False
        with self._lock:
            for n, sketch in cross_sketches(held).items():
                self.members[n].cross_sketch = sketch
            self._dirty = True
        self.flush()
        log.info("cross sketches of %d members written", len(names))
        return True

    def flush(self) -> None:
        """Write the manifest if a member was added since it was last written."""
        with self._lock:
            if self._dirty:
                self._write()

    def _write(self) -> None:
        rank = {n: i for i, n in enumerate(self.order)}
        ordered = sorted(self.members.values(), key=lambda m: rank.get(m.name, len(rank)))
        write_manifest(self.out, ordered, **self.extra)
        self._last_write, self._dirty = time.monotonic(), False


CROSS_SAMPLES = 1000  # held-out images per reference in the members' cross sketches
# K members' cross sketches hold K² x (GRID_SIZE + 1) values in the manifest (and an answer K² for its Gram
# matrix): larger fleets keep the nearest rule
CROSS_MAX_MEMBERS = 64


def first_images(x, cap: int) -> np.ndarray:
    """The first ``cap`` images of an array, or of an iterable of (n, C, H, W) blocks (read only as far as that
    needs)."""
    if isinstance(x, np.ndarray):
        return x[:cap]
    blocks, n = [], 0
    for block in x:
        blocks.append(np.asarray(block)[:cap - n])
        n += len(blocks[-1])
        if n >= cap:
            break
    return np.concatenate(blocks) if blocks else np.zeros((0,), np.float32)


def own_statistics(member: Member, state_dict, x_test, x_train=None) -> tuple[dict, dict, tuple | None]:
    """What a finished member records of its own data: (its calibration sketch: the δ distribution of its
    own held-out test split; its latent record; its latent moments (μ, P) or None).

    The moments are fitted on the codes of ``x_train`` (at most :data:`~.latent.LATENT_SAMPLES` training
    images, :meth:`MemberPlan.train_sample`); the held-out split's δ and z then come from one pass of the
    scoring engine (``x_test`` an array or an iterable of blocks: a streamed split, read block by block).
    Without training images (or fewer than 2) the member gets no moments, and ranks as fleets did before."""
    import torch

    from ..models import create_autoencoder
    from ..scoring import ScoringEngine

    if isinstance(x_test, np.ndarray) and not len(x_test):
        return {}, {}, None
    model = create_autoencoder(member.architecture, member.image_format)
    model.load_state_dict({k: torch.as_tensor(v).cpu() for k, v in state_dict.items()})
    model.eval()
    moments = None
    if x_train is not None and len(x_train) >= 2:
        moments = fit_moments(encode_all(model, x_train))
    engine = ScoringEngine({member.name: model}, {member.name: member.loss},
                           moments={member.name: moments} if moments is not None else None)
    both = engine.per_sample(x_test, latent=True)[0]  # (2, N): δ and z of the held-out split
    if not both.shape[-1]:
        return {}, {}, None
    latent = {}
    if moments is not None:
        latent = {"dim": int(len(moments[0])), "n_fit": int(len(x_train)), "own_mean": float(both[1].mean()),
                  "n": int(both.shape[-1]), "estimator": LATENT_ESTIMATOR}
    return calibration_of(both[0]), latent, moments


def fleet_extra(refs: list[str], config: TrainConfig, *, samples: int | None, per_class: bool,
                data_seed: int) -> dict:
    """What the manifest records about how the fleet was asked for (beside each member's own record)."""
    return {"refs": refs, "samples": samples, "per_class": per_class, "seed": config.seed, "data_seed": data_seed}

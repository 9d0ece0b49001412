"""Train a fleet in this process (no Ray), members alike in fused passes: the local path of `simex train
--no-ray`, of the experiments' small fleets, and of every test that needs a fleet."""

from __future__ import annotations

import io
import logging
import tempfile

import torch

from ..fused_training import MemberJob, plan_passes, train_members
from ..training import TrainConfig, train_member_streamed
from .fleet import Fleet
from .manifest import slug
from .plan import FleetWriter, MemberPlan, fleet_extra, plan_fleet

log = logging.getLogger("simex_ray.plan")


def train_fleet_local(plans: list[MemberPlan], out, *, on_epoch=None, extra: dict | None = None,
                      members_per_pass: int | None = None):
    """Train every pending member in this process (no Ray), members alike in fused passes.

    ``on_epoch(member_name, metrics)`` is called after each epoch. ``members_per_pass``: at most this many
    members per fused pass (None: as many as its memory bound allows; 1: one member after another).
    Returns the FleetWriter holding the manifest records.
    """
    writer = FleetWriter(out, extra, order=[p.name for p in plans], flush_s=MANIFEST_FLUSH_S)
    try:
        _train_pending(writer, plans, on_epoch, members_per_pass)
        writer.add_cross_sketches(plans)  # the member set is final: the composition by matching
    finally:  # however training ends (done, an error, Ctrl-C), every finished member is listed
        writer.flush()
    return writer


MANIFEST_FLUSH_S = 2.0  # the manifest is rewritten at most this often while a fleet trains


def _train_pending(writer: FleetWriter, plans: list[MemberPlan], on_epoch, per_pass: int | None) -> None:
    pending = writer.pending(plans)
    # Like the Ray path: a checkpoint per member and epoch, so a re-run continues where this one stopped.
    ckpts = {p.name: writer.out.join("checkpoints", "local", f"{slug(p.name)}-{p.run_key}.pt") for p in pending}

    def save(reports):
        for name, metrics, state in reports:
            buf = io.BytesIO()
            torch.save(state, buf)
            ckpts[name].write_bytes_atomic(buf.getvalue())
            if on_epoch is not None:
                on_epoch(name, metrics)

    for plan in (p for p in pending if p.stream is not None):  # large: one at a time, read slice by slice
        config = TrainConfig.from_dict(plan.member.config)
        model, history = train_member_streamed(
            plan.stream, config, resume=_resume_state(ckpts[plan.name], config, plan.name),
            on_epoch=lambda epoch, metrics, state, name=plan.name: save([(name, metrics, state)]))
        writer.add(plan, model.state_dict(), history)
    todo = [p for p in pending if p.stream is None]
    configs = [TrainConfig.from_dict(p.member.config) for p in todo]
    for indices in plan_passes(configs, per_pass):
        jobs = [MemberJob(todo[i].name, configs[i], todo[i].x_train, todo[i].x_test,
                          _resume_state(ckpts[todo[i].name], configs[i], todo[i].name)) for i in indices]
        for i, (model, history) in zip(indices, train_members(jobs, on_round=save)):
            writer.add(todo[i], model.state_dict(), history)


def _resume_state(ckpt, config: TrainConfig, name: str) -> dict | None:
    """A member's last epoch checkpoint, or None (none, unreadable, or trained longer than now asked)."""
    if not ckpt.is_file():
        return None
    try:
        resume = torch.load(io.BytesIO(ckpt.read_bytes()), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint: start this member over
        log.warning("%s: unreadable checkpoint %s; training from scratch", name, ckpt)
        return None
    return None if resume["epoch"] > config.epochs else resume  # longer than asked: start over, never pretend


def train_and_load(plans: list[MemberPlan], out=None, *, on_epoch=None, extra: dict | None = None):
    """:func:`train_fleet_local` into ``out`` (None: a temporary directory, removed) -> the loaded Fleet.

    A fleet loaded from a temporary directory has ``path = None``.
    """
    if out is not None:
        train_fleet_local(plans, out, on_epoch=on_epoch, extra=extra)
        return Fleet.load(out)
    with tempfile.TemporaryDirectory(prefix="simex-fleet-") as tmp:
        train_fleet_local(plans, tmp, on_epoch=on_epoch, extra=extra)
        fleet = Fleet.load(tmp)
    fleet.path = None
    return fleet


def build_fleet_local(refs: list[str], out, config: TrainConfig, *, samples: int | None = None,
                      per_class: bool = False, seed: int = 0, data_dir=None, on_epoch=None,
                      strict: bool = False, cache: dict | None = None, members_per_pass: int | None = None,
                      stream: str = "auto") -> tuple[list[MemberPlan], FleetWriter]:
    """Specs -> trained fleet directory, in this process: `simex train --no-ray`.

    ``seed`` is the data seed (samples, splits, variants); ``config.seed`` the model seed.
    ``on_epoch(member, metrics)`` gets the metrics with ``epochs`` added, as the Ray path reports them.
    Images are converted to ``config.image_format`` by the rule; ``strict`` refuses instead.
    """
    plans = plan_fleet(refs, config, samples=samples, per_class=per_class, seed=seed, data_dir=data_dir,
                       strict=strict, cache=cache, stream=stream)
    extra = fleet_extra(refs, config, samples=samples, per_class=per_class, data_seed=seed)
    progress = (lambda n, m: on_epoch(n, {**m, "epochs": config.epochs})) if on_epoch else None
    return plans, train_fleet_local(plans, out, on_epoch=progress, extra=extra, members_per_pass=members_per_pass)

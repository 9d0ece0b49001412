"""The Serve layouts, one object each: which scorer applications serve a fleet, what the ingress is told of
them, and how the ingress gets per-sample δ from them.

A layout is a :class:`Layout`: ``scorers`` (the scorer applications: name, application builder of
:mod:`.app`, arguments), ``ingress_args`` (its part of the ingress's ``user_config``) and ``router`` (in the
ingress: the strategy that turns a batch and member names into a (members, 2, N) array of per-sample δ and
latent distance z). :func:`deploy
<simex_ray.distributed.serving.deploy.deploy>` and :func:`serve_config
<simex_ray.distributed.serving.deploy.serve_config>` build the same applications from ``scorers``; the
ingress picks its router by the ``mode`` of its config. Adding a layout is one class here and its name and
one-line description in :data:`simex_ray.choices.SERVE_MODES` (kept there, Ray-free, for the CLI's
``--mode`` choices and help; ``tests/test_layering.py`` checks the two name the same layouts).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from ...fleet import slug
from .sharded import gather_shards, shard_layout

MEMBER_PREFIX = "simex-m-"
FLEET_PREFIX = "simex-fleet-"
SHARD_PREFIX = "simex-shard-"
SCORER_PREFIXES = (MEMBER_PREFIX, FLEET_PREFIX, SHARD_PREFIX)

# call(handle, what, x) -> that scorer's δ for x; an ApiError 503 when it cannot answer (the ingress's retry)
Call = Callable[[Any, str, np.ndarray], Awaitable[np.ndarray]]


def fleet_digest(members: list[dict]) -> str:
    """Names and weight hashes of every member: a new digest = a new fused application."""
    return hashlib.sha256("|".join(f"{m['name']}={m['sha256']}" for m in members).encode()).hexdigest()


def member_app_name(name: str, sha256: str) -> str:
    """The weights' hash is in the name: changed weights = a new application, never a restart in place."""
    return f"{MEMBER_PREFIX}{slug(name)}-{sha256[:8]}"


def fleet_app_name(members: list[dict]) -> str:
    return f"{FLEET_PREFIX}{fleet_digest(members)[:8]}"


def shard_app_name(members: list[dict]) -> str:
    """A shard is named by its members' names and weight hashes: a shard whose members did not change
    keeps its application (and replicas) across an update."""
    return f"{SHARD_PREFIX}{fleet_digest(members)[:8]}"


def served_record(record: dict) -> dict:
    """What a replica needs of a checked manifest record: all of it but the training history."""
    return {k: v for k, v in record.items() if k != "history"}


@dataclass(frozen=True)
class ScorerApp:
    """One scorer application: its Serve name, its builder in :mod:`.app` (also the ``import_path`` of a
    Serve config file), the builder's arguments, and the checked manifest records a :func:`deploy` passes
    on (a config file passes none: its replicas read the manifest)."""

    name: str
    builder: str  # "member_app" or "fleet_app"
    args: dict[str, Any]
    records: dict[str, Any]  # {"record": r} or {"records": [r, ...]}


class Router:
    """The ingress's side of a layout: per-sample δ and z of ``names`` for a batch, (len(names), 2, N)."""

    async def per_sample(self, x: np.ndarray, names: list[str], call: Call) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/members`` says of the layout beyond its mode."""
        return {}


class Layout:
    """One Serve layout; subclasses fill in the three parts. ``settings`` is a
    :class:`~simex_ray.distributed.serving.deploy.ServeSettings`; ``scaling`` its per-scorer Serve options."""

    name = ""  # as in choices.SERVE_MODES, which holds its one-line help

    def scorers(self, fleet: str, members: list[dict], settings, scaling: dict[str, Any]) -> list[ScorerApp]:
        return []

    def ingress_args(self, members: list[dict], settings, scaling: dict[str, Any]) -> dict[str, Any]:
        return {}

    def router(self, config: dict[str, Any], handle: Callable[[str], Any], order: list[str],
               local: Callable[[np.ndarray], Awaitable[np.ndarray]]) -> Router:
        """The ingress's router for its ``config``. ``handle(app)``: a Serve handle; ``order``: the member
        rows a fleet scorer returns; ``local``: the ingress's own engine (the embedded layout)."""
        raise NotImplementedError


class _Rows(Router):
    """Every member from one scorer (a fleet application, or the ingress itself), then the rows asked."""

    def __init__(self, score: Callable[[np.ndarray, Call], Awaitable[np.ndarray]], order: list[str]):
        self.score, self.order = score, order

    async def per_sample(self, x, names, call):
        d = await self.score(x, call)
        return d[[self.order.index(n) for n in names]]


class Members(Layout):
    """Each member its own application, scaled and updated on its own."""

    name = "members"

    def scorers(self, fleet, members, settings, scaling):
        return [ScorerApp(member_app_name(m["name"], m["sha256"]), "member_app",
                          {"fleet": fleet, "member": m["name"], "sha256": m["sha256"], **scaling},
                          {"record": served_record(m)}) for m in members]

    def router(self, config, handle, order, local):
        handles = {name: handle(spec["app"]) for name, spec in config["members"].items() if name in order}

        class Fanout(Router):
            async def per_sample(self, x, names, call):
                return np.stack(await asyncio.gather(*(call(handles[n], f"member '{n}'", x) for n in names)))

        return Fanout()


class Fused(Layout):
    """The whole fleet in one application on the fused engine: one hop past the ingress."""

    name = "fused"

    def scorers(self, fleet, members, settings, scaling):
        return [ScorerApp(fleet_app_name(members), "fleet_app",
                          {"fleet": fleet, "digest": fleet_digest(members), **scaling},
                          {"records": [served_record(m) for m in members]})]

    def ingress_args(self, members, settings, scaling):
        return {"fused": fleet_app_name(members)}

    def router(self, config, handle, order, local):
        scorer = handle(config["fused"])
        return _Rows(lambda x, call: call(scorer, "the fleet scorer", x), order)


class Sharded(Layout):
    """S fused applications of K members each, asked at once and merged (:mod:`.sharded`)."""

    name = "sharded"

    @staticmethod
    def shards(members: list[dict], settings) -> list[list[dict]]:
        """``members`` in the shards of the layout (contiguous, fleet order)."""
        by_name = {m["name"]: m for m in members}
        return [[by_name[n] for n in shard]
                for shard in shard_layout([m["name"] for m in members], settings.shards, settings.members_per_shard)]

    def scorers(self, fleet, members, settings, scaling):
        return [ScorerApp(shard_app_name(shard), "fleet_app",
                          {"fleet": fleet, "digest": fleet_digest(shard), **scaling,
                           "names": [m["name"] for m in shard]},
                          {"records": [served_record(m) for m in shard]})
                for shard in self.shards(members, settings)]

    def ingress_args(self, members, settings, scaling):
        return {"shards": [{"app": shard_app_name(shard), "members": [m["name"] for m in shard]}
                           for shard in self.shards(members, settings)]}

    def router(self, config, handle, order, local):
        shards = [(handle(s["app"]), list(s["members"])) for s in config["shards"]]
        described = {"shards": [{"app": s["app"], "members": list(s["members"])} for s in config["shards"]]}

        class Gather(Router):
            async def per_sample(self, x, names, call):
                return await gather_shards(shards, names, len(x), lambda h, what: call(h, what, x))

            def describe(self):
                return described

        return Gather()


class Embedded(Layout):
    """The ingress replicas hold the fleet: the proxy's hop to the ingress is the only one."""

    name = "embedded"

    def ingress_args(self, members, settings, scaling):
        """The ingress replicas are the scorers: sized like them (--replicas, or --ingress-replicas if more)."""
        args = {"embedded": True, **scaling}
        if not settings.autoscaling:
            args["num_replicas"] = max(settings.replicas, settings.ingress_replicas)
        return args

    def router(self, config, handle, order, local):
        return _Rows(lambda x, call: local(x), order)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (Members(), Fused(), Embedded(), Sharded())}


def mode_of(config: dict[str, Any]) -> str:
    """The layout an ingress config names; configs written before ``mode`` existed say it by their keys."""
    if config.get("mode") in LAYOUTS:
        return config["mode"]
    return ("embedded" if config.get("embedded") else "fused" if config.get("fused")
            else "sharded" if config.get("shards") else "members")

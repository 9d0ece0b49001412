"""The sharded layout: the fleet split into S shard applications, each a fused scorer of its members.

::

    POST /v1/score -> ingress --score(x)--> shard 1  simex-shard-<digest8>  members 1..K    (fused engine)
                              --score(x)--> shard 2  simex-shard-<digest8>  members K+1..2K
                              ...           (all at once, through DeploymentHandles)
                     <-- (K_s, 2, N) per-sample δ and z from each shard; rows merged in fleet order --> score_result

Shards answer per-sample δ (and the latent distance z), not Δ: the composition and each sample's nearest member compare every
member on the same sample, so only the ingress, holding every row, can answer them; the merged
(members, N) array is exactly what the fused layout's one scorer returns.

Shards are contiguous in fleet order. A shard application is named by the digest of its members'
names and weight hashes (:func:`~simex_ray.distributed.serving.layouts.shard_app_name`), so an update
deploys only the shards whose members changed, and a shard that did not change keeps its replicas.
Each shard is its own application, with its own replicas or autoscaling: a hot shard scales alone.

Failure: an answer is merged from every shard the request needs, or it is not given. The ingress
retries a shard that fails once (a replica lost between routing and reply); a shard that fails again
fails the whole request with a 503 (and Retry-After), and the other shards' calls are cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import numpy as np

from ...api import ApiError
from ..batch import shards_of
from ...errors import UserError

DEFAULT_MEMBERS_PER_SHARD = 16


def shard_layout(names: list[str], shards: int | None = None, members_per_shard: int | None = None
                 ) -> list[list[str]]:
    """The members ``names`` (fleet order) in contiguous shards.

    ``members_per_shard`` K: shards of K (the last one shorter), so appending members to the fleet
    leaves the earlier shards as they are. ``shards`` S: S shards of near-equal size (the first ones
    one longer), at most one per member. Neither: shards of :data:`DEFAULT_MEMBERS_PER_SHARD`."""
    if shards is not None and members_per_shard is not None:
        raise UserError("give --shards or --members-per-shard, not both")
    for flag, value in (("--shards", shards), ("--members-per-shard", members_per_shard)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not names:
        return []
    if shards is None:
        return shards_of(list(names), members_per_shard or DEFAULT_MEMBERS_PER_SHARD)
    count = min(shards, len(names))
    size, longer = divmod(len(names), count)
    out, start = [], 0
    for i in range(count):
        k = size + (i < longer)
        out.append(list(names[start:start + k]))
        start += k
    return out


async def gather_shards(shards: list[tuple[Any, list[str]]], names: list[str], n: int,
                        call: Callable[[Any, str], Awaitable[np.ndarray]]) -> np.ndarray:
    """Per-sample values of ``names``: (len(names), 2, n) δ and z (or (len(names), n) δ, from shards of a
    version without z), rows in ``names`` order, from every shard holding one of them, all asked at once.

    ``shards``: (handle, its members in its row order) per shard, fleet order; ``call(handle, what)``:
    that shard's (len(members), 2, n) values, raising :class:`~simex_ray.api.ApiError` (503) when the shard
    cannot answer. The first shard that fails fails the request (the other calls are cancelled), and
    an answer of the wrong shape is a 503 too: the result is never merged from a subset of the shards."""
    wanted = set(names)
    asked = [(i, handle, members) for i, (handle, members) in enumerate(shards) if wanted & set(members)]
    tasks = [asyncio.ensure_future(call(handle, f"shard {i + 1}/{len(shards)}")) for i, handle, _ in asked]
    try:
        parts = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    rows: dict[str, np.ndarray] = {}
    for (i, _, members), d in zip(asked, parts):
        d = np.asarray(d)
        if d.ndim not in (2, 3) or d.shape[0] != len(members) or d.shape[-1] != n \
                or d.ndim == 3 and d.shape[1] != 2:
            raise ApiError(503, f"shard {i + 1}/{len(shards)} answered shape {d.shape} for {len(members)} "
                                f"member(s) and {n} image(s); retry shortly")
        rows.update(zip(members, d))
    missing = [name for name in names if name not in rows]
    if missing:  # the layout does not hold a served member: a deployment in the middle of a change
        raise ApiError(503, f"no shard serves member(s) {', '.join(missing[:5])}; retry shortly")
    if len({rows[name].ndim for name in names}) > 1:  # shards of two versions mid-update: δ alone
        return np.stack([rows[name] if rows[name].ndim == 1 else rows[name][0] for name in names])
    return np.stack([rows[name] for name in names])

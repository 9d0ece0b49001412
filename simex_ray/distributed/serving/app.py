"""Ray Serve deployments: one application per fleet member, one ingress application.

Each member is its own Serve application (``simex-m-<member>-<sha8>``) with a
``MemberScorer`` deployment, so a fleet update deploys only new or changed
members and deletes removed ones while the rest keep serving. The ingress
application (``simex``) validates requests, fans a batch out to the selected
members concurrently, gathers Δ and returns the ranking; which members exist
is its ``user_config``, a lightweight update that restarts nothing.
"""


import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from ... import __version__
from ...api import JSON, NPY, ApiError, Limits, check_api_key, check_body_size, parse_score_request, \
    score_response, select_members
from ...fleet import Fleet, FleetError, read_manifest

log = logging.getLogger(__name__)

INGRESS_APP = "simex"


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=20)
class MemberScorer:
    """One member's autoencoder; concurrent requests are batched into one forward pass."""

    def __init__(self, fleet: str, member: str, sha256: str, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.fleet = Fleet.load(fleet, names=[member])
        self.member = member
        if self.fleet.members[member].sha256 != sha256:
            raise FleetError(f"member '{member}' in {fleet} changed while deploying (sha256 differs); redeploy")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def score(self, batches: list[np.ndarray]) -> list[tuple[float, int]]:
        """Per request: (sum of per-sample delta, number of samples)."""
        sizes = [len(b) for b in batches]
        x = np.concatenate(batches) if len(batches) > 1 else batches[0]
        # Off the event loop, so health checks and new requests are still accepted.
        deltas = await asyncio.get_running_loop().run_in_executor(
            None, self.fleet.per_sample_delta, self.member, x)
        out, start = [], 0
        for n in sizes:
            out.append((float(deltas[start:start + n].sum()), n))
            start += n
        return out

    def pid(self) -> int:
        return os.getpid()


def member_app(args: dict[str, Any]):
    """Application builder for one member (also the `import_path` in Serve config files).

    args: fleet, member, sha256, and optionally num_replicas (int), autoscaling_config
    (dict), num_cpus (per replica).
    """
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": float(args.get("num_cpus", 0.25))}}
    if args.get("autoscaling_config"):
        options["autoscaling_config"] = args["autoscaling_config"]
    else:
        options["num_replicas"] = int(args.get("num_replicas", 1))
    return MemberScorer.options(**options).bind(str(args["fleet"]), args["member"], args["sha256"])


# ------------------------------------------------------------------ ingress

class ScoreResponse(BaseModel):
    n: int = Field(description="number of images scored")
    loss: str = Field(description="reconstruction error δ: mse or issim")
    delta: dict[str, float] = Field(description="Δ(X | member) per member; smaller = more similar")
    ranking: list[str] = Field(description="members, most similar first")
    latency_ms: float = Field(description="time spent in the service")


class ErrorResponse(BaseModel):
    error: str
    status: int


SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": {
                "type": "object", "required": ["images"],
                "properties": {
                    "images": {"type": "array", "description":
                               "shape (N,28,28) or (N,1,28,28); floats in [0,1] or integers 0..255"},
                    "members": {"type": "array", "items": {"type": "string"},
                                "description": "score only these members (default: all)"},
                }}},
            NPY: {"schema": {"type": "string", "format": "binary",
                             "description": "numpy.save of a (N,28,28) or (N,1,28,28) array"}},
        },
    }
}
ERRORS = {code: {"model": ErrorResponse, "description": why} for code, why in {
    400: "malformed JSON or .npy", 401: "missing or wrong API key", 404: "unknown member",
    413: "too many images or body too large", 415: "unsupported content type",
    422: "wrong shape, dtype, NaN/inf, out-of-range values or empty batch",
    503: "a member is temporarily unavailable"}.items()}

api = FastAPI(
    title="simex-ray scoring API", version=__version__,
    description="SimEx: Δ(X | Y) of a batch of unknown images X against every reference "
                "autoencoder Y of a fleet; smaller Δ = more similar. Send the API key, when one "
                "is set, in the X-API-Key header.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse(e.to_json(), status_code=e.status)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class Ingress:
    """Validates, fans out to member applications, gathers Δ, ranks."""

    def __init__(self):
        self.members: dict[str, dict] = {}
        self.handles: dict[str, Any] = {}
        self.api_key, self.limits, self.loss, self.fleet = None, Limits(), "mse", ""

    def reconfigure(self, config: dict[str, Any]) -> None:
        """config: fleet, members {name: {app, sha256}}, api_key_sha256, max_images, max_body_bytes."""
        manifest = read_manifest(config["fleet"])
        records = {m["name"]: m for m in manifest["members"]}
        self.members = {name: {**records[name], **spec} for name, spec in config["members"].items()
                        if name in records}
        self.handles = {name: serve.get_app_handle(spec["app"]) for name, spec in self.members.items()}
        self.api_key = config.get("api_key_sha256") or None
        self.limits = Limits(int(config.get("max_images", Limits.max_images)),
                             int(config.get("max_body_bytes", Limits.max_body_bytes)))
        self.loss, self.fleet = manifest.get("loss", "mse"), config["fleet"]
        log.info("serving %d member(s) from %s", len(self.members), self.fleet)

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        check_body_size(int(length) if length and length.isdigit() else None, self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            check_body_size(size, self.limits)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _member_delta(self, name: str, x: np.ndarray) -> float:
        for attempt in range(2):  # one retry: a replica may die between routing and reply
            try:
                total, n = await self.handles[name].score.remote(x)
                return total / n
            except Exception as e:  # noqa: BLE001 - actor death, unavailable replica
                if attempt == 1:
                    raise ApiError(503, f"member '{name}' is unavailable ({type(e).__name__}); retry shortly") \
                        from None
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    @api.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, openapi_extra=SCORE_BODY,
              summary="Δ of a batch of images against every member, and the ranking")
    async def score(self, request: Request):
        t0 = time.perf_counter()
        check_api_key(self.api_key, request.headers.get("x-api-key"))
        x, requested = parse_score_request(await self._read_body(request),
                                           request.headers.get("content-type"), self.limits)
        names = select_members(requested, list(self.members))
        deltas = await asyncio.gather(*(self._member_delta(n, x) for n in names))
        return score_response(len(x), self.loss, dict(zip(names, deltas)), 1000 * (time.perf_counter() - t0))

    @api.get("/v1/members", responses={401: ERRORS[401]}, summary="the fleet's members")
    async def members_info(self, request: Request):
        check_api_key(self.api_key, request.headers.get("x-api-key"))
        return {"fleet": self.fleet, "loss": self.loss, "members": [
            {"name": name, "spec": m.get("spec"), "class": m.get("class"), "loss": m["config"]["loss"],
             "architecture": m["config"]["architecture"], "sha256": m["sha256"],
             "training": {"epochs": m["config"]["epochs"], "optimizer": m["config"]["optimizer"],
                          "lr": m["config"]["lr"], "n_train": m.get("n_train"),
                          **{k: m.get("metrics", {}).get(k) for k in ("train_delta", "test_delta")}}}
            for name, m in self.members.items()]}

    @api.get("/healthz", summary="liveness")
    async def healthz(self):
        return {"status": "ok", "members": len(self.members), "pid": os.getpid()}


def ingress_app(args: dict[str, Any]):
    """Application builder for the ingress (also the `import_path` in Serve config files).

    args: fleet, members {name: {app, sha256}}, api_key_sha256, max_images, max_body_bytes,
    and optionally num_replicas.
    """
    config = {k: v for k, v in args.items() if k != "num_replicas"}
    return Ingress.options(user_config=config, num_replicas=int(args.get("num_replicas", 1))).bind()

"""Ray Serve deployments: the scorers of each layout, and one ingress application.

Four layouts. *members* (default): each member is its own Serve application
(``simex-m-<member>-<sha8>``) with a ``MemberScorer`` deployment, so members
scale independently and a fleet update deploys only new or changed members.
*fused*: one ``FleetScorer`` application (``simex-fleet-<digest8>``) holds the
whole fleet on the fused scoring engine, so a request is one hop past the ingress.
*embedded*: the ingress replicas hold the whole fleet themselves; the proxy's
hop to the ingress is the only one. *sharded*: S applications
(``simex-shard-<digest8>``, a ``ShardScorer``: the fused scorer of K members),
asked all at once and merged (:mod:`.sharded`). The ingress
application (``simex``) validates requests, gets the per-sample δ (fanned out
to the members or shards, or from the fleet scorer), and returns every Δ, ranking and
the composition; which scorers exist is its ``user_config``, a lightweight
update that restarts nothing. Requests carry images in the fleet's format (its
:class:`~simex_ray.formats.ImageFormat`); the OpenAPI text served at
``/openapi.json`` names that format's shapes.
"""


import asyncio
import copy
import json
import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from ... import __version__
from ...api import JSON, MULTIPART, NPY, ApiError, Limits, check_api_key, check_body_size, expected_shapes, \
    parse_flag, parse_ranking, parse_score_request, parse_select_request, score_response, score_response_model, \
    select_members
from ...errors import one_line
from ...fleet import Fleet, FleetError, StaleWeightsError, read_manifest
from ...fleet.manifest import common_format, record_format
from ...formats import LEGACY, ImageFormat
from .layouts import LAYOUTS, Router, fleet_digest, mode_of

log = logging.getLogger(__name__)

INGRESS_APP = "simex"


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=20)
class MemberScorer:
    """One member's autoencoder; concurrent requests are batched into one forward pass."""

    def __init__(self, fleet: str, member: str, sha256: str, threads: int = 1, device: str = "cpu",
                 record: dict | None = None):
        import torch

        from ...scoring import keep_freed_memory

        torch.set_num_threads(threads)
        keep_freed_memory()  # a scoring process: freed chunk buffers are reused (docs/results.md, "Memory")
        if record is None:  # deployed from a Serve config file: the manifest is read here
            record = next((m for m in read_manifest(fleet)["members"] if m.get("name") == member), None)
        if record is None or record.get("name") != member or record.get("sha256") != sha256:
            raise FleetError(f"member '{member}' in {fleet} changed while deploying (sha256 differs); redeploy")
        self.fleet = load_records(fleet, [record], device)
        self.member = member

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def score(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Per request: the per-sample δ and latent distance z (NaN without moments), (2, n)."""
        return await _split(batches, lambda x: self.fleet.per_sample(x, [self.member])[0])

    def pid(self) -> int:
        return os.getpid()


def load_records(fleet: str, records: list[dict], device: str = "cpu") -> Fleet:
    """The models of these manifest records (the deployment's checked manifest), nothing else read;
    a weight file changed since it was checked is a one-line error."""
    try:
        return Fleet.from_records(fleet, records, device=device)
    except StaleWeightsError as e:
        raise FleetError(f"{fleet} changed since it was checked ({one_line(e)}); redeploy") from None


async def _split(batches: list[np.ndarray], fn) -> list[np.ndarray]:
    """Run ``fn`` once on the concatenated requests (off the event loop, so health checks and new
    requests are still accepted) and hand each request its own columns."""
    sizes = [len(b) for b in batches]
    x = np.concatenate(batches) if len(batches) > 1 else batches[0]
    d = await asyncio.get_running_loop().run_in_executor(None, fn, x)
    out, start = [], 0
    for n in sizes:
        out.append(d[..., start:start + n])
        start += n
    return out


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, graceful_shutdown_timeout_s=20)
class FleetScorer:
    """The whole fleet (or, as a shard, the members ``names``) in one replica on the fused scoring engine:
    one request, one hop."""

    def __init__(self, fleet: str, digest: str, threads: int = 1, device: str = "cpu",
                 records: list[dict] | None = None, names: list[str] | None = None):
        import torch

        from ...scoring import keep_freed_memory

        torch.set_num_threads(threads)
        keep_freed_memory()  # a scoring process: freed chunk buffers are reused (docs/results.md, "Memory")
        if records is None:  # deployed from a Serve config file: the manifest is read here
            records = read_manifest(fleet)["members"]
            if names is not None:
                by_name = {r["name"]: r for r in records}
                records = [by_name[n] for n in names if n in by_name]
        if fleet_digest(records) != digest:
            raise FleetError(f"{fleet} changed while deploying (member hashes differ); redeploy")
        self.fleet = load_records(fleet, records, device)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def score(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Per request: the per-sample δ and latent distance z of every member it holds in manifest order,
        (M, 2, n)."""
        return await _split(batches, self.fleet.per_sample)

    def pid(self) -> int:
        return os.getpid()


def served_format(records: list[dict]) -> ImageFormat:
    """The one image format of the manifest ``records`` a service serves (records without one are
    1x28x28); a one-line FleetError for a fleet of mixed formats."""
    return common_format(records, "serve each format's members as their own fleet")


def check_library(library, fmt: ImageFormat) -> None:
    """A one-line FleetError when a classifier of ``library`` (for POST /v1/select) takes another format than
    the fleet's ``fmt``: a request's images are in the fleet's format."""
    other = {name: library.image_format(name) for name in library.names if library.image_format(name) != fmt}
    if other:
        found = ", ".join(f"{name} ({f})" for name, f in list(other.items())[:5])
        raise FleetError(f"--library: classifier(s) {found} take another image format than the fleet ({fmt}); "
                         f"train the library at {fmt} (simex train-bases --image-format {fmt})")


def config_members(config: dict[str, Any]) -> list[dict]:
    """The ingress config's members as manifest-like records (name, sha256), for :func:`fleet_digest`."""
    return [{"name": name, "sha256": spec["sha256"]} for name, spec in config["members"].items()]


def _scorer_options(args: dict[str, Any], default_cpus: float) -> dict[str, Any]:
    """Deployment options of a scorer application from its args: CPUs/GPUs per replica, replicas or
    autoscaling."""
    actor: dict[str, Any] = {"num_cpus": float(args.get("num_cpus", default_cpus))}
    if args.get("num_gpus"):
        actor["num_gpus"] = float(args["num_gpus"])
    options: dict[str, Any] = {"ray_actor_options": actor}
    if args.get("autoscaling_config"):
        options["autoscaling_config"] = args["autoscaling_config"]
    else:
        options["num_replicas"] = int(args.get("num_replicas", 1))
    return options


def fleet_app(args: dict[str, Any]):
    """Application builder for the fused whole-fleet scorer, or one shard of the sharded layout (also the
    `import_path` in Serve configs).

    args: fleet, digest, and optionally names (a shard: its members, in fleet order; the deployment is then
    named ``ShardScorer``), num_replicas / autoscaling_config, num_cpus, num_gpus, device, records (the
    checked manifest's members, of the shard if one; without them each replica reads the manifest).
    """
    threads = max(1, round(float(args.get("num_cpus", 1))))
    names = args.get("names")
    options = {**_scorer_options(args, 1.0), **({"name": "ShardScorer"} if names is not None else {})}
    return FleetScorer.options(**options).bind(str(args["fleet"]), args["digest"], threads,
                                               args.get("device", "cpu"), args.get("records"),
                                               list(names) if names is not None else None)


def member_app(args: dict[str, Any]):
    """Application builder for one member (also the `import_path` in Serve config files).

    args: fleet, member, sha256, and optionally num_replicas (int), autoscaling_config
    (dict), num_cpus, num_gpus (per replica), device, record (the member's record in the checked
    manifest; without it each replica reads the manifest).
    """
    return MemberScorer.options(**_scorer_options(args, 0.25)).bind(
        str(args["fleet"]), args["member"], args["sha256"], 1, args.get("device", "cpu"), args.get("record"))


# ------------------------------------------------------------------ ingress

# Every field of the score contract (simex_ray.fleet.result.SCORE_CONTRACT), then latency_ms and per_sample.
ScoreResponse = score_response_model()


class ErrorResponse(BaseModel):
    error: str
    status: int


def request_body(fields: dict[str, Any], fmt: ImageFormat = LEGACY, npy_note: str = "") -> dict[str, Any]:
    """The OpenAPI request body of an endpoint taking images in ``fmt``: JSON with ``images`` and ``fields``,
    .npy, or image files (multipart)."""
    shapes = expected_shapes(fmt)
    images = {"type": "array", "description": f"this fleet's format is {fmt} (CxHxW): shape {shapes}; floats in "
                                              f"[0,1] or integers 0..255; never resampled (another shape is a 422)"}
    files = {"type": "array", "items": {"type": "string", "format": "binary"},
             "description": f"one or more image files (PNG, JPEG, BMP, GIF), in any file field; each is converted to "
                            f"{fmt} by the rule of simex_ray.formats (?strict_format=true: refused instead)"}
    return {"requestBody": {"required": True, "content": {
        JSON: {"schema": {"type": "object", "required": ["images"], "properties": {"images": images, **fields}}},
        NPY: {"schema": {"type": "string", "format": "binary",
                         "description": f"numpy.save of a {shapes} array" + npy_note}},
        MULTIPART: {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": files, **({"members": {"type": "string", "description": "comma-separated member names "
                                                                                 "(default: all)"}}
                                if "members" in fields else {})}}},
    }}}


SCORE_REQUEST_FIELDS = {"members": {"type": "array", "items": {"type": "string"},
                            "description": "score only these members (default: all)"}}
SELECT_REQUEST_FIELDS = {
    "labels": {"type": "array", "items": {"type": "integer"},
               "description": "one class label per image (needed by logme, leep, nce, hscore, gbc, knn)"},
    "methods": {"type": "array", "items": {"type": "string"},
                "description": "default: every method the labels and the fleet allow"},
}


def score_body(fmt: ImageFormat = LEGACY) -> dict[str, Any]:
    return request_body(SCORE_REQUEST_FIELDS, fmt)


def select_body(fmt: ImageFormat = LEGACY) -> dict[str, Any]:
    return request_body(SELECT_REQUEST_FIELDS, fmt, npy_note=" (no labels)")


def fleet_openapi(schema: dict[str, Any], fmt: ImageFormat) -> dict[str, Any]:
    """The app's OpenAPI schema with the request bodies (and the description) of a fleet in ``fmt``."""
    schema = copy.deepcopy(schema)
    for path, body in (("/v1/score", score_body(fmt)), ("/v1/select", select_body(fmt))):
        if "post" in schema.get("paths", {}).get(path, {}):
            schema["paths"][path]["post"]["requestBody"] = body["requestBody"]
    schema["info"]["description"] += f" This service's fleet takes images of {fmt} (CxHxW)."
    schema["info"]["x-image-format"] = str(fmt)
    return schema


ERRORS = {code: {"model": ErrorResponse, "description": why} for code, why in {
    400: "malformed JSON, .npy or multipart body", 401: "missing or wrong API key", 404: "unknown member",
    413: "too many images, body too large, or an image file over the pixel limit", 415: "unsupported content type",
    422: "wrong shape for the fleet's format, dtype, NaN/inf, out-of-range values, an empty batch, or an image "
         "file that cannot be decoded (or, with strict_format, is not in the fleet's format)",
    503: "a member or shard is temporarily unavailable (a lost replica, failed twice); never a partial answer. "
         "Retry after the Retry-After header's seconds"}.items()}

RETRY_AFTER_S = 1  # the Retry-After of a 503: about the time Serve takes to route around a lost replica

# /openapi.json and /docs are the ingress's own routes (below): the schema names the served fleet's format,
# which the app only knows once a replica is configured.
api = FastAPI(
    title="simex-ray scoring API", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
    description="SimEx: Δ(X | Y) of a batch of unknown images X against every reference "
                "autoencoder Y of a fleet; smaller Δ = more similar. Send the API key, when one "
                "is set, in the X-API-Key header.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class Ingress:
    """Validates, fans out to member or shard applications, gathers Δ, ranks."""

    def __init__(self):
        self.members: dict[str, dict] = {}
        self.router: Router | None = None  # the layout's way to the scorers (layouts.py)
        self.layout: dict[str, Any] = {"mode": "members"}
        self.order, self.local, self.local_key = [], None, None
        self.api_key, self.limits, self.loss, self.fleet = None, Limits(), "mse", ""
        self.library, self.library_path = None, None
        self.image_format, self.openapi_cache = LEGACY, None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """config: fleet, mode (the layout, :mod:`.layouts`; older configs say it by their keys), members
        {name: {app, sha256}}, the layout's own keys (fused: the whole-fleet app; sharded: shards [{app,
        members}]; embedded: embedded, threads, device), api_key_sha256, max_images, max_body_bytes; from
        :func:`deploy` also records and loss (the checked manifest's members and loss; without them, as from a
        Serve config file, the manifest is read here)."""
        manifest = ({"members": config["records"], "loss": config.get("loss", "mse")} if "records" in config
                    else read_manifest(config["fleet"]))
        records = {m["name"]: m for m in manifest["members"]}
        served = [name for name in config["members"] if name in records]
        fmt = served_format([records[name] for name in served])  # before any state changes: a mixed fleet fails
        self.members = {name: {**records[name], **config["members"][name]} for name in served}
        self.records = {name: records[name] for name in self.members}  # as in the manifest
        self.image_format, self.openapi_cache = fmt, None
        self.order = [m["name"] for m in manifest["members"]]  # the fused scorer's row order
        mode = mode_of(config)
        if mode == "embedded":  # this replica scores itself: no scorer application, no second hop
            key = (config["fleet"], fleet_digest(config_members(config)), config.get("device", "cpu"))
            if key != self.local_key:  # a change of API key or limits alone does not reload the fleet
                import torch

                torch.set_num_threads(max(1, int(config.get("threads", 1))))
                listed = [m for m in manifest["members"] if m["name"] in config["members"]]
                if fleet_digest(listed) != key[1]:
                    raise FleetError(f"{config['fleet']} changed while deploying (member hashes differ); redeploy")
                from ...scoring import keep_freed_memory

                keep_freed_memory()  # this ingress scores its listed members itself
                self.local = load_records(config["fleet"], listed, config.get("device", "cpu"))
                self.local_key = key
            self.order = list(self.local.members)
        else:
            self.local = self.local_key = None
        self.router = LAYOUTS[mode].router(config, serve.get_app_handle, self.order, self._score_here)
        self.layout = {"mode": mode, **self.router.describe()}
        self.api_key = config.get("api_key_sha256") or None
        self.limits = Limits(int(config.get("max_images", Limits.max_images)),
                             int(config.get("max_body_bytes", Limits.max_body_bytes)))
        self.loss, self.fleet = manifest.get("loss", "mse"), config["fleet"]
        if config.get("library") != self.library_path:  # the classifier library of /v1/select, checked once
            from ...transfer.library import Library

            self.library = Library.load(config["library"]) if config.get("library") else None
            for name in self.library.names if self.library is not None else ():
                self.library.model(name)  # sha256-checked now: a bad library fails the deployment, not a request
            self.library_path = config.get("library")
        if self.library is not None:
            check_library(self.library, self.image_format)
        log.info("serving %d member(s) of format %s from %s", len(self.members), self.image_format, self.fleet)

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        check_body_size(int(length) if length and length.isdigit() else None, self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            check_body_size(size, self.limits)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _call(self, handle, what: str, x: np.ndarray) -> np.ndarray:
        for attempt in range(2):  # one retry: a replica may die between routing and reply
            try:
                return await handle.score.remote(x)
            except Exception as e:  # noqa: BLE001 - actor death, unavailable replica
                if attempt == 1:
                    raise ApiError(503, f"{what} is unavailable ({type(e).__name__}); retry shortly") from None
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def _parse(self, parse, request: Request, strict: bool):
        """``parse`` (parse_score_request or parse_select_request) of the request's body at the fleet's format,
        off the event loop: decoding image files takes a while."""
        body, content_type = await self._read_body(request), request.headers.get("content-type")
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: parse(body, content_type, self.limits, self.image_format, strict=strict))

    @api.post("/v1/score", response_model=ScoreResponse, response_model_exclude_unset=True, responses=ERRORS,
              openapi_extra=score_body(), summary="Δ of a batch of images against every member, and the rankings")
    async def score(self, request: Request, per_sample: str | None = None, ranking: str | None = None,
                    strict_format: str | None = None):
        t0 = time.perf_counter()
        check_api_key(self.api_key, request.headers.get("x-api-key"))
        with_samples, method = parse_flag(per_sample, "per_sample"), parse_ranking(ranking)
        x, requested, converted = await self._parse(parse_score_request, request,
                                                    parse_flag(strict_format, "strict_format"))
        return await self._score(x, requested, method, with_samples, t0, converted)

    async def _score(self, x: np.ndarray, requested, method: str, with_samples: bool, t0: float,
                     converted: str | None = None) -> dict:
        names = select_members(requested, list(self.members))
        # The records of the layout asked (an update may reconfigure this replica while the scorers answer).
        records, loss = [self.records[n] for n in names], self.loss
        d = await self._per_sample(x, names)
        return score_response(d, records, loss, 1000 * (time.perf_counter() - t0), method=method,
                              with_samples=with_samples, image_format=self.image_format, converted=converted)

    async def Score(self, request, grpc_context=None):  # noqa: N802 - the gRPC method (grpc_api.py)
        """gRPC ``simex.Scorer/Score``: the body of ``POST /v1/score`` (an .npy) in, its JSON answer out."""
        from google.protobuf.wrappers_pb2 import BytesValue

        from .grpc_api import grpc_status, metadata

        t0 = time.perf_counter()
        meta = metadata(grpc_context)
        try:
            check_api_key(self.api_key, meta.get("x-api-key"))
            check_body_size(len(request.value), self.limits)
            with_samples, method = parse_flag(meta.get("per-sample"), "per_sample"), parse_ranking(meta.get("ranking"))
            strict = parse_flag(meta.get("strict-format"), "strict_format")
            x, _, _ = await asyncio.get_running_loop().run_in_executor(None, lambda: parse_score_request(
                request.value, "application/x-npy", self.limits, self.image_format, strict=strict))
            requested = [m for m in meta.get("members", "").split(",") if m] or None
            answer = await self._score(x, requested, method, with_samples, t0)
        except ApiError as e:
            grpc_context.set_code(grpc_status(e.status))
            grpc_context.set_details(e.message)
            return BytesValue()
        return BytesValue(value=json.dumps(jsonable_encoder(answer)).encode())

    async def _per_sample(self, x: np.ndarray, names: list[str]) -> np.ndarray:
        """Per-sample δ and latent distance z of ``names`` from the layout's scorers (its router):
        (len(names), 2, N), or (len(names), N) δ from scorers of a version without z."""
        return await self.router.per_sample(x, names, self._call)

    @api.post("/v1/select", responses=ERRORS, openapi_extra=select_body(),
              summary="rank the library's classifiers for a batch of images: which to transfer from")
    async def select(self, request: Request, strict_format: str | None = None):
        from ...transfer.selection import SIMEX, available_methods, check_methods, select

        t0 = time.perf_counter()
        check_api_key(self.api_key, request.headers.get("x-api-key"))
        if self.library is None:
            raise ApiError(404, "this service has no classifier library; start it with `simex serve start "
                                "--library LIB`")
        x, labels, methods = await self._parse(parse_select_request, request,
                                               parse_flag(strict_format, "strict_format"))
        specs = [s for s in self.library.references if s in self.members]
        try:
            methods = check_methods(methods or available_methods(labelled=labels is not None, fleet=bool(specs)),
                                    labelled=labels is not None, fleet=bool(specs))
        except ValueError as e:
            raise ApiError(422, one_line(e)) from None
        deltas = None
        if SIMEX in methods:
            both = await self._per_sample(x, specs)
            deltas = dict(zip(specs, (both[:, 0] if both.ndim == 3 else both).mean(axis=-1).tolist()))
        classifiers = [n for n, c in self.library.classifiers.items() if SIMEX not in methods or c.spec in specs]
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, lambda: select(self.library, x, labels, methods=methods, classifiers=classifiers,
                                     deltas=deltas))
        except ValueError as e:  # e.g. labels of a single class: an estimator is undefined
            raise ApiError(422, one_line(e)) from None
        return {**result.to_json(), "classifiers": {n: self.library.classifiers[n].spec for n in classifiers},
                "latency_ms": 1000 * (time.perf_counter() - t0)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _score_here(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Embedded layout: concurrent requests as one engine pass in this replica, (M, 2, n) each."""
        return await _split(batches, self.local.per_sample)

    @api.get("/v1/members", responses={401: ERRORS[401]}, summary="the fleet's members")
    async def members_info(self, request: Request):
        check_api_key(self.api_key, request.headers.get("x-api-key"))
        return {"fleet": self.fleet, "loss": self.loss, "image_format": str(self.image_format),
                "layout": self.layout, "members": [
            {"name": name, "spec": m.get("spec"), "class": m.get("class"), "loss": m["config"]["loss"],
             "architecture": m["config"]["architecture"], "sha256": m["sha256"],
             "image_format": str(record_format(self.records[name])),
             "training": {"epochs": m["config"]["epochs"], "optimizer": m["config"]["optimizer"],
                          "lr": m["config"]["lr"], "n_train": m.get("n_train"),
                          **{k: m.get("metrics", {}).get(k) for k in ("train_delta", "test_delta")}}}
            for name, m in self.members.items()]}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request):
        """The OpenAPI schema, its request bodies naming the served fleet's format."""
        if self.openapi_cache is None or self.openapi_cache[0] != self.image_format:
            self.openapi_cache = (self.image_format, fleet_openapi(request.app.openapi(), self.image_format))
        return JSONResponse(self.openapi_cache[1])

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - Swagger UI")

    @api.get("/healthz", summary="liveness")
    async def healthz(self):
        return {"status": "ok", "members": len(self.members), "pid": os.getpid()}


def ingress_app(args: dict[str, Any]):
    """Application builder for the ingress (also the `import_path` in Serve config files).

    args: fleet, members {name: {app, sha256}}, api_key_sha256, max_images, max_body_bytes,
    and optionally fused (the fleet scorer's app), shards ([{app, members}]), num_replicas. Embedded layout (``embedded``: true): the replicas hold the
    fleet, sized like a scorer (num_cpus, num_gpus, autoscaling_config, device, threads).
    """
    scaling = ("num_replicas", "num_cpus", "num_gpus", "autoscaling_config")
    config = {k: v for k, v in args.items() if k not in scaling}
    if args.get("embedded"):
        config["threads"] = max(1, round(float(args.get("num_cpus", 1))))
        return Ingress.options(user_config=config, **_scorer_options(args, 1.0)).bind()
    return Ingress.options(user_config=config, num_replicas=int(args.get("num_replicas", 1))).bind()

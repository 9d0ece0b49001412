"""Deploy, update and remove the scoring service on the current Ray cluster (driver side)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from ... import storage
from ...api import Limits, key_digest
from ...choices import SERVE_DEFAULTS
from ...errors import OperationalError, squash, UserError
from ...fleet import read_manifest
from ...fleet.manifest import verify_fleet
from . import app as applications
from .app import INGRESS_APP, check_library, ingress_app, served_format
from .layouts import LAYOUTS, SCORER_PREFIXES, ScorerApp, member_app_name, served_record
from .sharded import shard_layout

log = logging.getLogger(__name__)

MODES = tuple(LAYOUTS)
# Above this many members, `--mode members` (one Serve application per member) is warned against:
# Serve's controller reconciles every application, and a deploy or update of hundreds takes minutes.
MEMBERS_MODE_LIMIT = 64


@dataclass(frozen=True)
class ServeSettings:
    replicas: int = SERVE_DEFAULTS["replicas"]  # per scorer (a member, the fleet or a shard)
    autoscaling: dict | None = None  # Serve autoscaling_config per scorer, instead of replicas
    cpus_per_replica: float = SERVE_DEFAULTS["cpus_per_replica"]
    ingress_replicas: int = SERVE_DEFAULTS["ingress_replicas"]
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    mode: str = SERVE_DEFAULTS["mode"]  # one of MODES (app.py's docstring: the layouts)
    device: str = "cpu"
    gpus_per_replica: float = SERVE_DEFAULTS["gpus_per_replica"]
    library: str | None = None  # a classifier library for POST /v1/select (absolute path or URI)
    shards: int | None = None  # sharded: this many shards of near-equal size, or
    members_per_shard: int | None = None  # shards of this many members (neither: sharded.DEFAULT_MEMBERS_PER_SHARD)
    deploy_timeout_s: float = SERVE_DEFAULTS["deploy_timeout_s"]  # new scorer apps not RUNNING by then: removed again, the old ones kept

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown serving mode '{self.mode}'; known: {', '.join(MODES)}")
        if (self.shards is not None or self.members_per_shard is not None) and self.mode != "sharded":
            raise UserError("--shards and --members-per-shard apply to --mode sharded; add --mode sharded")
        shard_layout(["m"], self.shards, self.members_per_shard)  # both given, or < 1: a clear error now
        if self.device == "cuda" and not self.gpus_per_replica > 0:
            raise UserError("--device cuda needs --gpus-per-replica > 0 (fractions allowed, e.g. 0.25)")
        if not self.deploy_timeout_s > 0:
            raise UserError(f"--deploy-timeout must be > 0 seconds, got {self.deploy_timeout_s}")

    @property
    def initial_replicas(self) -> int:
        if self.autoscaling:
            return max(1, int(self.autoscaling.get("initial_replicas") or self.autoscaling.get("min_replicas") or 1))
        return self.replicas


class DeployError(OperationalError):
    """New scorer applications did not become ready (failed, or not scheduled in time); they were
    removed again and whatever served before still serves."""


def _scaling(s: ServeSettings) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": s.cpus_per_replica, "device": s.device}
    if s.gpus_per_replica:
        args["num_gpus"] = s.gpus_per_replica
    if s.autoscaling:
        args["autoscaling_config"] = s.autoscaling
    else:
        args["num_replicas"] = s.replicas
    return args


def _scorers(fleet: str, members: list[dict], s: ServeSettings) -> list[ScorerApp]:
    """The scorer applications of the layout ``s.mode``; each replica gets its own members' records."""
    return LAYOUTS[s.mode].scorers(str(fleet), members, s, _scaling(s))


def _application(scorer: ScorerApp):
    """The Serve application of ``scorer``, passing it the checked records (no manifest read again)."""
    return getattr(applications, scorer.builder)({**scorer.args, **scorer.records})


def _ingress_args(fleet: str, members: list[dict], s: ServeSettings) -> dict[str, Any]:
    return {
        "fleet": str(fleet), "mode": s.mode,
        "members": {m["name"]: {"app": member_app_name(m["name"], m["sha256"]), "sha256": m["sha256"]}
                    for m in members},
        "api_key_sha256": key_digest(s.api_key) if s.api_key else None,
        "max_images": s.limits.max_images,
        "max_body_bytes": s.limits.max_body_bytes,
        "num_replicas": s.ingress_replicas,
        **({"library": s.library} if s.library else {}),
        **LAYOUTS[s.mode].ingress_args(members, s, _scaling(s)),
    }


def deploy(fleet_dir, settings: ServeSettings = ServeSettings(), manifest: dict | None = None
           ) -> dict[str, list[str]]:
    """Make the running service match the fleet: returns which scorer apps were added/kept/removed.

    ``manifest``: the fleet's manifest as :func:`~simex_ray.fleet.manifest.verify_fleet` returned it
    (read once and checked, no model built); without it, that is done here. Exactly that manifest is
    deployed: each scorer replica loads only its own members' weights by their records in it, and the
    ingress aggregates with its records (losses, calibration) without reading the manifest again.

    Order keeps requests flowing: new member apps first, then the ingress is
    pointed at the new set (a user_config change: no restart), then apps of
    removed or replaced members are deleted (Serve lets in-flight requests finish).
    """
    from ray.serve import RunTarget

    fleet = storage.normalize(fleet_dir)  # an absolute path, or the URI as given
    # Replicas load the fleet on whichever node they land on: across machines it must be shared.
    hosts = len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    storage.check_shared(fleet, hosts, flag="--fleet")
    if manifest is None:
        manifest = verify_fleet(fleet)  # every weight file present and intact, or a clear error now
    members = manifest["members"]
    fmt = served_format(members)  # one image format, and the library's classifiers in it, or a clear error now
    if settings.library:
        from ...transfer.library import Library

        check_library(Library.load(settings.library), fmt)
    wanted = {scorer.name: scorer for scorer in _scorers(fleet, members, settings)}
    running = set(serve.status().applications)
    existing = {a for a in running if a.startswith(SCORER_PREFIXES)}
    new = [a for a in wanted if a not in existing]
    if new:
        log.info("deploying %d scorer app(s): %s", len(new), ", ".join(new))
        _warn_short_of_cpus(len(new) * settings.initial_replicas * settings.cpus_per_replica, settings)
        run_and_wait([RunTarget(_application(wanted[a]), name=a, route_prefix=None) for a in new], settings.deploy_timeout_s,
                     remove_on_failure=True)
    ingress = {**_ingress_args(fleet, members, settings), "records": [served_record(m) for m in members],
               "loss": manifest.get("loss", "mse")}
    run_and_wait([RunTarget(ingress_app(ingress), name=INGRESS_APP, route_prefix="/")], settings.deploy_timeout_s,
                 remove_on_failure=False)
    removed = sorted(existing - set(wanted))
    for app in removed:
        log.info("removing scorer app %s", app)
        serve.delete(app)
    return {"added": new, "kept": sorted(existing & set(wanted)), "removed": removed}


def _warn_short_of_cpus(needed: float, s: ServeSettings) -> None:
    """Say at once when the new replicas need more CPUs than are free: an update starts the new scorers
    before it stops the old ones (no request is dropped), so it briefly needs room for both."""
    free = ray.available_resources().get("CPU", 0.0)
    if needed > free + 1e-9:
        log.warning("the new scorer replicas need %.2f CPUs and %.2f are free (the running ones keep theirs until "
                    "the new ones are ready); waiting up to %.0f s for the cluster to grow, then giving up. Lower "
                    "--cpus-per-replica, add nodes, or stop the running service first", needed, free,
                    s.deploy_timeout_s)


def run_and_wait(targets: list, timeout_s: float, *, remove_on_failure: bool, poll_s: float = 0.5) -> None:
    """Deploy ``targets`` and wait until each application is RUNNING.

    Serve's own wait has no end: a replica that cannot be scheduled (short of CPUs, say) keeps the
    call waiting forever. Here a failed application, or one not running within ``timeout_s``, raises
    :class:`DeployError` with Serve's reason; ``remove_on_failure`` deletes the applications just
    deployed first, so nothing half-deployed is left behind.
    """
    from ray.serve.schema import ApplicationStatus

    names = [t.name for t in targets]
    serve.run_many(targets, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    said: set[str] = set()
    while True:
        apps = serve.status().applications
        failed = [n for n in names if n in apps and apps[n].status == ApplicationStatus.DEPLOY_FAILED]
        if not failed and all(n in apps and apps[n].status == ApplicationStatus.RUNNING for n in names):
            return
        for n in names:  # Serve's note on replicas it cannot place, said once per application
            for d in (apps[n].deployments.values() if n in apps else ()):
                if d.message and "to be scheduled" in d.message and n not in said:
                    said.add(n)
                    log.warning("%s: %s", n, d.message)
        if failed or time.monotonic() > deadline:
            reasons = [f"{n}: {_app_reason(apps.get(n))}" for n in (failed or names)
                       if apps.get(n) is None or apps[n].status != ApplicationStatus.RUNNING]
            if remove_on_failure:
                for n in names:
                    serve.delete(n)
            what = "failed to deploy" if failed else f"not running after {timeout_s:.0f} s"
            kept = "; removed again, the service is unchanged" if remove_on_failure else ""
            raise DeployError(f"{len(reasons)} Serve application(s) {what}{kept}: {'; '.join(reasons)}")
        time.sleep(poll_s)


def _app_reason(app) -> str:
    if app is None:
        return "not created"
    notes = [d.message for d in app.deployments.values() if d.message]
    return squash(app.message or (notes[0] if notes else str(app.status.value)))


def undeploy() -> list[str]:
    """Delete the ingress and every scorer app (other Serve apps are left alone)."""
    apps = [a for a in serve.status().applications
            if a == INGRESS_APP or a.startswith(SCORER_PREFIXES)]
    if INGRESS_APP in apps:  # stop taking requests first
        serve.delete(INGRESS_APP)
    _delete_together([app for app in apps if app != INGRESS_APP])
    return apps


def _delete_together(apps: list[str], timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
    """Delete ``apps`` at once and wait until Serve lists none of them: its own blocking delete waits
    for each in turn (about 3 s apiece on an idle machine, its replicas' graceful shutdown included)."""
    for app in apps:
        serve.delete(app, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while left := [a for a in apps if a in serve.status().applications]:
        if time.monotonic() > deadline:
            raise DeployError(f"{len(left)} Serve application(s) still not deleted after {timeout_s:.0f} s: "
                              f"{', '.join(left)}")
        time.sleep(poll_s)


def serve_config(fleet_dir, settings: ServeSettings = ServeSettings(), host="127.0.0.1", port=8000) -> dict:
    """A Serve config (for `serve run` / `serve deploy`) equivalent to :func:`deploy`."""
    fleet = storage.normalize(fleet_dir)
    members = read_manifest(fleet)["members"]
    served_format(members)
    apps = [{"name": INGRESS_APP, "route_prefix": "/", "import_path": "simex_ray.distributed.serving.app:ingress_app",
             "args": _ingress_args(fleet, members, settings)}]
    apps += [{"name": scorer.name, "route_prefix": None,
              "import_path": f"simex_ray.distributed.serving.app:{scorer.builder}", "args": scorer.args}
             for scorer in _scorers(fleet, members, settings)]
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": apps}

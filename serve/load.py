"""Load test for the scoring service, side by side with in-process Fleet.score.

    python serve/load.py --url http://127.0.0.1:8000 --fleet runs/main/fleet --data digits

Sends the same .npy batches at 1, 8 and 32 concurrent clients (loopback only;
bounded by --requests and --seconds per level) and prints requests/s, images/s
and p50/p99 latency, next to the same batches scored in this process (best of three runs) and
the serving path alone (GET /healthz at 8 clients: proxy and ingress, nothing scored).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

import numpy as np
import requests


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_level(make_client, clients: int, max_requests: int, max_seconds: float) -> dict:
    """``clients`` threads sending back to back, at most ``max_requests`` in all and ``max_seconds``:
    each thread gets its own request function from ``make_client()`` (True = answered)."""
    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.perf_counter() + max_seconds

    def client():
        send = make_client()
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            t0 = time.perf_counter()
            ok = send()
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": wall,
            "rps": len(latencies) / wall, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99)}


def http_level(url: str, body: bytes | None, clients: int, max_requests: int, max_seconds: float,
               headers: dict) -> dict:
    """``clients`` threads sending back to back; ``body`` None: GET ``url`` instead of POST."""

    def make_client():
        session = requests.Session()

        def send() -> bool:
            try:
                r = (session.get(url, headers=headers, timeout=60) if body is None else
                     session.post(url, data=body, headers=headers, timeout=60))
                return r.status_code == 200
            except requests.RequestException:
                return False

        return send

    return run_level(make_client, clients, max_requests, max_seconds)


def in_process(fleet_dir: str, x: np.ndarray, max_requests: int, max_seconds: float, blocks: int = 3) -> dict:
    """The same batches scored in this process, one after another: the best of ``blocks`` runs (a
    ceiling; one short run on a shared 2-core machine varies by a third)."""
    from simex_ray.fleet import Fleet

    fleet = Fleet.load(fleet_dir)
    fleet.score(x)  # warm-up
    best = None
    for _ in range(blocks):
        latencies = []
        t0 = time.perf_counter()
        while len(latencies) < max_requests and time.perf_counter() - t0 < max_seconds:
            t = time.perf_counter()
            fleet.score(x)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        run = {"clients": 1, "requests": len(latencies), "errors": 0, "seconds": wall,
               "rps": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
               "p99_ms": 1000 * percentile(latencies, 99)}
        if best is None or run["rps"] > best["rps"]:
            best = run
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="service URL on this machine, e.g. http://127.0.0.1:8000")
    p.add_argument("--fleet", required=True, help="the served fleet directory (for the in-process comparison)")
    p.add_argument("--data", default="digits", help="dataset spec the batches are drawn from (default digits)")
    p.add_argument("--batch", type=int, default=32, help="images per request (default 32)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    p.add_argument("--requests", type=int, default=200, help="at most this many requests per level (default 200)")
    p.add_argument("--seconds", type=float, default=20, help="at most this long per level (default 20)")
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)

    host = urlparse(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        print(f"load.py: error: {host} is not a loopback address; load tests only target this machine",
              file=sys.stderr)
        return 2
    from simex_ray import data
    from simex_ray.fleet import Fleet

    fmt = Fleet.load(args.fleet).image_format  # the batches are sent in the fleet's format
    x = data.balanced_sample(data.load(args.data, fmt=fmt), args.batch, seed=0).x
    buf = io.BytesIO()
    np.save(buf, x)
    headers = {"content-type": "application/x-npy", **({"x-api-key": args.api_key} if args.api_key else {})}
    url = args.url.rstrip("/") + "/v1/score"
    try:
        requests.post(url, data=buf.getvalue(), headers=headers, timeout=60).raise_for_status()  # warm-up
    except requests.RequestException as e:
        print(f"load.py: error: {url} is not answering ({e})", file=sys.stderr)
        return 1
    rows = [("in-process Fleet.score", in_process(args.fleet, x, args.requests, args.seconds))]
    # The serving path alone (proxy + ingress, nothing scored): the most HTTP can give on this machine.
    rows.append(("HTTP /healthz, 8 clients", http_level(args.url.rstrip("/") + "/healthz", None, 8, args.requests,
                                                        args.seconds, headers)))
    for clients in (int(c) for c in args.clients.split(",")):
        rows.append((f"HTTP, {clients} client(s)", http_level(url, buf.getvalue(), clients, args.requests,
                                                               args.seconds, headers)))
    print(f"{len(x)} images per request ({args.data}), at most {args.requests} requests / {args.seconds:g}s per row")
    print(f"{'':<24} {'requests':>8} {'errors':>6} {'req/s':>8} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label, r in rows:
        images = "" if "healthz" in label else f"{r['rps'] * len(x):.0f}"
        print(f"{label:<24} {r['requests']:>8} {r['errors']:>6} {r['rps']:>8.1f} {images:>9} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    at8 = next((r for label, r in rows if label == "HTTP, 8 client(s)"), None)
    if at8:
        print(f"HTTP at 8 clients = {100 * at8['rps'] / rows[0][1]['rps']:.0f}% of in-process "
              f"(best of 3 in-process runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an oversized JSON request costs the scoring service before it is refused, with and without the
comma count that bounds it (``api.check_json_numbers``).

    python bench/request_limits.py [--images 40000] [--clients 8]

Builds one JSON body of ``--images`` 28×28 images (10x the default limit of 4,096; values "0" and "1",
the smallest a client can send: about 62 MB at 40,000, just under the 64 MB body limit), then, each in a new
process, has ``--clients`` threads hand it to ``api.parse_score_request`` at once, as the Serve ingress does
with concurrent requests: peak resident memory of the process, CPU seconds, and wall seconds until every
request was refused. ``before`` replaces the comma count with a no-op (the code path before it existed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time


def child(path: str, clients: int, bounded: bool) -> dict:
    from simex_ray import api

    if not bounded:
        api.check_json_numbers = lambda *a, **k: None
    body = open(path, "rb").read()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    errors = []

    def one():
        try:
            api.parse_score_request(body, "application/json")
        except api.ApiError as e:
            errors.append(e.status)

    cpu0, t0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"statuses": sorted(set(errors)), "refused": len(errors), "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mib": base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=40_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.clients, args.child[1] == "after")))
        return
    row = "[" + ",".join(["[" + ",".join("01"[(i + j) % 2] for j in range(28)) + "]" for i in range(28)]) + "]"
    body = ('{"images":[' + ",".join([row] * args.images) + "]}").encode()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        print(f"a JSON body of {args.images:,} 28x28 images, {len(body) / 2**20:.1f} MiB, {args.clients} at once")
        print(f"{'':<8} {'refused':>8} {'status':>7} {'wall s':>7} {'CPU s':>7} {'peak MiB':>9} {'(at start)':>10}")
        for label in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--child", f.name, label, "--clients",
                                  str(args.clients)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:<8} {r['refused']:>8} {','.join(map(str, r['statuses'])):>7} {r['wall_s']:>7.2f} "
                  f"{r['cpu_s']:>7.2f} {r['peak_mib']:>9.0f} {r['before_mib']:>10.0f}")


if __name__ == "__main__":
    main()

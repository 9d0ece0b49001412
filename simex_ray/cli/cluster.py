"""`simex cluster up|env|status|kill-node|add-node|down`: a real multi-node Ray on this machine.

A 0-CPU head and N worker nodes, each its own ``ray start`` with token authentication, so the
commands of README "Running on a cluster" (``ray job submit``, ``simex serve start --address
auto``) can be tried, and a node lost on purpose, without a cloud account. Everything the cluster
needs lives in ``--dir``; only the processes it started are ever killed, by pid.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from ..errors import UserError

DEFAULT_DIR = "/tmp/simex-cluster"


def add_parsers(sub) -> None:
    c = sub.add_parser("cluster", help="a multi-node Ray on this machine (head + worker nodes, token auth)",
                       description="Start, inspect and stop a real multi-node Ray on one machine: a head with 0 "
                                   "CPUs and worker nodes started with `ray start`, token authentication on.")
    verbs = c.add_subparsers(dest="cluster_command", metavar="VERB")
    verbs.required = True

    def with_dir(p):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"the cluster's directory (default {DEFAULT_DIR})")
        return p

    up = with_dir(verbs.add_parser("up", help="start a head and --workers worker nodes"))
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--cpus", type=int, default=1, help="CPUs per worker node (default 1)")
    up.add_argument("--object-store-mb", type=int, default=150, help="per node (default 150)")
    with_dir(verbs.add_parser("env", help="print the shell exports to use it: eval \"$(simex cluster env)\""))
    with_dir(verbs.add_parser("status", help="its nodes, alive or not"))
    kill = with_dir(verbs.add_parser("kill-node", help="hard-kill worker node I (raylet, agents, workers)"))
    kill.add_argument("index", type=int, help="worker node index, from 0")
    add = with_dir(verbs.add_parser("add-node", help="start more worker nodes (as an autoscaler would)"))
    add.add_argument("--workers", type=int, default=1)
    with_dir(verbs.add_parser("down", help="kill every process of the cluster (others on this machine are untouched)"))


def cmd_cluster(args) -> int:
    from ..local_cluster import STATE, MultiNodeCluster, node_pids

    base = Path(args.dir).resolve()
    verb = args.cluster_command
    if verb == "up":
        if (base / STATE).exists():
            old = MultiNodeCluster.open(base)
            if old.pids():
                raise UserError(f"a cluster is already running from {base}; `simex cluster down --dir {base}` "
                                 f"first, or use another --dir")
            old.shutdown(remove=False)
        if args.workers < 1 or args.cpus < 1:
            raise UserError("--workers and --cpus must be >= 1")
        base.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"starting a head and {args.workers} worker node(s) of {args.cpus} CPU(s) in {base} ...",
              file=sys.stderr, flush=True)
        cluster = MultiNodeCluster(workers=args.workers, cpus=args.cpus, object_store_mb=args.object_store_mb,
                                   base=base)
        try:
            cluster.start()
        except BaseException:
            cluster.kill_all()  # the start logs stay, for the error's diagnosis
            raise
        cluster.save()
        print(f"cluster up in {time.perf_counter() - t0:.0f}s: GCS {cluster.address}, dashboard "
              f"{cluster.dashboard_url}\nuse it from this shell:  eval \"$(simex cluster env --dir {base})\"",
              file=sys.stderr)
        return 0
    cluster = MultiNodeCluster.open(base)
    if verb == "env":
        for k, v in cluster.client_env().items():
            print(f"export {k}={shlex.quote(v)}")
    elif verb == "status":
        for i, node in enumerate(cluster.nodes):
            alive = bool(node_pids(node))
            role = "head" if i == 0 else f"worker {i - 1}"
            print(f"{role:<9} {'alive' if alive else 'dead':<6} {node.temp_dir}")
    elif verb == "kill-node":
        if not 0 <= args.index < len(cluster.nodes) - 1:
            raise UserError(f"no worker node {args.index}; this cluster has {len(cluster.nodes) - 1} (0-based)")
        killed = cluster.kill_node(args.index)
        cluster.save()
        print(f"worker node {args.index} killed ({len(killed)} processes)", file=sys.stderr)
    elif verb == "add-node":
        new = cluster.add_workers(args.workers)
        cluster.save()
        print(f"worker node(s) {', '.join(map(str, new))} started", file=sys.stderr)
    elif verb == "down":
        n = len(cluster.pids())
        cluster.shutdown(remove=False)
        print(f"cluster in {base} stopped ({n} processes)", file=sys.stderr)
    return 0


COMMANDS = {"cluster": cmd_cluster}

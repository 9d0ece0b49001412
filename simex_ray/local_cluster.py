"""A real multi-node Ray on one machine: a 0-CPU head plus N worker nodes (`simex cluster`, and tests).

What Ray's own multi-node tests do, from the command line: try the cluster commands of README
("Running on a cluster") on one machine, lose a node on purpose, and see what happens.

Every node is its own ``ray start`` with its own ``--temp-dir`` (nodes that
share one also share ``runtime_resources``, and one node's runtime-env agent
then deletes another's job working directory) and its own ports (nodes on the
default agent ports fail to start their agents). Token authentication uses a
token file in the cluster's temp dir (``RAY_AUTH_TOKEN_PATH``), so the user's
``~/.ray/auth_token`` is never read or written.

Never ``ray stop``: it stops every Ray on the machine. Each node's processes
are found and SIGKILLed by pid: those whose command line names the node's
temp dir, those in the process group ``ray start`` was started in, and all
their descendants (Ray workers rename themselves ``ray::...``).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from .errors import UserError

STATE = "cluster.json"  # in the cluster's directory: ports, nodes and their processes
WORKER_PORTS = 60  # per node
# What `_node_args` gives every node (its own ports): replaced when a node is started again.
NODE_ARGS = ("--disable-usage-stats", "--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--min-worker-port", "--max-worker-port", "--object-store-memory")
SOCKET_SUFFIX = "session_2026-11-30_06-24-49_783743_4194304/sockets/plasma_store"  # the longest Ray makes: ports the raylet hands to its worker processes


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above Ray's worker ports (10002-19999):
    a port the kernel hands out (bind to 0) can be taken by one of a new Ray's own sockets before the
    server it was chosen for binds it (seen once: Serve's proxy "Address already in use" on such a port)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        if _port_free(port):
            return port
    raise RuntimeError("no free port in 20000-32000")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _worker_port_range(taken: set[int]) -> tuple[int, int]:
    """A free block below the ephemeral range and above Ray's default 10002-19999."""
    for _ in range(200):
        lo = random.randrange(20000, 32000 - WORKER_PORTS)
        block = range(lo, lo + WORKER_PORTS)
        if not taken.intersection(block) and all(_port_free(p) for p in block):
            taken.update(block)
            return lo, lo + WORKER_PORTS - 1
    raise RuntimeError("no free block of worker ports")


@dataclass
class Node:
    name: str
    temp_dir: Path
    args: list[str]
    pgid: int | None = None
    node_id: str | None = None
    killed: bool = False
    log: Path | None = None
    start_s: float = 0.0
    seen: dict[int, str] = field(default_factory=dict)  # pid -> its start time, to never kill a reused pid


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def proc_info(pid: int) -> tuple[list[str], int, str] | None:
    """(command-line arguments, process group, start time) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        pgid = os.getpgid(pid)
    except (OSError, ProcessLookupError, IndexError):
        return None
    return [a for a in raw.split("\0") if a], pgid, started


def names_dir(args: list[str], directory: Path) -> bool:
    """Whether a command line gives ``directory`` (or a path inside it) as the value of an option
    (``--temp-dir=D``, ``--session_dir D/session_x``): how Ray's processes of a node name its temp dir. Path
    components are compared, so ``/x/worker1`` is not inside ``/x/worker10``, and a plain argument (``tail -f
    D/logs/raylet.out``) is not an option value."""
    root = os.path.normpath(str(directory))
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            value = arg.split("=", 1)[1]
        elif i and args[i - 1].startswith("--") and "=" not in args[i - 1] and not arg.startswith("-"):
            value = arg
        else:
            continue
        value = os.path.normpath(value) if value else value
        if value == root or value.startswith(root + os.sep):
            return True
    return False


def node_pids(node: Node) -> set[int]:
    """Every live process of ``node``.

    Found by its temp dir as an option value on the command line (gcs, raylet, agents...: :func:`names_dir`), then
    the rest of their process group and all descendants (Ray workers rename
    themselves ``ray::...``), plus every pid seen before that still has the
    same start time (orphans). The process group alone is only trusted while
    a process of the node is in it: pids (and so group ids) get reused.
    """
    me = os.getpid()
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me and (info := proc_info(int(d))):
            procs[int(d)] = info
    roots = {pid for pid, (args, _, _) in procs.items() if names_dir(args, node.temp_dir)}
    roots |= {pid for pid, started in node.seen.items() if pid in procs and procs[pid][2] == started}
    if node.pgid is not None and any(procs[pid][1] == node.pgid for pid in roots):
        roots |= {pid for pid, (_, pgid, _) in procs.items() if pgid == node.pgid}
    kids, found, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(kids.get(pid, []))
    found.discard(me)
    found &= set(procs)
    node.seen.update({pid: procs[pid][2] for pid in found})
    return found


def kill_pids(pids: set[int]) -> None:
    """SIGKILL each of ``pids`` that is still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class MultiNodeCluster:
    """``with MultiNodeCluster(workers=2) as c:`` - a head (0 CPUs) and ``workers`` nodes of ``cpus`` each.

    ``c.env`` is the environment for any client (``ray job submit``, a driver):
    token mode with this cluster's token file. ``c.kill_node(i)`` hard-kills
    worker node i (raylet, agents, workers); ``c.shutdown()`` kills all.
    """

    workers: int = 2
    cpus: int = 1  # `ray start --num-cpus` takes whole CPUs; workers may ask for fractions
    object_store_mb: int = 150
    # A killed node is noticed after period * threshold (its port refuses at once); Ray's defaults make
    # that ~15-30 s. The timeout only bounds a check that gets no answer: a live node on a busy machine
    # can take seconds to answer, and must not be declared dead for it.
    health_check_period_ms: int = 1000
    health_check_failure_threshold: int = 3
    health_check_timeout_ms: int = 10_000
    start_timeout_s: float = 120
    # `ray start` gives a node's raylet a fixed 30 s to register with the GCS. On a loaded machine it
    # may miss that ("... or the GCS has become overloaded"): the node is then given ``late_register_s``
    # more to register, else killed and started again (fresh ports, one at a time), up to
    # ``start_attempts`` times in all.
    start_attempts: int = 3
    late_register_s: float = 60
    start_backoff_s: float = 5  # before the 2nd attempt; doubled before each later one
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="simex-mn-")))
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self):
        self.token_path = self.base / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS") and not k.startswith("RAY_health_check")}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                    "OMP_NUM_THREADS": "1", "RAY_worker_maximum_startup_concurrency": "16",
                    "RAY_health_check_period_ms": str(self.health_check_period_ms),
                    "RAY_health_check_timeout_ms": str(self.health_check_timeout_ms),
                    "RAY_health_check_initial_delay_ms": "1000",
                    "RAY_health_check_failure_threshold": str(self.health_check_failure_threshold)}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        # Ray processes that look the cluster up ("auto", e.g. Train's PlacementGroupCleaner) would
        # otherwise scan for gcs_server processes and find every other Ray on this machine too.
        self.env["RAY_ADDRESS"] = self.address
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    # ------------------------------------------------------------------ start / stop

    def __enter__(self) -> "MultiNodeCluster":
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _node_args(self, taken: set[int]) -> list[str]:
        lo, hi = _worker_port_range(taken)

        def port() -> int:  # free now, and not handed to another node of this cluster
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        return ["--disable-usage-stats",
                f"--node-manager-port={port()}", f"--object-manager-port={port()}",
                f"--metrics-export-port={port()}", f"--runtime-env-agent-port={port()}",
                f"--dashboard-agent-listen-port={port()}", f"--dashboard-agent-grpc-port={port()}",
                f"--min-worker-port={lo}", f"--max-worker-port={hi}",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}"]

    def _launch(self, node: Node) -> subprocess.Popen:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        node.log = self.base / f"{node.name}.start.log"
        with open(node.log, "w") as log:
            proc = subprocess.Popen(["ray", "start", *node.args, f"--temp-dir={node.temp_dir}"], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # The daemons `ray start` spawns stay in its process group after it exits.
        node.pgid = proc.pid
        node.start_s = time.time()
        return proc

    def _wait(self, node: Node, proc: subprocess.Popen) -> None:
        """Wait for ``ray start`` of ``node``; a RuntimeError (with its output) if it failed."""
        try:
            rc = proc.wait(timeout=max(1.0, node.start_s + self.start_timeout_s - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        node_pids(node)  # remember its processes
        if rc != 0 and not self._registered_late(node):
            node.start_s = time.time() - node.start_s
            raise RuntimeError(f"`ray start` of {node.name} failed ({rc}); its output is in {node.log}: "
                               f"{node.log.read_text()[-3000:]}")
        node.start_s = time.time() - node.start_s

    def _registered_late(self, node: Node) -> bool:
        """A worker node whose `ray start` gave up on it while its raylet (still running) was slow to
        register: wait up to ``late_register_s`` for the GCS to list it alive."""
        if node is self.nodes[0] or not node_pids(node):
            return False
        resource = next(json.loads(a.split("=", 1)[1]) for a in node.args if a.startswith("--resources="))
        deadline = time.time() + self.late_register_s
        while time.time() < deadline and node_pids(node):
            try:
                if any(set(resource) <= set(info.get("resources_total", {})) for info in self.alive_nodes()):
                    return True
            except Exception:  # noqa: BLE001 - the dashboard is busy too: ask again
                pass
            time.sleep(1)
        return False

    def _start(self, nodes: list[Node]) -> None:
        """Start ``nodes`` (together: each `ray start` mostly waits). One that fails is killed and
        started again, alone and on fresh ports, after a pause that grows: up to ``start_attempts``."""
        failed, errors = nodes, []
        for attempt in range(1, self.start_attempts + 1):
            if attempt > 1:
                time.sleep(self.start_backoff_s * 2 ** (attempt - 2))  # let the machine breathe
                for node in failed:
                    self._reset(node)
            together = {node.name: self._launch(node) for node in failed} if attempt == 1 else {}
            errors = []
            for node in failed:
                try:
                    self._wait(node, together[node.name] if together else self._launch(node))
                except RuntimeError as e:
                    errors.append((node, e))
            if not errors:
                return
            failed = [node for node, _ in errors]
            print(f"`ray start` of {', '.join(n.name for n in failed)} failed (attempt {attempt} of "
                  f"{self.start_attempts}): {str(errors[0][1]).strip().splitlines()[-1][:300]}",
                  file=sys.stderr, flush=True)
        raise errors[0][1]

    def _reset(self, node: Node) -> None:
        """Kill what a failed `ray start` left of ``node`` and give it fresh ports and a clean temp dir."""
        kill_pids(node_pids(node))
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        node.args = [a for a in node.args if a.split("=", 1)[0] not in NODE_ARGS] + self._node_args(self._taken)
        node.seen.clear()

    def start(self) -> None:
        # Ray puts unix sockets under each node's temp dir: the whole path must fit in 107 bytes.
        longest = len(str(self.base / "worker99" / SOCKET_SUFFIX))
        if longest > 107:
            raise UserError(f"the cluster directory {self.base} is too long for Ray's unix sockets "
                             f"({longest} > 107 bytes under it); use a shorter one, e.g. /tmp/simex-cluster")
        self._taken: set[int] = {self.gcs_port, self.dashboard_port}
        head = Node("head", self.base / "head", ["--head", "--num-cpus=0", f"--port={self.gcs_port}",
                                                  f"--dashboard-port={self.dashboard_port}",
                                                  "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                                                  f"--ray-client-server-port={free_port()}",
                                                  *self._node_args(self._taken)])
        self.nodes.append(head)
        self._start([head])
        self.add_workers(self.workers)

    def add_workers(self, n: int = 1) -> list[int]:
        """Start ``n`` more worker nodes (together: each `ray start` is mostly waiting); their indices."""
        new = []
        for _ in range(n):
            i = len(self.nodes) - 1
            # A node resource names each worker node, so tests can tell which node an actor is on.
            self.nodes.append(Node(f"worker{i}", self.base / f"worker{i}",
                                   [f"--address={self.address}", f"--num-cpus={self.cpus}",
                                    f"--resources={json.dumps({f'simex_node_{i}': 1})}",
                                    *self._node_args(self._taken)]))
            new.append(i)
        self._start([self.nodes[i + 1] for i in new])
        self.wait_for_nodes(sum(not node.killed for node in self.nodes))
        return new

    def node_of_pid(self, pid: int) -> int | None:
        """The worker node (index) a process belongs to, or None."""
        for i, node in enumerate(self.nodes[1:]):
            if pid in node_pids(node):
                return i
        return None

    def kill_node(self, i: int) -> set[int]:
        """SIGKILL worker node ``i``: raylet, agents and every worker process on it (as a lost machine)."""
        node = self.nodes[i + 1]
        node.killed = True
        # Twice: a worker forked while the first sweep ran is caught by the second.
        killed = node_pids(node)
        kill_pids(killed)
        time.sleep(0.5)
        again = node_pids(node)
        kill_pids(again)
        return killed | again

    def shutdown(self, remove: bool = True) -> None:
        """Kill every process of this cluster; ``remove``: delete ``base`` too (else only what the
        cluster itself put there: node temp dirs, token, state file)."""
        self.kill_all()
        self._cleanup(remove)

    def kill_all(self) -> None:
        """SIGKILL every process of the cluster; files (logs) stay."""
        # Worker nodes first, then the head; repeated until nothing of ours is left.
        for _ in range(5):
            left = set()
            for node in reversed(self.nodes):
                pids = node_pids(node)
                kill_pids(pids)
                left |= pids
            if not left:
                break
            time.sleep(0.5)

    def _cleanup(self, remove: bool) -> None:
        if os.environ.get("SIMEX_KEEP_CLUSTER_LOGS"):  # debugging: keep every node's logs
            print(f"cluster logs kept in {self.base}")
        elif remove:
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            for node in self.nodes:
                shutil.rmtree(node.temp_dir, ignore_errors=True)
                if node.log:
                    node.log.unlink(missing_ok=True)
            for f in (self.token_path, self.base / STATE):
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ state on disk (`simex cluster`)

    def client_env(self) -> dict[str, str]:
        """What a shell needs to use this cluster like a remote one: the token, `ray job` commands
        at the dashboard, and ``--address auto`` resolving to the head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_ADDRESS": self.address}

    def save(self) -> None:
        state = {"address": self.address, "dashboard_url": self.dashboard_url, "gcs_port": self.gcs_port,
                 "dashboard_port": self.dashboard_port, "cpus": self.cpus, "object_store_mb": self.object_store_mb,
                 "env": {k: v for k, v in self.env.items() if k.startswith(("RAY_", "OMP_"))},
                 "nodes": [{"name": n.name, "temp_dir": str(n.temp_dir), "args": n.args, "pgid": n.pgid,
                            "node_id": n.node_id, "killed": n.killed, "log": str(n.log) if n.log else None,
                            "start_s": n.start_s, "seen": {str(k): v for k, v in n.seen.items()}}
                           for n in self.nodes]}
        tmp = self.base / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.base / STATE)

    @classmethod
    def open(cls, base: str | os.PathLike) -> "MultiNodeCluster":
        """The cluster ``simex cluster up --dir base`` started (its processes, ports and token)."""
        base = Path(base).resolve()
        try:
            state = json.loads((base / STATE).read_text())
        except FileNotFoundError:
            raise UserError(f"no cluster in {base} (no {STATE}); start one with "
                                    f"`simex cluster up --dir {base}`") from None
        self = cls.__new__(cls)
        self.base, self.workers, self.cpus = base, 0, state["cpus"]
        self.object_store_mb, self.start_timeout_s = state["object_store_mb"], cls.start_timeout_s
        self.start_attempts, self.late_register_s = cls.start_attempts, cls.late_register_s
        self.start_backoff_s = cls.start_backoff_s
        self.health_check_period_ms = cls.health_check_period_ms
        self.health_check_failure_threshold = cls.health_check_failure_threshold
        self.health_check_timeout_ms = cls.health_check_timeout_ms
        self.token_path = base / "auth_token"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **state["env"]}
        self.gcs_port, self.dashboard_port = state["gcs_port"], state["dashboard_port"]
        self.address, self.dashboard_url = state["address"], state["dashboard_url"]
        self.nodes = [Node(n["name"], Path(n["temp_dir"]), n["args"], n["pgid"], n["node_id"], n["killed"],
                           Path(n["log"]) if n["log"] else None, n["start_s"],
                           {int(k): v for k, v in n["seen"].items()}) for n in state["nodes"]]
        self._taken = {self.gcs_port, self.dashboard_port}
        for node in self.nodes:
            ports = {a.split("=", 1)[0]: int(a.split("=", 1)[1]) for a in node.args
                     if "port=" in a and a.split("=", 1)[1].isdigit()}
            self._taken.update(ports.values())
            if "--min-worker-port" in ports:
                self._taken.update(range(ports["--min-worker-port"], ports["--max-worker-port"] + 1))
        return self

    def pids(self) -> set[int]:
        return set().union(*(node_pids(n) for n in self.nodes)) if self.nodes else set()

    # ------------------------------------------------------------------ state (dashboard, with the token)

    def api(self, path: str, timeout: float = 10):
        req = urllib.request.Request(self.dashboard_url + path,
                                     headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def list_state(self, kind: str, **filters) -> list[dict]:
        q = "&".join(f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        body = self.api(f"/api/v0/{kind}?limit=1000&detail=1&{q}")
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return self.list_state("nodes", state="ALIVE")

    def wait_for_nodes(self, n: int, timeout: float | None = None) -> list[dict]:
        """Wait until exactly ``n`` nodes are alive; name worker nodes by their resource."""
        deadline = time.time() + (timeout or self.start_timeout_s)
        last: object = None
        while time.time() < deadline:
            try:
                alive = self.alive_nodes()
            except Exception as e:  # dashboard not up yet
                last = e
            else:
                last = [n_["node_id"] for n_ in alive]
                if len(alive) == n:
                    for info in alive:
                        for i in range(len(self.nodes) - 1):
                            if f"simex_node_{i}" in info.get("resources_total", {}):
                                self.nodes[i + 1].node_id = info["node_id"]
                        if info.get("is_head_node"):
                            self.nodes[0].node_id = info["node_id"]
                    return alive
            time.sleep(0.5)  # the dashboard answers each look: not too often on a busy machine
        raise TimeoutError(f"{n} alive node(s) expected; last seen: {last}")

    def train_controller_log(self) -> list[str]:
        """Ray Train controllers' failure decisions and errors (they log on the head, not to the driver)."""
        lines = []
        for f in sorted((self.nodes[0].temp_dir / "session_latest" / "logs" / "train").glob("ray-train-sys-*.log")):
            for line in f.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("levelname") in ("ERROR", "WARNING") or "FailurePolicy" in record.get("message", ""):
                    lines.append(f"{record.get('asctime')} {record.get('levelname')} {record.get('message')}")
        return lines

    def worker_index(self, node_id: str) -> int | None:
        """Which worker node (0-based) ``node_id`` is, or None (the head / unknown)."""
        for i, node in enumerate(self.nodes[1:]):
            if node.node_id == node_id:
                return i
        return None

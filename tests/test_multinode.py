"""A real multi-node Ray on this machine: a 0-CPU head and two 1-CPU worker nodes, token auth.

Jobs are submitted as a user would (`ray job submit` to the head's dashboard);
the driver runs on the head, the Train workers on the worker nodes. One test
hard-kills a worker node in the middle of fleet training.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .multinode import MultiNodeCluster

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    with MultiNodeCluster(workers=2, cpus=1) as c:
        yield c
    left = c.pids()
    assert not left, f"processes of the test cluster still alive: {sorted(left)}"


def submit(cluster, *entrypoint, wait: bool = True):
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT),
           "--", *map(str, entrypoint)]
    if wait:
        return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def simex_main(argv: list[str]) -> int:
    from simex_ray.cli import main

    return main(argv)


def simex_json(*args) -> dict:
    """`simex ... --json`, run in this process (no interpreter + torch start-up)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert simex_main([*map(str, args), "--json"]) == 0
    return json.loads(out.getvalue())


def test_three_node_cluster_runs_the_main_job(cluster, tmp_path):
    alive = cluster.alive_nodes()
    assert len(alive) == 3
    assert sum(n["is_head_node"] for n in alive) == 1
    assert all(n.node_id for n in cluster.nodes)
    print("node start-up: " + ", ".join(f"{n.name} {n.start_s:.0f}s" for n in cluster.nodes))
    t0 = time.time()
    proc = submit(cluster, "python", "jobs/main.py", "--address", "auto", "--refs", "digits,bgrand:digits",
                  "--samples", "240", "--epochs", "1", "--cpus-per-worker", "0.5", "--out", tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    print(f"main job: {time.time() - t0:.0f}s")
    result = json.loads((tmp_path / "delta_matrix.json").read_text())
    assert result["references"] == ["digits", "bgrand:digits"]
    # The Train workers ran on the worker nodes (the head has no CPU for them).
    workers = cluster.list_state("actors", class_name="RayTrainWorker")
    assert workers and all(cluster.worker_index(a["node_id"]) is not None for a in workers)


class FleetWatcher(threading.Thread):
    """Reads the fleet directory over and over: whenever the manifest lists a member, its weights verify."""

    def __init__(self, fleet: Path):
        super().__init__(daemon=True)
        self.fleet, self.stop, self.reads, self.problems = fleet, threading.Event(), 0, []

    def run(self):
        from simex_ray.fleet import read_manifest, sha256_file

        while not self.stop.is_set():
            if (self.fleet / "manifest.json").exists():
                try:
                    manifest = read_manifest(self.fleet)
                    for m in manifest["members"]:
                        path = self.fleet / m["weights"]
                        if not path.is_file() or sha256_file(path) != m["sha256"]:
                            self.problems.append(f"{m['name']}: {path} missing or not matching the manifest")
                    self.reads += 1
                except Exception as e:  # a torn manifest would land here
                    self.problems.append(repr(e))
            time.sleep(0.05)


def test_fleet_training_survives_losing_a_worker_node(cluster, tmp_path):
    refs = "digits,bgrand:digits,rotated:digits"
    flags = ["--refs", refs, "--samples", "240", "--epochs", "6"]
    fleet = tmp_path / "fleet"
    watcher = FleetWatcher(fleet)
    watcher.start()
    # Meanwhile, the reference: the same flags, trained in this process without Ray (`simex train --no-ray`).
    reference, ref_status = tmp_path / "ref", []
    ref_thread = threading.Thread(target=lambda: ref_status.append(
        simex_main(["train", "--no-ray", *flags, "--out", str(reference)])), daemon=True)
    ref_thread.start()
    t0 = time.time()
    # Training only (`simex train`): scoring the fleet is the same with or without the loss.
    job = submit(cluster, "simex", "train", "--address", "auto", *flags, "--cpus-per-worker", "0.5",
                 "--out", fleet, wait=False)
    output = ""
    try:
        # Wait for the first epoch checkpoint: training is under way on the worker nodes.
        while not any((fleet / "checkpoints").glob("*/checkpoint_*")):
            assert job.poll() is None, f"job ended before training started: {job.stdout.read()[-3000:]}"
            assert time.time() - t0 < 240, "no checkpoint within 240 s"
            time.sleep(0.3)
        t_first = time.time() - t0
        actors = cluster.list_state("actors", state="ALIVE")
        # (class, worker node index); None: the head
        placement = sorted(((a["class_name"], cluster.worker_index(a["node_id"])) for a in actors), key=str)
        hosts: dict[int, int] = {}
        for actor in actors:
            if actor["class_name"] == "RayTrainWorker" and (i := cluster.worker_index(actor["node_id"])) is not None:
                hosts[i] = hosts.get(i, 0) + 1
        assert hosts, "no live Train worker on a worker node"
        # The node of any driver-side helper actor Ray put on a worker node (the driver must not
        # depend on it: it is lost with the node), else the one with the fewest Train workers.
        helpers = [i for cls, i in placement if i in hosts and cls not in ("RayTrainWorker", "PreemptionWatcher")]
        victim = helpers[0] if helpers else min(hosts, key=lambda i: hosts[i])
        killed = cluster.kill_node(victim)
        assert killed
        t_kill = time.time() - t0
        cluster.wait_for_nodes(2, timeout=60)
        t_dead = time.time() - t0
        output, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
        watcher.stop.set()
        watcher.join()
    t_job = time.time() - t0
    print(f"first checkpoint {t_first:.0f}s, node {victim} ({hosts[victim]} worker(s)) killed at {t_kill:.0f}s, "
          f"marked dead at {t_dead:.0f}s, "
          f"job done at {t_job:.0f}s; {watcher.reads} fleet reads; actors (class, worker node): {placement}")
    print("\n".join(line for line in output.splitlines() if " epoch " in line or "FailurePolicy" in line))
    assert job.returncode == 0, output[-4000:] + "\nTrain controllers:\n" + "\n".join(cluster.train_controller_log())
    assert "succeeded" in output
    assert watcher.reads > 0 and not watcher.problems, watcher.problems[:5]

    # The fleet that lost a node mid-training scores like the uninterrupted reference.
    ref_thread.join(timeout=300)
    assert ref_status == [0]
    ours = simex_json("matrix", "--fleet", fleet)
    theirs = simex_json("matrix", "--fleet", reference)
    assert ours["references"] == theirs["references"] == refs.split(",")
    assert ours["unknown"] == theirs["unknown"] and ours["n"] == theirs["n"]
    for row_ours, row_theirs in zip(ours["delta"], theirs["delta"], strict=True):
        assert row_ours == pytest.approx(row_theirs, rel=1e-4)
    assert ours["most_similar"] == theirs["most_similar"]


STARTUP_LOSS_DRIVER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import ray
from simex_ray.distributed.train import Resources, train_fleet
from simex_ray.plan import plan_fleet
from simex_ray.training import TrainConfig
from tests.multinode import SlowOnce

out, marker = sys.argv[1], sys.argv[2]
ray.init(address="auto", log_to_driver=False)
plans = plan_fleet(["digits"], TrainConfig(epochs=2), samples=240, seed=0)
fault = {"member": "-", "epoch": -1, "marker": marker + ".unused", "slow": SlowOnce(marker)}
writer = train_fleet(plans, out, resources=Resources(cpus_per_worker=0.5), fault=fault)
print("EPOCHS", [h["epoch"] for h in writer.members["digits"].history])
"""


def test_node_lost_while_train_starts_its_worker(cluster, tmp_path):
    """Ray Train 2.60 retries a worker lost in training or in its set-up, but not one lost while it
    launches the training function (``run_train_fn``): the run fails with ControllerError. The
    fleet then runs it again (same name and storage)."""
    if sum(not n.killed for n in cluster.nodes[1:]) < 2:
        cluster.add_workers(1)  # the previous test took one away
    marker = tmp_path / "in-run-train-fn"
    t0 = time.time()
    job = submit(cluster, "python", "-c", STARTUP_LOSS_DRIVER, tmp_path / "fleet", marker, wait=False)
    try:
        while not marker.exists():
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.time() - t0 < 180, "the Train worker never launched its training function"
            time.sleep(0.2)
        victim = cluster.node_of_pid(int(marker.read_text()))
        assert victim is not None
        cluster.kill_node(victim)
        t_kill = time.time() - t0
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    print(f"node {victim} lost in run_train_fn at {t_kill:.0f}s, job done at {time.time() - t0:.0f}s")
    controller = "\n".join(cluster.train_controller_log())
    assert job.returncode == 0, output[-4000:] + "\nTrain controllers:\n" + controller
    assert "running it again from its checkpoint" in output
    assert "EPOCHS [1, 2]" in output
    assert "RAISE" in controller  # Ray Train itself gave up on the run

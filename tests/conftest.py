"""Shared fixtures: a tiny fleet trained in-process, and one real local Ray cluster per session."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from simex_ray.local_cluster import free_port  # noqa: F401  (the tests import it from here)

# Keep torch from oversubscribing the 2-core CI machine when Ray workers run too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The test cluster uses token auth like a real one; Ray reads this when imported.
os.environ["RAY_AUTH_MODE"] = "token"


class Finished(subprocess.CompletedProcess):
    """What `simex ARGS` run in this process returned and printed (the shape of a subprocess's result)."""


@pytest.fixture
def simex_here(capsys):
    """``simex_here(*args, check=True)``: the CLI's ``main(args)`` in this process, as a user runs it but without
    a new interpreter (torch's start-up): its exit status (argparse's exits included) and what it printed.
    Logging goes to pytest's log capture, not to ``stderr``. Each verb keeps one real subprocess test."""
    from simex_ray.cli import main

    def run(*args, check=True) -> Finished:
        argv = [str(a) for a in args]
        capsys.readouterr()  # only this run's output
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help and argument errors
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"simex {' '.join(argv)} failed ({code}):\n{err}")
        return Finished(["simex", *argv], code, out, err)

    return run


@pytest.fixture(scope="session")
def tiny_fleet(tmp_path_factory):
    """digits vs bgrand:digits, 300 samples each, 2 epochs, trained without Ray (a few seconds)."""
    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    out = tmp_path_factory.mktemp("fleet")
    plans = plan_fleet(["digits", "bgrand:digits"], TrainConfig(epochs=2), samples=300, seed=0)
    train_fleet_local(plans, out, extra={"refs": ["digits", "bgrand:digits"], "samples": 300, "seed": 0})
    return out


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible HTTP server (moto) on a free port, and the AWS_* environment pyarrow reads."""
    import pyarrow.fs as pafs

    server_mod = pytest.importorskip("moto.server", reason="pip install 'moto[server]' for the s3:// tests")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(key, value)
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="test",
                               secret_key="test", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bucket")
        yield fs
    server.stop()


_fleet_count = iter(range(10**6))


@pytest.fixture(params=["local", "file", "s3"])
def where(request, tmp_path):
    """A fresh fleet location on each filesystem: a plain path, a file:// URI, an s3:// URI."""
    if request.param == "local":
        return str(tmp_path / "fleet")
    if request.param == "file":
        return (tmp_path / "fleet").as_uri()
    request.getfixturevalue("s3")
    return f"s3://bucket/fleet-{next(_fleet_count)}"


def make_ground_truth(out, refs: str, samples: int):
    """A tiny transfer-learning ground truth (TL-1, two seeds, two epochs), computed without Ray."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proto = out / "tiny.json"
    proto.write_text(json.dumps({"base": "default", "tl_configs": ["TL-1"], "seeds": [0, 1], "clf_max_epochs": 2,
                                 "clf_patience": 1, "test_samples": 60}))
    proc = subprocess.run([sys.executable, str(root / "jobs" / "transfer.py"), "--refs", refs, "--samples",
                           str(samples), "--protocol", str(proto), "--no-ray", "--out", str(out / "gt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "gt", proc


class Cluster:
    def __init__(self, gcs: str, dashboard: str, env: dict[str, str]):
        self.address, self.dashboard_url, self.env = gcs, dashboard, env


@pytest.fixture(scope="session")
def ray_cluster():
    """A real `ray start --head` cluster with token auth, joined by this process.

    Started with --block so terminating that one process stops exactly this
    cluster (never a developer's own Ray), on free ports, in its own temp dir.
    Shared by every Ray-marked test (Train, Jobs, Serve) in the session.
    """
    import ray

    gcs_port, dash_port = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="simex-ray-")
    # The cluster's own token (as `simex cluster up` makes one): a clean machine has no ~/.ray/auth_token, and
    # `ray start` with token auth refuses to start without one. This process and its children use it too.
    token = os.path.join(temp, "auth_token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = token
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_worker_maximum_startup_concurrency": "16"}
    cmd = ["ray", "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
           f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--temp-dir={temp}"]
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{gcs_port}"
    try:
        deadline = time.time() + 180
        # Join only once the head says it is up: a half-failed ray.init poisons this process.
        while "Ray runtime started" not in open(log.name).read():
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.2)
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        yield Cluster(address, f"http://127.0.0.1:{dash_port}", env)
    finally:
        ray.shutdown()
        if head.poll() is None:  # a head that never started has already exited
            os.killpg(head.pid, signal.SIGTERM)
            try:  # a clean stop took 34 s at the end of a full run; the temp dir goes with it anyway
                head.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)

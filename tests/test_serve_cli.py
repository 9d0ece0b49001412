"""`simex serve start` / `simex serve stop` as a user runs them: embedded Ray, foreground, reload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.ray


class Service:
    """A `simex serve start` process on a free port: its environment, log and (``grpc``) gRPC port."""

    def __init__(self, fleet, tmp, *flags, grpc: bool = False):
        self.port, self.log_path = free_port(), tmp / "serve.log"
        self.env = {**os.environ, "SIMEX_DATA": str(tmp / "cache")}
        self.url, self.grpc_port = f"http://127.0.0.1:{self.port}", free_port() if grpc else None
        grpc_flags = ["--grpc-port", str(self.grpc_port)] if grpc else []
        with open(self.log_path, "w") as log:
            self.server = subprocess.Popen([sys.executable, "-m", "simex_ray.cli", "serve", "start", "--fleet",
                                            str(fleet), "--port", str(self.port), *flags, *grpc_flags],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def services(tiny_fleet, tmp_path_factory):
    """The module's three services, started together at its first test: their start-ups (each its own
    embedded Ray, Serve and replicas) overlap instead of following one another (back to back the three
    tests took 33 + 49 + 21 s). Each test checks its own service and stops it; what is left is stopped here."""
    edited = tmp_path_factory.mktemp("default")
    fleet = shutil.copytree(tiny_fleet, edited / "fleet")  # the reload test edits its fleet
    started = {
        "default": Service(fleet, edited),
        "haproxy": Service(tiny_fleet, tmp_path_factory.mktemp("haproxy"), "--api-key", "k", "--mode", "embedded",
                           "--ingress", "haproxy"),
        "grpc": Service(tiny_fleet, tmp_path_factory.mktemp("grpc"), "--api-key", "k", "--mode", "embedded",
                        grpc=True),
    }
    yield started
    for service in started.values():
        if service.server.poll() is None:
            _stop(service.port, service.server, service.env)


def test_serve_start_query_reload_stop(services):
    service = services["default"]
    server, port, env, url, log_path = service.server, service.port, service.env, service.url, service.log_path
    fleet = log_path.parent / "fleet"
    try:
        _wait_healthy(url, server, log_path)
        out = subprocess.run([sys.executable, "-m", "simex_ray.cli", "query", "--url", url, "--data",
                              "bgrand:digits", "--samples", "60", "--json"], capture_output=True, text=True,
                             timeout=300)
        assert json.loads(out.stdout)["ranking"][0] == "bgrand:digits", out.stderr
        # Bad fleet edits are reported and the previous fleet keeps serving.
        (fleet / "manifest.json").write_text(json.dumps(json.loads((fleet / "manifest.json").read_text())) + " ")
        _wait_logged("fleet changed", server, log_path)  # the edit was seen (not: 3 s passed)
        assert requests.get(url + "/healthz", timeout=10).json()["members"] == 2
    finally:
        stop = subprocess.run([sys.executable, "-m", "simex_ray.cli", "serve", "stop", "--port", str(port)],
                              env=env, capture_output=True, text=True, timeout=300)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    assert stop.returncode == 0, stop.stderr
    assert server.returncode == 0, log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()
    again = subprocess.run([sys.executable, "-m", "simex_ray.cli", "serve", "stop", "--port", str(port)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "no `simex serve start` is running" in again.stderr


def _wait_healthy(url: str, server, log_path, deadline_s: float = 300) -> None:
    deadline = time.time() + deadline_s
    while True:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert server.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


def _wait_logged(text: str, server, log_path, deadline_s: float = 120) -> None:
    deadline = time.time() + deadline_s
    while text not in log_path.read_text():
        assert server.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


def _stop(port: int, server, env) -> None:
    subprocess.run([sys.executable, "-m", "simex_ray.cli", "serve", "stop", "--port", str(port)], env=env,
                   capture_output=True, text=True, timeout=300)
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.mark.parametrize("ingress", ["haproxy", "grpc"])
def test_faster_ingresses_answer_like_the_default(services, tiny_fleet, ingress):
    """`--ingress haproxy` (HAProxy + Serve's throughput-optimized mode) and `--grpc-port` (Serve's gRPC
    proxy, simex.Scorer/Score): the same answer as in-process scoring, and the API key still holds."""
    import io

    import numpy as np

    from simex_ray import data
    from simex_ray.fleet import Fleet

    service = services[ingress]
    server, port, env, url, log_path = service.server, service.port, service.env, service.url, service.log_path
    grpc_port = service.grpc_port
    x = data.prepare("bgrand:digits", samples=120, seed=0)[1].x[:16]
    buf = io.BytesIO()
    np.save(buf, x)
    expected = Fleet.load(tiny_fleet).score(x).delta
    try:
        _wait_healthy(url, server, log_path)
        if ingress == "haproxy":
            headers = {"content-type": "application/x-npy"}
            assert requests.post(url + "/v1/score", data=buf.getvalue(), headers=headers, timeout=60).status_code == 401
            r = requests.post(url + "/v1/score", data=buf.getvalue(), headers={**headers, "x-api-key": "k"}, timeout=60)
            assert r.status_code == 200, r.text
            answer = r.json()
        else:
            import grpc
            from google.protobuf.wrappers_pb2 import BytesValue

            from simex_ray.distributed.serving.grpc_api import SCORE_METHOD

            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                score = channel.unary_unary(SCORE_METHOD, request_serializer=BytesValue.SerializeToString,
                                            response_deserializer=BytesValue.FromString)
                with pytest.raises(grpc.RpcError) as e:
                    score(BytesValue(value=buf.getvalue()), metadata=[("application", "simex")], timeout=60)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    score(BytesValue(value=b"not an npy"), metadata=[("application", "simex"), ("x-api-key", "k")],
                          timeout=60)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details()
                reply = score(BytesValue(value=buf.getvalue()), timeout=60,
                              metadata=[("application", "simex"), ("x-api-key", "k"), ("per-sample", "true")])
            answer = json.loads(reply.value)
            assert len(answer["per_sample"]["nearest"]) == len(x)
        assert list(answer["delta"]) == list(expected)
        assert answer["delta"] == pytest.approx(expected, rel=1e-5)
    finally:
        _stop(port, server, env)
    assert "Traceback" not in log_path.read_text()


def test_haproxy_ingress_refuses_what_it_cannot_do_safely(tiny_fleet, capsys):
    from simex_ray.cli import main

    assert main(["serve", "start", "--fleet", str(tiny_fleet), "--ingress", "haproxy"]) == 2
    assert "all interfaces" in capsys.readouterr().err
    assert main(["serve", "start", "--fleet", str(tiny_fleet), "--ingress", "haproxy", "--no-auth",
                 "--address", "auto"]) == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().err

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


def test_serve_start_query_reload_stop(tiny_fleet, tmp_path):
    fleet = shutil.copytree(tiny_fleet, tmp_path / "fleet")
    port = free_port()
    env = {**os.environ, "SIMEX_DATA": str(tmp_path / "cache")}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "simex_ray.cli", "serve", "start", "--fleet", str(fleet),
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        out = subprocess.run([sys.executable, "-m", "simex_ray.cli", "query", "--url", url, "--data",
                              "bgrand:digits", "--samples", "60", "--json"], capture_output=True, text=True,
                             timeout=300)
        assert json.loads(out.stdout)["ranking"][0] == "bgrand:digits", out.stderr
        # Bad fleet edits are reported and the previous fleet keeps serving.
        (fleet / "manifest.json").write_text(json.dumps(json.loads((fleet / "manifest.json").read_text())) + " ")
        time.sleep(3)
        assert requests.get(url + "/healthz", timeout=10).json()["members"] == 2
    finally:
        stop = subprocess.run([sys.executable, "-m", "simex_ray.cli", "serve", "stop", "--port", str(port)],
                              env=env, capture_output=True, text=True, timeout=300)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert stop.returncode == 0, stop.stderr
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    again = subprocess.run([sys.executable, "-m", "simex_ray.cli", "serve", "stop", "--port", str(port)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "no `simex serve start` is running" in again.stderr

"""Ray Jobs: the main job submitted to a token-authenticated cluster, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def submit(cluster, *entrypoint, env):
    return subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url,
                           "--working-dir", str(ROOT), "--", *map(str, entrypoint)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_job_submit_needs_the_token(ray_cluster):
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_MODE"}
    proc = submit(ray_cluster, "python", "-c", "print(1)", env=env)
    assert proc.returncode != 0
    # The dashboard's 401, as Ray's job CLI reports it: the job was refused for the missing token.
    assert "Authentication required: Unauthorized: Missing authentication token" in proc.stderr, proc.stderr[-2000:]
    assert "submitted successfully" not in proc.stdout + proc.stderr


def test_main_job_submitted_to_the_cluster(ray_cluster, tmp_path):
    proc = submit(ray_cluster, "python", "jobs/main.py", "--address", "auto", "--refs", "digits,bgrand:digits",
                  "--samples", "240", "--epochs", "1", "--cpus-per-worker", "0.5", "--out", tmp_path,
                  env=ray_cluster.env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    result = json.loads((tmp_path / "delta_matrix.json").read_text())
    assert result["references"] == ["digits", "bgrand:digits"]
    assert os.path.getsize(tmp_path / "delta_matrix.png") > 1000

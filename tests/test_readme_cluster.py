"""README "Try it on one machine", run as written: a real 3-node token cluster, a job, Serve, a lost node."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from simex_ray.local_cluster import STATE, MultiNodeCluster, Node, free_port, node_pids

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- cluster-on-one-machine -->"
# The whole block (cluster up, a training job, Serve, two queries, a lost node, down) took 205 s on a
# 2-core machine at load average 8-9; the deadline leaves room for a machine about four times as busy.
BLOCK_DEADLINE_S = 900


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README has no bash block after {MARKER}"
    return m.group(1)


def test_readme_block_is_what_the_test_runs():
    block = readme_block()
    # The block exercises what README promises: a job, Serve, a lost node, and a clean stop.
    for needle in ("simex cluster up", "ray job submit", "simex serve start", "--address auto",
                   "simex cluster kill-node", "simex query", "simex cluster down"):
        assert needle in block


@pytest.mark.ray
def test_readme_cluster_commands_run_on_a_local_multi_node_cluster():
    # Short: Ray's unix sockets live under it (107 bytes at most); pytest's tmp_path is too long.
    base = Path(tempfile.mkdtemp(prefix="simex-rc-", dir="/tmp"))
    port = free_port()
    script = readme_block().replace("/tmp/simex-cluster", str(base)).replace("8001", str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=BLOCK_DEADLINE_S)
    finally:
        if (base / STATE).exists():  # the script stopped before `down`: stop its cluster
            MultiNodeCluster.open(base).kill_all()
        leftover = node_pids(Node("any", base, []))
        shutil.rmtree(base, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out and "3/3 datasets rank their own reference first" in out
    # Both queries answered, the second after the node loss, with the same ranking.
    answers = re.findall(r"most similar: (\S+)", proc.stdout)
    assert answers == ["rotated:digits", "rotated:digits"], proc.stdout[-3000:]
    assert re.search(r"worker 0\s+dead", out) and re.search(r"worker 1\s+alive", out)
    # `down` left no process of this cluster behind.
    assert not leftover, "processes of the README cluster still alive after `simex cluster down`"


def test_cluster_verbs_fail_in_one_line(tmp_path, capsys):
    from simex_ray.cli import main

    assert main(["cluster", "env", "--dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no cluster in" in err and "simex cluster up --dir" in err
    deep = tmp_path / ("d" * 60)
    assert main(["cluster", "up", "--dir", str(deep)]) == 2
    err = capsys.readouterr().err
    assert "too long for Ray's unix sockets" in err and "Traceback" not in err
    assert main(["cluster", "up", "--workers", "0", "--dir", str(tmp_path / "w")]) == 2
    assert "--workers and --cpus must be >= 1" in capsys.readouterr().err

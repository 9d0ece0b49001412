"""The early-stopping study on a real Ray Tune: a ground truth reused, trials stopped, a killed study resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simex_ray.fleet import read_manifest

from .conftest import make_ground_truth

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
REFS = "digits,bgrand:digits,rotated:digits"


def simex(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "simex_ray.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    """A tiny ground truth computed once by the job entrypoint, in-process (no Ray needed for it)."""
    gt, proc = make_ground_truth(tmp_path_factory.mktemp("gt"), REFS, 90)
    summary = json.loads(proc.stdout)
    assert summary["references"] == REFS.split(",") and summary["target"] == "accuracy"
    return gt


def _study(cluster, gt, out, *extra):
    return [sys.executable, "-m", "simex_ray.cli", "tune", "stopping", "--address", cluster.address,
            "--ground-truth", str(gt), "--eval-samples", "30", "--out", str(out), *map(str, extra)]


def test_stop_when_stable_ends_each_trial_at_its_earliest_stable_epoch(ray_cluster, ground_truth, tmp_path):
    # A band of 2 holds any ρ curve: every trial is stable from epoch 1 and must stop after epoch k = 2.
    proc = subprocess.run(_study(ray_cluster, ground_truth, tmp_path / "s", "--configs", "rmsprop:1e-3,adam:1e-3",
                                 "--seeds", "1", "--max-epochs", "6", "--stop-when-stable", "--eps", "2", "--k", "2",
                                 "--cpus-per-trial", "0.5"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((tmp_path / "s" / "stopping.json").read_text())
    assert set(study["configs"]) == {"rmsprop lr=0.001", "adam lr=0.001"}
    for c in study["configs"].values():
        assert c["per_seed"]["0"]["epochs"] == [1, 2] and c["earliest_stable_epoch"] == 1
    assert "epoch   3/6" not in proc.stderr and "epoch   2/6" in proc.stderr
    for f in ("stopping.parquet", "stopping.png"):
        assert (tmp_path / "s" / f).stat().st_size > 1000
    # The chosen configuration trains a production fleet.
    fleet = tmp_path / "F"
    proc = simex("train", "--refs", "digits,bgrand:digits", "--samples", "60", "--from-study", tmp_path / "s",
                 "--no-ray", "--out", fleet)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_manifest(fleet)["members"][0]["config"]
    best = study["configs"][study["best"]]
    assert (config["optimizer"], config["lr"], config["epochs"]) == (best["optimizer"], best["lr"], 1)


def test_an_interrupted_study_resumes_without_repeating_finished_trials(ray_cluster, ground_truth, tmp_path):
    out = tmp_path / "s"
    # One trial at a time (1.5 CPUs each on the 2-CPU cluster): the first finishes, then the driver is killed.
    cmd = _study(ray_cluster, ground_truth, out, "--configs", "rmsprop:1e-3,rmsprop:2e-4", "--seeds", "1",
                 "--max-epochs", "6", "--cpus-per-trial", "1.5")
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    lines, finished = [], None
    deadline = time.time() + 300
    for line in first.stderr:  # kill the driver once the second trial is two epochs in
        lines.append(line)
        if line.rstrip().endswith(" done"):
            finished = line.split("]", 1)[1].rsplit(" done", 1)[0].strip()
        elif finished and finished not in line and "epoch   2/6" in line:
            os.killpg(first.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    first.wait(timeout=60)
    assert finished is not None, "".join(lines[-20:])
    assert not (out / "stopping.json").exists()  # it really stopped before the end
    trial_dirs = {p: (p / "result.json").read_text() for p in (out / "tune").glob("*trial*")
                  if (p / "result.json").is_file()}

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # The finished trial trained no further epoch; the other one ran to the end.
    assert not [line for line in second.stderr.splitlines() if finished in line and " epoch " in line]
    assert [line for line in second.stderr.splitlines() if finished not in line and "epoch   6/6" in line]
    for path, text in trial_dirs.items():
        if text.count("\n") == 6:  # the finished trial's six reported epochs are untouched
            assert (path / "result.json").read_text() == text
    study = json.loads((out / "stopping.json").read_text())
    for c in study["configs"].values():
        assert c["per_seed"]["0"]["epochs"] == [1, 2, 3, 4, 5, 6]
    # Other settings in the same directory are refused, not silently mixed in.
    proc = subprocess.run(cmd + ["--max-epochs", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds a study with other settings (max_epochs: 6 there, 5 asked)" in proc.stderr


def test_the_study_job_entrypoint_refuses_a_mismatched_ground_truth(ground_truth, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune_stopping.py"), "--ground-truth", ground_truth,
                           "--refs", "digits,bgrand:digits", "--out", tmp_path], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("simex tune: error: ")
    assert "references differ (computed for rotated:digits too)" in proc.stderr

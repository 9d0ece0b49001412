"""Fleet training on a real local Ray: the CLI end to end, retries, resume, the main job."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simex_ray import data
from simex_ray.fleet import Fleet, read_manifest
from simex_ray.fleet.build import train_fleet_local
from simex_ray.fleet.plan import plan_fleet
from simex_ray.training import TrainConfig

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def inter_dataset_job(request, tmp_path_factory):
    """`jobs/inter_dataset.py --address` on the session cluster, started as the module starts when its test is
    selected: it runs beside the module's first tests (their Ray start-ups and Train runs wait on other
    things than the CPU much of the time) instead of for about 58 s of its own, and its test waits for it.
    stdout and stderr go to files: a pipe nobody reads could fill and stall it. Yields (process, refs, dir)."""
    if not any(item.nodeid.endswith("test_ray.py::test_inter_dataset_job_on_the_cluster")
               for item in request.session.items):
        yield None
        return
    ray_cluster = request.getfixturevalue("ray_cluster")
    tmp_path = tmp_path_factory.mktemp("inter_dataset")
    protocol = tmp_path / "tiny.json"
    protocol.write_text(json.dumps({"ae_epochs": 1, "tl_configs": ["TL-1"], "clf_max_epochs": 2, "clf_patience": 1,
                                    "n_pairs": 32, "embedding_samples": 60, "test_samples": 60}))
    refs = "digits,rotated:digits,bgrand:digits"
    # --cpus-per-task 1: two concurrent Train runs on the 2-CPU test cluster; 0.5 made four, whose start-ups
    # (not their work) cost about 30 s more. The wiring is the same.
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "inter_dataset.py"), "--address",
                                 ray_cluster.address, "--refs", refs, "--samples", "120", "--protocol", str(protocol),
                                 "--cpus-per-task", "1", "--out", str(tmp_path / "out")],
                                stdout=stdout, stderr=stderr, text=True)
    yield proc, refs, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_train_on_embedded_ray_then_score(tmp_path):
    """The issue's check: no --address, so `simex train` starts and stops its own Ray."""
    fleet = tmp_path / "F"
    proc = run("-m", "simex_ray.cli", "train", "--refs", "digits,rotated:digits,bgimage:digits",
               "--epochs", "2", "--samples", "600", "--out", fleet)
    assert "epoch   2/2" in proc.stderr  # progress was shown while it ran
    manifest = read_manifest(fleet)
    assert [m["name"] for m in manifest["members"]] == ["digits", "rotated:digits", "bgimage:digits"]
    out = json.loads(run("-m", "simex_ray.cli", "score", "--fleet", fleet, "--data", "rotated:digits",
                         "--json").stdout)
    assert out["ranking"][0] == "rotated:digits"


def _plans(epochs, refs=("digits", "bgrand:digits"), samples=240):
    return plan_fleet(list(refs), TrainConfig(epochs=epochs), samples=samples, seed=1)


def test_crashed_worker_is_retried_and_matches_uninterrupted_training(ray_cluster, tmp_path):
    from simex_ray.distributed.train import Resources, train_fleet

    marker = tmp_path / "crashed-once"
    seen = []
    writer = train_fleet(_plans(2), tmp_path / "F", resources=Resources(cpus_per_worker=0.5, max_failures=2),
                         fault={"member": "digits", "epoch": 1, "marker": str(marker)},
                         on_progress=lambda name, m: seen.append((name, m["epoch"])))
    assert marker.exists()  # the worker really died once
    assert {n for n, _ in seen} == {"digits", "bgrand:digits"}
    digits = writer.members["digits"]
    assert [h["epoch"] for h in digits.history] == [1, 2]
    reference = train_fleet_local(_plans(2), tmp_path / "local").members["digits"]
    for ours, theirs in zip(digits.history, reference.history):
        assert ours["train_delta"] == pytest.approx(theirs["train_delta"], rel=1e-4)


def test_epochs_auto_stops_each_member_on_ray_train_as_here(ray_cluster, tmp_path):
    """A member whose held-out Δ stops improving stops there on Ray Train too (SGD at a tiny lr: patience 1 ends
    it after epoch 2 of at most 5), and the manifest records the epochs it trained and its patience."""
    from simex_ray.distributed.train import Resources, train_fleet

    def plans():
        config = TrainConfig(epochs=5, patience=1, optimizer="sgd", lr=1e-7)
        return plan_fleet(["digits"], config, samples=120, seed=1)

    writer = train_fleet(plans(), tmp_path / "F", resources=Resources(cpus_per_worker=0.5))
    member = writer.members["digits"]
    assert [h["epoch"] for h in member.history] == [1, 2]
    local = train_fleet_local(plans(), tmp_path / "local").members["digits"]
    assert [h["test_delta"] for h in member.history] == pytest.approx([h["test_delta"] for h in local.history],
                                                                       rel=1e-6)
    # Ray Train's members get latent moments as training here does (the driver fits them as it writes a member)
    assert member.latent["n_fit"] == local.latent["n_fit"] and member.latent["sha256"]
    assert member.latent["own_mean"] == pytest.approx(local.latent["own_mean"], rel=1e-4)
    manifest = json.loads((tmp_path / "F" / "manifest.json").read_text())
    record, = manifest["members"]
    assert record["config"]["patience"] == 1 and record["metrics"]["epochs_trained"] == 2


def test_a_streamed_reference_trains_on_ray_survives_a_crash_and_matches_local(ray_cluster, tmp_path):
    """The worker reads its reference slice by slice (the driver never loads it), a crash after epoch 1 is
    retried from the checkpoint, and the member equals the same streamed training done here."""
    from simex_ray.distributed.train import Resources, train_fleet

    x = (data.load("digits").x[:, 0] * 255).round().astype(np.uint8)
    np.savez(tmp_path / "ref.npz", x=x)
    spec = f"npz:{tmp_path / 'ref.npz'}"

    def plans():
        return plan_fleet([spec], TrainConfig(epochs=2, batch_size=64), stream="always", seed=1)

    assert plans()[0].x_train is None  # nothing for the driver to ship
    marker = tmp_path / "crashed-once"
    writer = train_fleet(plans(), tmp_path / "F", resources=Resources(cpus_per_worker=0.5, max_failures=2),
                         fault={"member": spec, "epoch": 1, "marker": str(marker)})
    assert marker.exists()
    ours = writer.members[spec]
    assert ours.split == "row-hash" and [h["epoch"] for h in ours.history] == [1, 2]
    local = train_fleet_local(plans(), tmp_path / "local").members[spec]
    for a, b in zip(ours.history, local.history):
        assert a["train_delta"] == pytest.approx(b["train_delta"], rel=1e-4)
        assert a["test_delta"] == pytest.approx(b["test_delta"], rel=1e-4)
    # the latent moments of a streamed member: the same seeded subset of its training split, read by the driver
    assert ours.latent["n_fit"] == local.latent["n_fit"] > 0
    assert ours.latent["own_mean"] == pytest.approx(local.latent["own_mean"], rel=1e-3)


def test_members_train_data_parallel_like_one_worker_and_survive_a_crash(ray_cluster, tmp_path):
    """--workers-per-member 2: each step's batch split between two DDP workers is the one-worker step, for a
    member in memory and a streamed one; a worker killed after epoch 1 is survived."""
    from simex_ray.distributed.train import Resources, train_fleet

    x = (data.load("digits").x[:, 0] * 255).round().astype(np.uint8)
    np.savez(tmp_path / "a.npz", x=x[:500])
    np.savez(tmp_path / "b.npz", x=x[500:1000])
    here, streamed = f"npz:{tmp_path / 'a.npz'}", f"npz:{tmp_path / 'b.npz'}"

    def plans():
        config = TrainConfig(epochs=2, batch_size=30)  # 418 training rows: a short last batch of 28, split 14 + 14
        return (plan_fleet([here], config, stream="never", seed=1)
                + plan_fleet([streamed], config, stream="always", seed=1))

    assert [p.stream is not None for p in plans()] == [False, True]
    marker = tmp_path / "crashed-once"
    writer = train_fleet(plans(), tmp_path / "F",
                         resources=Resources(cpus_per_worker=0.5, workers_per_member=2, max_failures=2),
                         fault={"member": here, "epoch": 1, "marker": str(marker)})
    assert marker.exists()
    local = train_fleet_local(plans(), tmp_path / "local")
    for name in (here, streamed):
        ours, theirs = writer.members[name].history, local.members[name].history
        assert [h["epoch"] for h in ours] == [1, 2]
        for a, b in zip(ours, theirs):  # the same steps, to float rounding
            assert a["test_delta"] == pytest.approx(b["test_delta"], rel=1e-4)
            assert a["train_delta"] == pytest.approx(b["train_delta"], rel=1e-4)


def test_failed_run_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    from simex_ray.distributed.train import Resources, TrainingError, train_fleet

    out, marker = tmp_path / "F", tmp_path / "crash"
    plans = _plans(3, refs=("digits",))
    with pytest.raises(TrainingError, match="re-run the same command to resume"):
        train_fleet(plans, out, resources=Resources(cpus_per_worker=0.5, max_failures=0),
                    fault={"member": "digits", "epoch": 2, "marker": str(marker)})
    assert not (out / "manifest.json").exists() or not read_manifest(out)["members"]
    saved = _registered_epoch(out)  # epoch 1 always, or epoch 2 when its checkpoint was due too
    assert saved in (1, 2)
    epochs_run = []
    writer = train_fleet(_plans(3, refs=("digits",)), out, resources=Resources(cpus_per_worker=0.5),
                         on_progress=lambda n, m: epochs_run.append(m["epoch"]))
    # training continued after the registered checkpoint, and only from there
    assert epochs_run == list(range(saved + 1, 4))
    assert [h["epoch"] for h in writer.members["digits"].history] == [1, 2, 3]
    # More epochs later: continues the same run instead of starting over.
    epochs_run.clear()
    writer = train_fleet(_plans(4, refs=("digits",)), out, resources=Resources(cpus_per_worker=0.5),
                         on_progress=lambda n, m: epochs_run.append(m["epoch"]))
    assert epochs_run == [4]
    assert len(writer.members["digits"].history) == 4
    # Nothing left to do: no Train run at all.
    before = (out / "manifest.json").read_bytes()
    train_fleet(_plans(4, refs=("digits",)), out)
    assert (out / "manifest.json").read_bytes() == before


def _registered_epoch(fleet: Path) -> int:
    """The epoch of the newest checkpoint the fleet's Train run registered (0: none)."""
    epochs = [0]
    for f in fleet.glob("checkpoints/*/checkpoint_manager_snapshot.json"):
        metrics = (json.loads(f.read_text()).get("latest_checkpoint_result") or {}).get("metrics") or {}
        epochs.append(int(metrics.get("epoch", 0)))
    return max(epochs)


def test_main_job_runs_on_the_session_ray(ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("main_job", ROOT / "jobs" / "main.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rc = job.main(["--refs", "digits,bgrand:digits", "--samples", "240", "--epochs", "2",
                   "--out", str(tmp_path), "--cpus-per-worker", "0.5"])
    assert rc == 0
    result = json.loads((tmp_path / "delta_matrix.json").read_text())
    assert result["self_top1"] == {"digits": True, "bgrand:digits": True}
    assert (tmp_path / "delta_matrix.png").stat().st_size > 1000
    fleet = Fleet.load(tmp_path / "fleet")
    _, test = data.prepare("digits", samples=240, seed=0)
    assert fleet.score(test.x).delta["digits"] == pytest.approx(result["delta"][0][0])


def test_base_classifiers_on_ray_train_survive_a_crash_and_match_local(ray_cluster, tmp_path):
    """train_map: units packed into Train runs, one worker killed after a checkpoint, same results."""
    from simex_ray.transfer.classifiers import train_base
    from simex_ray.distributed.map import train_map
    from simex_ray.distributed.train import Resources
    from simex_ray.protocol import PAPER, load_splits

    units = [dict(**load_splits(spec, samples=150, data_seed=0, data_dir=None, protocol=PAPER).clf_kwargs(),
                  max_epochs=2, patience=1, seed=seed)
             for spec in ("digits", "rotated:digits") for seed in (0, 1)]
    marker, seen = tmp_path / "crashed-once", []
    map_fn = train_map(Resources(cpus_per_worker=0.5, runs=2, max_failures=2),
                       on_unit=lambda stage, done, total: seen.append((stage, done, total)),
                       fault={"unit": 0, "marker": str(marker)})
    results = map_fn(train_base, units)
    assert marker.exists()  # a worker really died once
    assert seen[-1] == ("train_base", 4, 4)
    for ours, kw in zip(results, units):
        local = train_base(**kw)
        assert ours["test_accuracy"] == pytest.approx(local["test_accuracy"])
        assert ours["val_loss"] == pytest.approx(local["val_loss"], rel=1e-4)
        assert set(ours["state"]) == set(local["state"])


def test_inter_dataset_job_on_the_cluster(inter_dataset_job):
    """The experiment's Ray path end to end: autoencoders and base classifiers on Ray Train, transfers as tasks."""
    proc, refs, tmp_path = inter_dataset_job
    returncode = proc.wait(timeout=900)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    result = json.loads((tmp_path / "out" / "inter_dataset.json").read_text())
    assert summary["references"] == refs.split(",")
    per_base = [v for v in result["rho_per_base"].values() if v is not None]  # NaN is written as null
    assert summary["rho_mean"] == pytest.approx(np.mean(per_base) if per_base else float("nan"), nan_ok=True)
    # progress as units finish: 3 base classifiers (Ray Train), 9 transfers (Ray tasks)
    # progress per stage, from its start to its end (units finishing between two polls share a line)
    for stage, total in (("base-classifiers", 3), ("transfer", 9)):
        counts = [int(m) for m in re.findall(rf"\] {stage}\s+(\d+)/{total}", stderr)]
        assert counts and counts[0] == 0 and counts[-1] == total and counts == sorted(counts), (stage, counts)
    result = json.loads((tmp_path / "out" / "inter_dataset.json").read_text())
    assert result["sizes"]["digits"]["ae_test"] == 60 and result["sizes"]["digits"]["ae_train"] == 100
    assert np.asarray(result["transfer_accuracy"]).shape == (3, 3)
    assert (tmp_path / "out" / "fleet" / "manifest.json").is_file()
    for png in ("delta.png", "transfer_accuracy.png", "transfer_efficiency.png", "rho.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_train_bases_on_ray_train_equals_training_here(ray_cluster, tmp_path):
    """`simex train-bases --address`: the classifiers trained on Ray Train are the ones trained in this
    process (same data, seeds and settings: same test accuracy, same outputs). A 1.4-CPU worker on the 2-CPU
    cluster is one run at a time, so both classifiers train in one fused pass there, as they do here."""
    from simex_ray.transfer.library import Library

    common = ("--refs", "digits,bgrand:digits", "--samples", 240, "--protocol", "few-shot")
    run("-m", "simex_ray.cli", "train-bases", *common, "--address", ray_cluster.address, "--cpus-per-task", 1.4,
        "--out", tmp_path / "ray")
    # One thread here too, as a 1.4-CPU Train worker has (round(1.4)): the same float reductions and training.
    here_run = subprocess.run([sys.executable, "-m", "simex_ray.cli", "train-bases", *map(str, common), "--no-ray",
                               "--out", str(tmp_path / "here")], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert here_run.returncode == 0, here_run.stderr[-2000:]
    on_ray, here = Library.load(tmp_path / "ray"), Library.load(tmp_path / "here")
    assert on_ray.names == here.names == ["digits@s0", "bgrand:digits@s0"]
    x = data.prepare("digits", samples=240, seed=0)[1].x
    for name in here.names:
        assert on_ray.classifiers[name].accuracy == pytest.approx(here.classifiers[name].accuracy)
        np.testing.assert_allclose(on_ray.probabilities(name, x), here.probabilities(name, x), atol=1e-5)

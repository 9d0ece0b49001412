"""Fleets on any filesystem pyarrow understands: local paths, file:// and (a local moto server) s3://.

Atomic writes, weights before the manifest, sha256 verification everywhere, and the multi-node
refusal of node-local paths (check_shared).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from simex_ray import data, storage
from simex_ray.fleet import MANIFEST, Fleet, FleetError, read_manifest
from simex_ray.fleet.build import train_fleet_local
from simex_ray.fleet.plan import FleetWriter, plan_fleet
from simex_ray.storage import check_shared, resolve
from simex_ray.training import TrainConfig

REFS = ["digits", "bgrand:digits"]
EXTRA = {"refs": REFS, "samples": 300, "seed": 0}


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_fleet):
    """The tiny fleet's plans and models: what FleetWriter publishes in these tests (no training)."""
    return plan_fleet(REFS, TrainConfig(epochs=2), samples=300, seed=0), Fleet.load(tiny_fleet)


def publish(trained, dest, names=None) -> FleetWriter:
    plans, fleet = trained
    writer = FleetWriter(dest, EXTRA, order=[p.name for p in plans])
    for plan in plans:
        if names is None or plan.name in names:
            writer.add(plan, fleet.models[plan.name].state_dict(), fleet.members[plan.name].history)
    return writer


@pytest.fixture
def fixed_clock(monkeypatch):
    """The manifest's 'updated' stamp, fixed: fleets written at different moments compare byte for byte."""
    import simex_ray.fleet.manifest as fleet_mod

    monkeypatch.setattr(fleet_mod.time, "strftime", lambda fmt, *a: "2026-01-01T00:00:00+0000")


def files_of(loc) -> dict[str, bytes]:
    """Every file under a fleet location (relative path -> bytes), read through pyarrow."""
    loc = resolve(loc)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return {i.path[len(loc.path.rstrip("/")) + 1:]: loc.fs.open_input_stream(i.path).read()
            for i in infos if i.type == pafs.FileType.File}


def digits(n=128):
    return data.load("digits").x[:n]


# --- the Location abstraction ---------------------------------------------------------------------

def test_resolve_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = resolve("runs/x")
    assert isinstance(local.fs, pafs.LocalFileSystem) and local.path == str(tmp_path / "runs/x")
    assert str(local) == "runs/x" and str(local.join("weights", "a.pt")) == "runs/x/weights/a.pt"
    assert local.user_path == Path("runs/x")
    uri = resolve(f"file://{tmp_path}/f")
    assert isinstance(uri.fs, pafs.LocalFileSystem) and uri.path == f"{tmp_path}/f"
    assert str(uri.join(MANIFEST)) == f"file://{tmp_path}/f/manifest.json" and uri.user_path == f"file://{tmp_path}/f"
    s3 = resolve("s3://bucket/a/fleet?region=us-east-1")  # no request is made until a read
    assert isinstance(s3.fs, pafs.S3FileSystem) and s3.path == "bucket/a/fleet"
    assert str(s3) == "s3://bucket/a/fleet" and s3.join("weights/x.pt").path == "bucket/a/fleet/weights/x.pt"
    assert s3.parent.path == "bucket/a" and s3.name == "fleet"
    gs = resolve("gs://bucket/fleet")
    assert type(gs.fs).__name__ == "GcsFileSystem" and gs.path == "bucket/fleet" and str(gs) == "gs://bucket/fleet"
    with pytest.raises(ValueError, match="cannot open 'file://runs/x'"):
        resolve("file://runs/x")  # a relative file:// URI: a host name, not a path
    assert storage.normalize("runs/x") == str(tmp_path / "runs/x")
    assert storage.normalize("s3://bucket/f?region=eu-west-1") == "s3://bucket/f?region=eu-west-1"
    assert storage.is_uri("gs://b/x") and not storage.is_uri("runs/x") and not storage.is_uri(tmp_path)


def test_read_write_list_hash_remove(where):
    loc = resolve(where)
    target = loc.join("weights", "a.bin")
    assert not target.exists() and loc.join("nothing").listdir() == []
    blob = bytes(range(256)) * 5000  # > 1 MiB: several chunks
    target.write_bytes_atomic(blob)
    target.write_bytes_atomic(blob)  # replacing works as well
    assert target.is_file() and not target.is_dir() and target.size() == len(blob)
    assert target.read_bytes() == blob and target.sha256() == hashlib.sha256(blob).hexdigest()
    assert loc.join("weights").listdir() == ["a.bin"]  # no temporary files left behind
    assert loc.join("weights").is_dir()
    target.remove()
    target.remove()  # missing_ok
    assert not target.exists()


# --- fleets on every filesystem -------------------------------------------------------------------

def test_local_path_and_file_uri_write_byte_identical_fleets(trained, tmp_path, fixed_clock):
    publish(trained, tmp_path / "a")
    publish(trained, (tmp_path / "b").as_uri())
    a, b = files_of(tmp_path / "a"), files_of((tmp_path / "b").as_uri())
    assert set(a) == {MANIFEST, *(f"weights/{p.name}" for p in (tmp_path / "a" / "weights").iterdir())}
    assert a == b
    # ... and both are the fleet they were copied from, member by member.
    manifest = read_manifest((tmp_path / "b").as_uri())
    assert [m["name"] for m in manifest["members"]] == REFS and manifest["refs"] == REFS
    original = {m["name"]: m for m in read_manifest(trained[1].path)["members"]}
    for m in manifest["members"]:
        assert m["sha256"] == original[m["name"]]["sha256"]
        assert m["calibration"]["quantiles"] == pytest.approx(original[m["name"]]["calibration"]["quantiles"])


def test_fleet_from_a_file_uri_scores_like_the_local_path(trained, tmp_path, capsys):
    from simex_ray.cli import main

    publish(trained, tmp_path / "f")
    uri = (tmp_path / "f").as_uri()
    local, remote = Fleet.load(tmp_path / "f"), Fleet.load(uri)
    assert remote.path == uri and local.path == tmp_path / "f"
    x = digits()
    a, b = local.score(x), remote.score(x)
    assert a.to_json() == b.to_json()
    outs = []
    for fleet in (str(tmp_path / "f"), uri):
        assert main(["score", "--fleet", fleet, "--data", "digits", "--samples", "100", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    for out in outs:
        out.pop("fleet"), out.pop("seconds")
    assert outs[0] == outs[1]


def test_in_process_training_to_a_file_uri_resumes_from_its_checkpoints(tmp_path):
    uri = (tmp_path / "F").as_uri()
    plans = lambda epochs: plan_fleet(["digits"], TrainConfig(epochs=epochs), samples=120, seed=0)  # noqa: E731
    seen = []
    train_fleet_local(plans(1), uri, on_epoch=lambda n, m: seen.append(m["epoch"]))
    assert resolve(uri).join("checkpoints", "local").listdir()  # the per-epoch checkpoint, through the URI
    train_fleet_local(plans(2), uri, on_epoch=lambda n, m: seen.append(m["epoch"]))
    assert seen == [1, 2]
    assert [h["epoch"] for h in Fleet.load(uri).members["digits"].history] == [1, 2]


def _interrupt_second_weight_write(monkeypatch):
    """The second weight file's write fails half-way (weights are torch zip archives: 'PK'; so are the latent
    moments written after each, whose archive names their 'precision')."""
    real, weights = storage.write_stream, []

    def write(f, blob):
        if bytes(blob[:2]) == b"PK" and b"precision" not in bytes(blob):
            weights.append(len(blob))
            if len(weights) == 2:
                f.write(memoryview(blob)[:len(blob) // 2])
                raise OSError("disk went away")
        return real(f, blob)

    monkeypatch.setattr(storage, "write_stream", write)


def test_an_interrupted_write_never_publishes_a_manifest_naming_a_missing_weight(trained, where, monkeypatch):
    _interrupt_second_weight_write(monkeypatch)
    with pytest.raises(OSError, match="disk went away"):
        publish(trained, where)
    loc = resolve(where)
    manifest = read_manifest(where)
    assert [m["name"] for m in manifest["members"]] == ["digits"]  # the first member only
    (m,) = manifest["members"]
    assert loc.join(m["weights"]).sha256() == m["sha256"]
    assert loc.join(m["latent"]["file"]).sha256() == m["latent"]["sha256"]
    assert sorted(loc.join("weights").listdir()) == sorted(f.split("/")[1] for f in (m["weights"], m["latent"]["file"]))
    assert Fleet.load(where).names == ["digits"]  # no partial file, no temp file
    # A re-run trains only what is missing, and then the fleet is complete.
    monkeypatch.undo()
    plans = trained[0]
    assert [p.name for p in FleetWriter(where).pending(plans)] == ["bgrand:digits"]
    publish(trained, where, names=["bgrand:digits"])
    assert Fleet.load(where).names == REFS


def test_a_failed_first_weight_leaves_no_manifest(trained, where, monkeypatch):
    def fail(f, blob):
        raise OSError("no space left")

    monkeypatch.setattr(storage, "write_stream", fail)
    with pytest.raises(OSError):
        publish(trained, where)
    assert not resolve(where).join(MANIFEST).exists()
    assert resolve(where).join("weights").listdir() == []
    with pytest.raises(FleetError):
        Fleet.load(where)


def test_a_sha256_mismatch_is_detected_on_every_filesystem(trained, where):
    publish(trained, where)
    loc = resolve(where)
    m = read_manifest(where)["members"][1]
    weights = loc.join(m["weights"])
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes_atomic(bytes(blob))
    with pytest.raises(FleetError, match=f"{weights.name}.*corrupted") as e:
        Fleet.load(where)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in FleetWriter(where).pending(trained[0])] == [m["name"]]  # retrained on a re-run
    weights.remove()
    with pytest.raises(FleetError, match=f"{weights.name}.*missing"):
        Fleet.load(where)


def test_a_missing_or_unreadable_fleet_is_one_clear_line(tmp_path, s3):
    with pytest.raises(FleetError, match="does not exist"):
        Fleet.load((tmp_path / "nope").as_uri())
    with pytest.raises(FleetError, match="s3://bucket/nope does not exist"):
        Fleet.load("s3://bucket/nope")
    resolve("s3://bucket/junk").join(MANIFEST).write_bytes_atomic(b"{not json")
    with pytest.raises(FleetError, match="s3://bucket/junk/manifest.json is corrupted"):
        Fleet.load("s3://bucket/junk")


# --- s3:// against a local moto server -------------------------------------------------------------

def test_s3_fleet_round_trip_scores_like_the_local_one(trained, tmp_path, s3, capsys, fixed_clock):
    from simex_ray.cli import main

    publish(trained, tmp_path / "f")
    publish(trained, "s3://bucket/round-trip")
    assert files_of("s3://bucket/round-trip") == files_of(tmp_path / "f")  # byte for byte
    remote = Fleet.load("s3://bucket/round-trip")
    assert remote.path == "s3://bucket/round-trip"
    x = digits()
    assert remote.score(x).to_json() == Fleet.load(tmp_path / "f").score(x).to_json()
    outs = []
    for fleet in (str(tmp_path / "f"), "s3://bucket/round-trip"):
        assert main(["score", "--fleet", fleet, "--data", "digits", "--samples", "100", "--json",
                     "--per-sample", f"{fleet}/per_sample.parquet"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    for out in outs:
        out.pop("fleet"), out.pop("seconds")
    assert outs[0] == outs[1]
    # The per-sample table went to the bucket too.
    assert files_of("s3://bucket/round-trip")["per_sample.parquet"][:4] == b"PAR1"


def test_simex_train_no_ray_writes_a_fleet_to_s3(s3, capsys):
    from simex_ray.cli import main

    out = "s3://bucket/trained"
    assert main(["train", "--refs", "digits", "--samples", "120", "--epochs", "1", "--no-ray", "--out", out]) == 0
    manifest = read_manifest(out)
    assert [m["name"] for m in manifest["members"]] == ["digits"] and manifest["members"][0]["calibration"]
    assert resolve(out).join("checkpoints", "local").listdir()
    assert Fleet.load(out).score(digits(32)).ranking == ["digits"]


def test_an_s3_reader_never_sees_a_manifest_before_its_weights(trained, s3):
    """A reader polling the bucket while members are published: every manifest it reads lists only
    weights that exist, whole, with the listed sha256."""
    uri = "s3://bucket/watched"
    stop, reads, problems = threading.Event(), [], []

    def watch():
        loc = resolve(uri)  # its own filesystem client, like another node
        while not stop.is_set():
            try:
                if loc.join(MANIFEST).exists():
                    manifest = read_manifest(loc)
                    for m in manifest["members"]:
                        w = loc.join(m["weights"])
                        if not w.is_file() or w.sha256() != m["sha256"]:
                            problems.append(f"{m['name']}: {w} missing or not matching the manifest")
                    reads.append(len(manifest["members"]))
            except Exception as e:  # noqa: BLE001 - a torn manifest would land here
                problems.append(repr(e))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        plans, fleet = trained
        writer = FleetWriter(uri, EXTRA, order=[p.name for p in plans])
        for plan in plans:
            time.sleep(0.1)
            writer.add(plan, fleet.models[plan.name].state_dict(), fleet.members[plan.name].history)
        time.sleep(0.2)
    finally:
        stop.set()
        watcher.join(10)
    assert not problems, problems[:3]
    assert reads and reads[-1] == 2 and sorted(reads) == reads
    assert Fleet.load(uri).names == REFS


def test_object_store_writes_go_through_a_temporary_key_then_the_manifest_last(trained, s3, monkeypatch):
    """The order of what becomes visible under its final name: each weight file, then the manifest."""
    real_move, order = storage.move, []

    def move(fs, src, dst):
        assert src.split("/")[-1].startswith(".") and src.endswith(".tmp")
        real_move(fs, src, dst)
        order.append(dst.split("/", 2)[2])

    monkeypatch.setattr(storage, "move", move)
    publish(trained, "s3://bucket/ordered")
    manifest = read_manifest("s3://bucket/ordered")
    w = [(m["weights"], m["latent"]["file"]) for m in manifest["members"]]
    assert order == [*w[0], MANIFEST, *w[1], MANIFEST]  # weights, latent moments, then the manifest


# --- multi-node clusters: shared storage or a refusal ----------------------------------------------

MOUNTS = """\
overlay / overlay rw,relatime,lowerdir=/l,upperdir=/u,workdir=/w 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
/dev/nvme0n1p1 /home ext4 rw,relatime 0 0
fs-0123.efs.us-east-1.amazonaws.com:/ /mnt/efs nfs4 rw,relatime,vers=4.1 0 0
tmpfs /mnt/efs/scratch tmpfs rw 0 0
10.0.0.5@tcp:/lustre /lustre lustre rw 0 0
bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev 0 0
/dev/sdb1 /mnt/usb fuseblk rw 0 0
server:/export/my\\040share /mnt/my\\040share nfs rw 0 0
ceph-mon:6789:/ /cephfs ceph rw 0 0
"""

MESSAGE = ("--out runs/x is a node-local path but the cluster has 3 nodes; use a path on shared storage "
           "(NFS/EFS mount) or a URI: file:///shared/... if this path is shared, s3://bucket/..., gs://...")


def test_check_shared_refuses_a_node_local_path_on_a_multi_node_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        check_shared("runs/x", 3, mounts=MOUNTS)  # under /tmp: tmpfs
    assert str(e.value) == MESSAGE
    for path in ("/home/me/runs/x", "/mnt/efs/scratch/x", "/mnt/usb/x", "/x", "/mnt/efs2/x"):
        with pytest.raises(ValueError, match="node-local path but the cluster has 2 nodes"):
            check_shared(path, 2, mounts=MOUNTS)
    with pytest.raises(ValueError, match="^--storage /home/x is a node-local"):
        check_shared("/home/x", 2, mounts=MOUNTS, flag="--storage")


@pytest.mark.parametrize("path", ["/mnt/efs/runs/x", "/mnt/efs", "/lustre/a/b", "/mnt/gcs/fleet",
                                  "/mnt/my share/fleet", "/cephfs/f"])
def test_check_shared_accepts_network_filesystems(path):
    check_shared(path, 3, mounts=MOUNTS)


@pytest.mark.parametrize("target", ["file:///home/me/runs/x", "s3://bucket/runs/x", "gs://bucket/runs/x"])
def test_check_shared_accepts_uris_and_single_node_clusters(target, tmp_path):
    check_shared(target, 8, mounts=MOUNTS)  # file:// is the user's word that the path is shared
    check_shared("/home/me/runs/x", 1, mounts=MOUNTS)
    check_shared(tmp_path, 1)  # the real /proc/mounts is never read for one node
    assert storage.mount_fstype("/mnt/efs/scratch/deep", MOUNTS) == "tmpfs"  # the longest mount point wins
    assert storage.mount_fstype("/mnt/efs/deep", MOUNTS) == "nfs4"
    check_shared(resolve("file:///home/me/runs/x"), 8, mounts=MOUNTS)  # a Location keeps the URI's word
    with pytest.raises(ValueError, match="node-local"):
        check_shared(resolve("/home/me/runs/x"), 8, mounts=MOUNTS)


def test_check_shared_reads_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mounts = MOUNTS + f"nfs-server:/vol {tmp_path} nfs4 rw 0 0\n"
    check_shared("runs/x", 4, mounts=mounts)
    check_shared(tmp_path / "runs", 4, mounts=mounts)
    with pytest.raises(ValueError, match="node-local"):
        check_shared("runs/x", 4, mounts=MOUNTS)

"""Weight files named by their content: retraining a fleet in place is atomic for readers.

A retrained member gets a new file; the manifest it replaced keeps its files for one generation, and
a reader further behind re-reads the manifest. Runs on a local path, a file:// URI and (moto) s3://.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
import torch

import simex_ray.fleet.fleet as fleet_mod
from simex_ray import storage
from simex_ray.fleet import (MANIFEST, Fleet, FleetError, Member, StaleWeightsError, read_manifest, save_weights,
                             slug, write_manifest)
from simex_ray.fleet.manifest import member_files, save_moments
from simex_ray.models import create_autoencoder
from simex_ray.storage import resolve
from simex_ray.training import TrainConfig

NAMES = ["digits", "bgrand:digits"]


def weights(seed: int) -> dict[str, torch.Tensor]:
    """A small real LeNet autoencoder's state_dict; each seed different weights."""
    torch.manual_seed(seed)
    return create_autoencoder("lenet").state_dict()


def member(name: str) -> Member:
    return Member(name=name, spec=name, config=TrainConfig(epochs=1).to_dict(), fingerprint="")


def publish(where, seeds: dict[str, int], moments: bool = False) -> list[Member]:
    """Each member's weights (and latent moments), then the manifest listing them all (what FleetWriter does)."""
    members = [save_weights(where, member(name), weights(seed)) for name, seed in seeds.items()]
    for m, seed in zip(members, seeds.values()) if moments else ():
        rng = np.random.default_rng(seed)
        save_moments(where, m, rng.random(84), np.eye(84) * (1 + rng.random()))
    write_manifest(where, members)
    return members


def files_of(members: list[Member]) -> set[str]:
    """The file names under weights/ the records list: weights and latent moments."""
    return {f.split("/")[1] for m in members for f in member_files(m.to_json())}


def weight_files(where) -> list[str]:
    return resolve(where).join("weights").listdir()


def test_names_carry_the_hash_and_identical_weights_reuse_the_file(where, monkeypatch):
    (a, b) = publish(where, {"digits": 1, "bgrand:digits": 2})
    loc = resolve(where)
    for m in (a, b):
        assert m.weights == f"weights/{slug(m.name)}-{m.sha256[:16]}.pt"
        assert loc.join(m.weights).sha256() == m.sha256
    writes = []
    real = storage.write_stream
    monkeypatch.setattr(storage, "write_stream",
                        lambda f, blob: (writes.append(bytes(blob[:2])), real(f, blob))[1])
    again = save_weights(where, member("digits"), weights(1))
    assert (again.weights, again.sha256) == (a.weights, a.sha256) and b"PK" not in writes  # not written again
    other = save_weights(where, member("digits"), weights(3))
    assert other.weights != a.weights and writes.count(b"PK") == 1
    # A file of the right name but the wrong size (damaged) is written again.
    loc.join(a.weights).write_bytes_atomic(b"truncated")
    save_weights(where, member("digits"), weights(1))
    assert loc.join(a.weights).sha256() == a.sha256


def test_retraining_in_place_never_shows_a_reader_an_error(where):
    """Readers poll while the fleet is rewritten member by member: Fleet.load always succeeds with
    published weights, and a weight file a manifest lists is never different bytes."""
    generations = 4 if where.startswith("s3://") else 8
    published: set[str] = set(m.sha256 for m in publish(where, {n: 0 for n in NAMES}))
    stop, problems, loads, checks = threading.Event(), [], [], []

    def load_loop():
        while not stop.is_set():
            try:
                fleet = Fleet.load(where)
                assert fleet.names == NAMES
                unknown = [m.sha256 for m in fleet.members.values() if m.sha256 not in published]
                assert not unknown, f"weights never published: {unknown}"
                loads.append(1)
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                problems.append(f"Fleet.load: {e!r}")

    def sha_loop():
        loc = resolve(where)
        while not stop.is_set():
            try:
                for m in read_manifest(loc)["members"]:
                    w = loc.join(m["weights"])
                    try:
                        blob = w.read_bytes()
                    except FileNotFoundError:
                        continue  # collected: this reader fell behind (Fleet.load re-reads the manifest)
                    if hashlib.sha256(blob).hexdigest() != m["sha256"]:
                        problems.append(f"{w}: bytes differ from the manifest's sha256")
                checks.append(1)
            except Exception as e:  # noqa: BLE001
                problems.append(f"manifest reader: {e!r}")

    readers = [threading.Thread(target=load_loop, daemon=True), threading.Thread(target=sha_loop, daemon=True)]
    for t in readers:
        t.start()
    try:
        current = {n: 0 for n in NAMES}
        members = {m.name: m for m in (member(n) for n in NAMES)}
        for m in read_manifest(where)["members"]:
            members[m["name"]] = Member.from_json(m)
        for gen in range(1, generations + 1):
            for k, name in enumerate(NAMES):  # one manifest per finished member, like FleetWriter
                current[name] = 100 * gen + k
                m = save_weights(where, member(name), weights(current[name]))
                published.add(m.sha256)
                members[name] = m
                write_manifest(where, [members[n] for n in NAMES])
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not problems, problems[:3]
    assert loads and checks
    fleet = Fleet.load(where)
    assert {n: m.sha256 for n, m in fleet.members.items()} == {n: members[n].sha256 for n in NAMES}
    assert len(weight_files(where)) <= 2 * len(NAMES)  # this generation and the one before


def test_a_reader_whose_file_was_collected_reloads_the_current_member(where, monkeypatch):
    """Deterministic: between reading the manifest and the weights, two generations land."""
    first = publish(where, {"digits": 1, "bgrand:digits": 2})
    real, calls = fleet_mod.load_member_model, []

    def load_late(fleet_dir, m, device="cpu"):
        if not calls:
            publish(where, {"digits": 3, "bgrand:digits": 4})
            publish(where, {"digits": 5, "bgrand:digits": 6})
        calls.append(m.sha256)
        return real(fleet_dir, m, device)

    monkeypatch.setattr(fleet_mod, "load_member_model", load_late)
    fleet = Fleet.load(where)
    latest = {m["name"]: m for m in read_manifest(where)["members"]}
    assert {n: m.sha256 for n, m in fleet.members.items()} == {n: latest[n]["sha256"] for n in NAMES}
    # Each member: the collected file its old record lists, then its current record's.
    assert calls == [first[0].sha256, latest["digits"]["sha256"], first[1].sha256, latest["bgrand:digits"]["sha256"]]
    x = torch.rand(4, 1, 28, 28).numpy()
    assert set(fleet.score(x).delta) == set(NAMES)


def test_a_member_removed_while_loading_is_one_clear_line(where, monkeypatch):
    publish(where, {"digits": 1, "bgrand:digits": 2})
    real, calls = fleet_mod.load_member_model, []

    def load_late(fleet_dir, m, device="cpu"):
        if not calls:  # bgrand:digits is dropped, twice over: its file is collected
            for seed in (7, 8):
                publish(where, {"digits": seed})
        calls.append(m.name)
        return real(fleet_dir, m, device)

    monkeypatch.setattr(fleet_mod, "load_member_model", load_late)
    with pytest.raises(FleetError, match="member 'bgrand:digits' is no longer in .*manifest.json") as e:
        Fleet.load(where)
    assert "\n" not in str(e.value)


def test_a_missing_file_the_manifest_still_lists_is_the_usual_error(where):
    (a, _) = publish(where, {"digits": 1, "bgrand:digits": 2})
    resolve(where).join(a.weights).remove()
    with pytest.raises(StaleWeightsError, match=f"{a.weights.split('/')[1]}.*missing"):
        Fleet.load(where)


def test_unreferenced_weights_are_collected_and_nothing_else(where):
    loc = resolve(where)
    first = publish(where, {"digits": 1, "bgrand:digits": 2}, moments=True)
    keep = ["notes.txt", "custom.pt", "backup-deadbeef.pt", ".digits.pt.1234.tmp",
            f"{slug('digits')}-{'0' * 15}.pt"]  # too short a hash: not a name this module writes
    for name in keep:
        loc.join("weights", name).write_bytes_atomic(b"user file")
    loc.join("elsewhere", f"{slug('digits')}-{'0' * 16}.pt").write_bytes_atomic(b"outside weights/")
    second = publish(where, {"digits": 3, "bgrand:digits": 2}, moments=True)  # bgrand:digits unchanged
    assert second[1].weights == first[1].weights and second[1].latent == first[1].latent
    files = set(weight_files(where))
    assert files_of(first + second) <= files  # one generation of grace
    third = publish(where, {"digits": 5, "bgrand:digits": 2}, moments=True)
    files = set(weight_files(where))
    assert not files_of(first[:1]) & files  # listed by neither manifest: collected, weights and moments
    assert files_of(second + third) | set(keep) == files
    assert loc.join("elsewhere", f"{slug('digits')}-{'0' * 16}.pt").is_file()
    # A removed member's file goes too, one generation later.
    write_manifest(where, third[:1])
    assert files_of(third[1:]) <= set(weight_files(where))
    write_manifest(where, third[:1])
    assert set(weight_files(where)) == files_of(third[:1]) | set(keep)
    assert Fleet.load(where).names == ["digits"]


def test_weights_saved_but_not_yet_published_are_kept(where):
    """A member another thread is adding: its weights exist before the manifest that lists them."""
    publish(where, {"digits": 1})
    pending = save_weights(where, member("bgrand:digits"), weights(9))
    for seed in (2, 3, 4):
        publish(where, {"digits": seed})
    assert pending.weights.split("/")[1] in weight_files(where)
    digits = save_weights(where, member("digits"), weights(4))
    write_manifest(where, [digits, pending])
    assert Fleet.load(where).members["bgrand:digits"].sha256 == pending.sha256


def test_nothing_is_collected_when_the_previous_manifest_cannot_be_read(where):
    first = publish(where, {"digits": 1})
    publish(where, {"digits": 2})
    loc = resolve(where)
    manifest = read_manifest(where)
    loc.join(MANIFEST).write_bytes_atomic(json.dumps({**manifest, "format": 99}).encode())
    publish(where, {"digits": 3})
    assert first[0].weights.split("/")[1] in weight_files(where)


def old_style(where, seeds: dict[str, int]) -> None:
    """A fleet as written before content-hashed names: weights/<slug>.pt, written in place."""
    loc = resolve(where)
    records = []
    for name, seed in seeds.items():
        m = save_weights(where, member(name), weights(seed))
        old = f"weights/{slug(name)}.pt"
        loc.join(old).write_bytes_atomic(loc.join(m.weights).read_bytes())
        loc.join(m.weights).remove()
        m.weights = old
        records.append(m.to_json())
    manifest = {"format": 1, "updated": "2025-01-01T00:00:00+0000", "loss": "mse", "members": records}
    loc.join(MANIFEST).write_bytes_atomic(json.dumps(manifest).encode())


def test_an_old_style_fleet_loads_and_is_retrained_in_place(where):
    old_style(where, {"digits": 1, "bgrand:digits": 2})
    assert sorted(weight_files(where)) == sorted(f"{slug(n)}.pt" for n in NAMES)
    fleet = Fleet.load(where)
    assert fleet.names == NAMES and all(m.weights == f"weights/{slug(m.name)}.pt" for m in fleet.members.values())
    # Retrained in place by this version: new names; the old files go once no manifest lists them.
    publish(where, {"digits": 3, "bgrand:digits": 2})
    assert f"{slug('digits')}.pt" in weight_files(where)  # the manifest replaced still listed it
    loc = resolve(where)
    loc.join("weights", "other-deadbeef.pt").write_bytes_atomic(b"not a member of this fleet")
    newest = publish(where, {"digits": 5, "bgrand:digits": 2})
    assert set(weight_files(where)) >= {m.weights.split("/")[1] for m in newest} | {"other-deadbeef.pt"}
    assert not {f"{slug(n)}.pt" for n in NAMES} & set(weight_files(where))
    assert {n: m.sha256 for n, m in Fleet.load(where).members.items()} == {m.name: m.sha256 for m in newest}

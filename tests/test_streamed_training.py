"""Whole references streamed where they train: the same split as read whole, seeded orders, exact resume."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from simex_ray import data
from simex_ray.data.streamed import StreamedReference
from simex_ray.fleet.latent import LATENT_SAMPLES
from simex_ray.fleet import Fleet
from simex_ray.fleet.build import train_fleet_local
from simex_ray.fleet.manifest import Member
from simex_ray.fleet.plan import plan_fleet
from simex_ray.formats import LEGACY
from simex_ray.training import TrainConfig, train_member_streamed


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The UCI digits (1,797) as an uncompressed npz and as Parquet in row groups of 256."""
    root = tmp_path_factory.mktemp("streamed")
    x = (data.load("digits").x[:, 0] * 255).round().astype(np.uint8)  # (N, 28, 28)
    np.savez(root / "digits.npz", x=x)
    table = pa.table({"pixels": [r.tolist() for r in x.reshape(len(x), -1)]})
    pq.write_table(table, root / "digits.parquet", row_group_size=256)
    return {"npz": f"npz:{root / 'digits.npz'}", "parquet": f"parquet:{root / 'digits.parquet'}"}


@pytest.mark.parametrize("kind", ["npz", "parquet"])
def test_the_streamed_split_is_the_split_of_the_reference_read_whole(files, kind):
    spec = files[kind]
    ref = StreamedReference.plan(spec, LEGACY, seed=3, block=300)
    assert len(ref.slices) > 1  # really read in pieces
    train, test = data.prepare(spec, samples=None, seed=3)
    assert ref.counts() == (len(train), len(test))
    np.testing.assert_array_equal(np.concatenate(list(ref.test_blocks())), test.x)
    batches = list(ref.train_batches(epoch=1, batch_size=16, order_seed=0, buffer=500))
    assert all(len(b) == 16 for b in batches[:-1])
    seen = np.concatenate(batches)
    # every training row exactly once: the same images as the whole read, in another order
    key = lambda a: np.sort(a.reshape(len(a), -1).astype(np.float64) @ np.arange(784.0))  # noqa: E731
    np.testing.assert_allclose(key(seen), key(train.x))


def test_orders_are_seeded_per_epoch(files):
    ref = StreamedReference.plan(files["npz"], LEGACY, seed=0, block=300)

    def first(epoch, seed=0):
        return next(iter(ref.train_batches(epoch, 16, order_seed=seed, buffer=500)))

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))
    assert not np.array_equal(first(1), first(1, seed=1))


def test_a_streamed_member_resumed_after_an_epoch_follows_the_uninterrupted_run(files):
    ref = StreamedReference.plan(files["npz"], LEGACY, seed=0, block=400)
    config = TrainConfig(epochs=2, batch_size=64)
    saved = {}

    def keep(epoch, metrics, state):
        if epoch == 1:
            buf = io.BytesIO()
            torch.save(state, buf)
            saved["state"] = buf.getvalue()

    whole, h1 = train_member_streamed(ref, config, on_epoch=keep)
    resumed, h2 = train_member_streamed(ref, config, resume=torch.load(io.BytesIO(saved["state"]), weights_only=True))
    assert [h["test_delta"] for h in h1] == [h["test_delta"] for h in h2]
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert h1[0]["ref_mean_l2"] == pytest.approx(
        float(np.linalg.norm(data.prepare(files["npz"], samples=None)[0].x.reshape(-1, 784), axis=1).mean()))


def test_a_streamed_fleet_records_its_split_counts_and_a_metadata_fingerprint(files, tmp_path):
    spec = files["parquet"]
    config = TrainConfig(epochs=1, batch_size=64)
    assert plan_fleet([spec], config)[0].stream is None  # small: read whole here, by default
    plan, = plan_fleet([spec], config, stream="always")
    train, test = data.prepare(spec, samples=None)
    assert plan.stream is not None and plan.x_train is None
    assert (plan.member.n_train, plan.member.n_test, plan.member.split) == (len(train), len(test), "row-hash")
    train_fleet_local([plan], tmp_path / "F")
    member = Fleet.load(tmp_path / "F").members[spec]
    assert member.split == "row-hash" and member.calibration["n"] == len(test)
    # latent moments from a seeded subset of the streamed training split, read where the member is written
    assert member.latent["n_fit"] == min(len(train), LATENT_SAMPLES) and member.latent["n"] == len(test)
    x = plan.train_sample(cap=7)
    assert x.shape == (7, *train.x.shape[1:]) and np.array_equal(x, plan.train_sample(cap=7))  # seeded
    assert {r.tobytes() for r in x} <= {r.tobytes() for r in train.x}  # training images, never held-out ones
    assert member.metrics["ref_mean_l2"] == pytest.approx(plan_fleet([spec], config)[0].member.metrics["ref_mean_l2"])
    # the fingerprint changes with the file (here its modification time), so a re-run retrains
    path = spec.split(":", 1)[1]
    os.utime(path, (1, 1))
    assert plan_fleet([spec], config, stream="always")[0].member.fingerprint != plan.member.fingerprint


def test_a_manifest_record_from_before_the_split_rule_reads_as_stratified():
    old = {"name": "digits", "spec": "digits", "config": TrainConfig().to_dict(), "fingerprint": "x"}
    assert Member.from_json(old).split == "stratified"
    assert Member.from_json({**old, "split": "row-hash"}).split == "row-hash"


def test_samples_and_per_class_parts_keep_the_stratified_split(files):
    config = TrainConfig(epochs=1)
    assert {p.member.split for p in plan_fleet(["digits"], config, samples=120)} == {"stratified"}
    assert {p.member.split for p in plan_fleet(["digits"], config, samples=40, per_class=True)} == {"stratified"}
    assert plan_fleet(["digits"], config)[0].member.split == "row-hash"

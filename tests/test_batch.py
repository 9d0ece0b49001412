"""Batch scoring: slices read anywhere (Ray-free), and Ray Data scoring equal to `simex score` in one process."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from simex_ray import data
from simex_ray.fleet import Fleet

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _parquet_dir(path, x_uint8, y, files=2, row_group=70, encoded=True):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    per = -(-len(x_uint8) // files)
    for k in range(files):
        sl = slice(k * per, (k + 1) * per)
        if encoded:
            cells = []
            for img in x_uint8[sl]:
                b = io.BytesIO()
                Image.fromarray(img).save(b, format="PNG")
                cells.append(b.getvalue())
            table = pa.table({"image": cells, "label": y[sl]})
        else:
            table = pa.table({"pixels": [r.ravel().tolist() for r in x_uint8[sl]], "label": y[sl]})
        pq.write_table(table, path / f"part-{k:02d}.parquet", row_group_size=row_group)
    return f"parquet:{path}"


@pytest.fixture(scope="module")
def unknown(tmp_path_factory):
    """300 rotated digits as uint8, as a two-file Parquet dataset (PNG cells) and as an uncompressed npz."""
    root = tmp_path_factory.mktemp("unknown")
    ds = data.load("rotated:digits")
    x = np.round(ds.x[:300, 0] * 255).astype(np.uint8)
    y = ds.y[:300]
    np.savez(root / "u.npz", x=x, y=y)
    return {"parquet": _parquet_dir(root / "pq", x, y), "npz": f"npz:{root / 'u.npz'}", "x": x, "y": y,
            "root": root}


def test_slices_cover_the_data_in_order_and_read_as_load(unknown, tmp_path):
    slices = data.plan_slices(unknown["parquet"])
    assert [s.start for s in slices] == [0, 70, 140, 150, 220, 290]  # row groups of 70 in two files of 150
    assert sum(s.n for s in slices) == 300
    parts = [data.read_slice(s) for s in slices]
    np.testing.assert_array_equal(np.concatenate([i for i, _, _ in parts]), np.arange(300))
    np.testing.assert_array_equal(np.concatenate([x for _, x, _ in parts]), data.load(unknown["npz"]).x)
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in parts]), unknown["y"])
    # a Parquet directory loads whole in-process too, equal to the same images in an npz
    np.testing.assert_array_equal(data.load(unknown["parquet"]).x, data.load(unknown["npz"]).x)
    npz = data.plan_slices(unknown["npz"], block=128)
    assert [(s.start, s.n) for s in npz] == [(0, 128), (128, 128), (256, 44)]
    x = np.concatenate([data.read_slice(s)[1] for s in npz])
    np.testing.assert_array_equal(x, data.load(unknown["npz"], fmt=None).x)
    assert data.plan_slices("rotated:digits") is None and data.plan_slices(unknown["npz"] + "#3") is None
    pixels = _parquet_dir(tmp_path / "px", unknown["x"][:50], unknown["y"][:50], files=1, encoded=False)
    np.testing.assert_array_equal(data.read_slice(data.plan_slices(pixels)[0])[1], data.load(unknown["npz"]).x[:50])


def test_slices_read_from_s3(unknown, s3):
    import pyarrow.fs as pafs

    with open(sorted((unknown["root"] / "pq").iterdir())[0], "rb") as f:
        blob = f.read()
    with s3.open_output_stream("bucket/unknown/part-00.parquet") as out:
        out.write(blob)
    assert s3.get_file_info("bucket/unknown/part-00.parquet").type == pafs.FileType.File
    slices = data.plan_slices("parquet:s3://bucket/unknown")
    assert all(s.source.startswith("s3://bucket/unknown/") for s in slices)
    x = np.concatenate([data.read_slice(s)[1] for s in slices])
    np.testing.assert_array_equal(x, data.load(unknown["npz"]).x[:150])
    # in one process too: the same URI loads whole
    np.testing.assert_array_equal(data.load("parquet:s3://bucket/unknown").x, x)


def test_npz_from_s3_is_sliced_with_ranged_reads_and_loads_in_process(unknown, s3, tmp_path):
    local = data.load(unknown["npz"], fmt=None)
    with s3.open_output_stream("bucket/u.npz") as out:
        out.write((unknown["root"] / "u.npz").read_bytes())
    slices = data.plan_slices("npz:s3://bucket/u.npz", block=128)
    assert [(s.kind, s.start, s.n, s.source) for s in slices] == [
        ("npy", 0, 128, "s3://bucket/u.npz"), ("npy", 128, 128, "s3://bucket/u.npz"), ("npy", 256, 44, "s3://bucket/u.npz")]
    parts = [data.read_slice(s) for s in slices]
    np.testing.assert_array_equal(np.concatenate([x for _, x, _ in parts]), local.x)
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in parts]), unknown["y"])
    # streamed in one process (what `simex score` without --address does with an uncompressed npz)
    stream = data.stream("npz:s3://bucket/u.npz")
    np.testing.assert_array_equal(np.concatenate(list(stream.blocks(100))), data.load(unknown["npz"]).x)
    np.testing.assert_array_equal(data.load("npz:s3://bucket/u.npz").x, data.load(unknown["npz"]).x)
    # a compressed npz cannot be sliced: it is fetched (within the data cap) and loaded whole
    np.savez_compressed(tmp_path / "c.npz", x=unknown["x"], y=unknown["y"])
    with s3.open_output_stream("bucket/c.npz") as out:
        out.write((tmp_path / "c.npz").read_bytes())
    assert data.plan_slices("npz:s3://bucket/c.npz") is None
    both = data.load("npz:s3://bucket/c.npz")
    np.testing.assert_array_equal(both.x, data.load(unknown["npz"]).x)
    np.testing.assert_array_equal(both.y, unknown["y"])
    # what cannot be read is said in one line
    with pytest.raises(data.SpecError, match="does not exist"):
        data.load("npz:s3://bucket/nothing.npz")
    with pytest.raises(data.SpecError, match="local directory"):
        data.load("folder:s3://bucket/images")


@pytest.mark.ray
def test_ray_data_scoring_equals_in_process_sharded_and_writes_per_sample_parquet(ray_cluster, tiny_fleet,
                                                                                  unknown, tmp_path):
    from simex_ray.distributed.batch import BatchSettings, score_batch

    fleet = Fleet.load(tiny_fleet)
    here = fleet.score(data.load(unknown["npz"]).x, per_sample=True)
    for spec, settings in ((unknown["parquet"], BatchSettings(actors=1, cpus_per_actor=0.5, batch_size=64)),
                           (unknown["npz"], BatchSettings(actors=2, cpus_per_actor=0.25, batch_size=100, block=128,
                                                          members_per_shard=1))):
        out = score_batch(str(tiny_fleet), spec, settings=settings, per_sample=str(tmp_path / "rows" / spec[:3]))
        got = out["result"]
        assert got.n == 300 and got.ranking == here.ranking and out["conversion"] is None
        assert got.method == here.method == "typicality_latent"  # z from the scoring actors, merged exactly
        for key in ("delta", "delta_normalized", "delta_calibrated", "in_distribution", "composition",
                    "latent_calibrated", "typicality_latent"):
            for name, v in getattr(here, key).items():
                assert getattr(got, key)[name] == pytest.approx(v, rel=1e-6, abs=1e-9), (spec, key)
        rows = pd.read_parquet(out["per_sample"]).sort_values("index").reset_index(drop=True)
        assert rows["index"].tolist() == list(range(300)) and rows["label"].tolist() == unknown["y"].tolist()
        for k, name in enumerate(fleet.names):
            np.testing.assert_allclose(rows[f"delta/{name}"], here.per_sample[k], rtol=1e-5, atol=1e-7)
        assert (rows["nearest"] == pd.Series(here.nearest)).mean() > 0.99  # ties at float rounding may differ
    assert out["shards"] == 2
    # a spec that cannot be sliced in place is read on the driver, in the fleet's format
    out = score_batch(str(tiny_fleet), "rotated:digits", settings=BatchSettings(actors=1, cpus_per_actor=0.5),
                      split="test", samples=120)
    _, test = data.prepare("rotated:digits", samples=120)
    assert out["result"].delta == pytest.approx(fleet.score(test.x).delta, rel=1e-6)


@pytest.mark.ray
def test_cli_score_and_matrix_with_address_match_in_process(ray_cluster, tiny_fleet, unknown):
    def simex(*args):
        proc = subprocess.run([sys.executable, "-m", "simex_ray.cli", *args], capture_output=True, text=True,
                              timeout=600, env=ray_cluster.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    here = json.loads(simex("score", "--fleet", str(tiny_fleet), "--data", unknown["npz"], "--json").stdout)
    there = json.loads(simex("score", "--fleet", str(tiny_fleet), "--data", unknown["parquet"], "--json",
                             "--address", ray_cluster.address, "--cpus-per-actor", "0.5").stdout)
    assert there["ranking"] == here["ranking"] and there["n"] == 300 and there["ray_data"]["slices"] == 6
    assert there["delta"] == pytest.approx(here["delta"], rel=1e-6)
    m = json.loads(simex("matrix", "--fleet", str(tiny_fleet), "--data", f"{unknown['npz']},digits", "--json",
                         "--split", "all", "--address", ray_cluster.address, "--cpus-per-actor", "0.5").stdout)
    assert m["delta"][0] == pytest.approx([here["delta"][n] for n in m["references"]], rel=1e-6)

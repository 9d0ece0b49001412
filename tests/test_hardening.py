"""Inputs bounded and state never trusted: each test failed on the code before its fix."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from simex_ray import data, storage
from simex_ray.data import SpecError
from simex_ray.models import create_autoencoder
from simex_ray.scoring import PLANS_KEPT, ScoringEngine


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _paths_table(path: str):
    col = pa.array([{"bytes": None, "path": path}], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table({"image": col})


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_parquet_image_paths_must_stay_inside_the_dataset(tmp_path, kind):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(_png(200))
    root = tmp_path / "dataset"
    root.mkdir()
    if kind == "absolute":
        path = str(secret)
    elif kind == "dotdot":
        path = "../outside/secret.png"
    else:
        (root / "link.png").symlink_to(secret)
        path = "link.png"
    pq.write_table(_paths_table(path), root / "rows.parquet")
    with pytest.raises(SpecError, match="outside the dataset's directory"):
        data.load(f"parquet:{root / 'rows.parquet'}")


def test_parquet_image_paths_inside_the_dataset_are_read(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(255))
    pq.write_table(_paths_table("img/a.png"), tmp_path / "rows.parquet")
    ds = data.load(f"parquet:{tmp_path / 'rows.parquet'}")
    assert ds.x.shape == (1, 1, 28, 28) and float(ds.x.max()) == 1.0


class _Growing:
    """A filesystem whose object is a different size at every look: a read that always tears."""

    def __init__(self, fs, path):
        self.fs, self.path, self.calls = fs, path, 0

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def get_file_info(self, path):
        self.calls += 1
        info = self.fs.get_file_info(path)
        return type("Info", (), {"size": info.size + self.calls})()


def test_a_read_torn_every_time_raises_instead_of_returning_the_bytes(tmp_path):
    import pyarrow.fs as pafs

    (tmp_path / "m.json").write_bytes(b"{}")
    loc = storage.resolve(str(tmp_path / "m.json"))
    torn = storage.Location(_Growing(pafs.LocalFileSystem(), loc.path), loc.path, loc.display)  # not local
    with pytest.raises(storage.TornReadError, match="changed while it was read"):
        torn.read_bytes()


def test_the_engine_keeps_a_bounded_number_of_fused_plans():
    torch.manual_seed(0)
    models = {f"m{k}": create_autoencoder("lenet") for k in range(4)}
    engine = ScoringEngine(models, {n: "mse" for n in models})
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    subsets = [[a, b] for a in models for b in models if a != b]  # 12 > PLANS_KEPT subsets
    assert len(subsets) > PLANS_KEPT
    for names in subsets:
        engine.per_sample(x, names)
    assert len(engine._groups) == PLANS_KEPT
    # the most recent plans are kept and still answer like the naive path
    naive = ScoringEngine(models, {n: "mse" for n in models}, fused=False)
    np.testing.assert_allclose(engine.per_sample(x, subsets[-1]), naive.per_sample(x, subsets[-1]), rtol=1e-5)


# --------------------------------------------------------------------------- processes identified before signalled

def _sleeper(*args: str):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


def test_a_node_is_its_own_processes_not_a_namesake_or_a_log_reader(tmp_path):
    from simex_ray.local_cluster import Node, node_pids

    one, ten = tmp_path / "worker1", tmp_path / "worker10"
    procs = {"mine": _sleeper(f"--temp-dir={one}"), "option": _sleeper("--session_dir", str(one / "session_x")),
             "worker10": _sleeper(f"--temp-dir={ten}"), "tail": _sleeper("-f", str(one / "logs" / "raylet.out"))}
    try:
        found = node_pids(Node("worker1", one, []))
        assert {n for n, p in procs.items() if p.pid in found} == {"mine", "option"}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


@pytest.mark.parametrize("kind", ["foreign", "old-style foreign", "reused pid"])
def test_serve_stop_never_signals_a_process_that_is_not_the_service(tmp_path, monkeypatch, capsys, kind):
    from simex_ray.cli.main import main
    from simex_ray.processes import ProcessRecord, start_ticks

    monkeypatch.setenv("SIMEX_DATA", str(tmp_path))
    other = _sleeper("serve", "start") if kind == "reused pid" else _sleeper()
    try:
        record = {"foreign": ProcessRecord(other.pid, start_ticks(other.pid)), "old-style foreign": other.pid,
                  "reused pid": ProcessRecord(other.pid, start_ticks(other.pid) - 1)}[kind]
        pidfile = tmp_path / "serve-8123.pid"
        pidfile.write_text(record.to_text() if isinstance(record, ProcessRecord) else str(record))
        assert main(["serve", "stop", "--port", "8123"]) == 1
        assert "signalled nothing" in capsys.readouterr().err
        assert other.poll() is None  # still running: no signal was sent
        assert not pidfile.exists()  # the stale file is gone
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------- every source under one cap

def _pixels_parquet(path, n):
    x = np.random.default_rng(0).integers(0, 255, (n, 784), dtype=np.uint8)
    pq.write_table(pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 784)}), path)


@pytest.mark.parametrize("kind", ["parquet file", "parquet directory", "parquet image bytes", "folder"])
def test_parquet_and_folder_reads_stop_at_the_data_cap_naming_it(tmp_path, monkeypatch, kind):
    if kind == "parquet file":
        _pixels_parquet(tmp_path / "a.parquet", 2000)  # 1.6 MB of pixels, 6 MB as float32
        spec = f"parquet:{tmp_path / 'a.parquet'}"
    elif kind == "parquet directory":
        (tmp_path / "d").mkdir()
        for k in range(3):
            _pixels_parquet(tmp_path / "d" / f"{k}.parquet", 1000)
        spec = f"parquet:{tmp_path / 'd'}"
    elif kind == "parquet image bytes":  # small PNGs that decode to much more
        pq.write_table(pa.table({"image": [_png(k % 256) for k in range(2000)]}), tmp_path / "png.parquet")
        spec = f"parquet:{tmp_path / 'png.parquet'}"
    else:
        for c in ("a", "b"):
            (tmp_path / "f" / c).mkdir(parents=True)
            for k in range(400):
                (tmp_path / "f" / c / f"{k}.png").write_bytes(_png(k % 256))
        spec = f"folder:{tmp_path / 'f'}"
    assert len(data.load(spec)) > 0  # under the default cap it loads
    monkeypatch.setenv("SIMEX_MAX_DATA_BYTES", "1M")
    with pytest.raises(SpecError, match="take more than the SIMEX_MAX_DATA_BYTES cap of 1 MiB") as e:
        data.load(spec)
    assert "\n" not in str(e.value)
    # small encoded images are stopped while they decode, before the whole table or folder is built
    assert ("decoded images" in str(e.value)) == (kind in ("parquet image bytes", "folder"))


# --------------------------------------------------------------------------- requests bounded before they are built

def _json_body(n: int) -> bytes:
    return json.dumps({"images": np.zeros((n, 28, 28), np.uint8).tolist()}).encode()


def test_an_oversized_json_body_is_refused_before_it_is_parsed(monkeypatch):
    from simex_ray import api

    limits = api.Limits(max_images=10)

    def no_parse(*a, **k):
        raise AssertionError("json.loads was called on an oversized body")

    big = _json_body(200)  # 156,800 numbers: more than 10 images' worth plus the slack for other fields
    monkeypatch.setattr(api.json, "loads", no_parse)
    with pytest.raises(api.ApiError) as e:
        api.parse_score_request(big, "application/json", limits)
    assert e.value.status == 413 and "more numbers than 10 images of 1x28x28" in str(e.value)


def test_a_json_body_at_the_limit_is_parsed_and_one_over_it_refused_by_the_image_count():
    from simex_ray import api

    limits = api.Limits(max_images=10)
    x, _, _ = api.parse_score_request(_json_body(10), "application/json", limits)
    assert x.shape == (10, 1, 28, 28)
    with pytest.raises(api.ApiError) as e:  # within the comma slack: parsed, then counted
        api.parse_score_request(_json_body(11), "application/json", limits)
    assert e.value.status == 413


# --------------------------------------------------------------------------- errors tell the truth

@pytest.mark.parametrize("error,status,says", [
    (ValueError("operands could not be broadcast together"), 1, "internal error (a bug in simex-ray"),
    (KeyError("weight"), 1, "internal error (a bug in simex-ray"),
    (SpecError("unknown dataset 'mnst'; did you mean 'mnist'"), 2, "error: unknown dataset 'mnst'"),
    (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
])
def test_only_the_products_own_errors_are_usage_errors(capsys, error, status, says):
    from simex_ray.cli.common import run_cli

    def fails():
        raise error

    assert run_cli(fails, "simex x") == status
    err = capsys.readouterr().err
    assert says in err and "\n" not in err.strip()
    assert ("--debug" in err) == (status == 1 and "internal" in says)


def test_an_unknown_member_is_a_usage_error_and_still_a_key_error():
    from simex_ray.errors import UnknownMemberError, UserError

    torch.manual_seed(0)
    engine = ScoringEngine({"a": create_autoencoder("lenet")}, {"a": "mse"})
    with pytest.raises(UnknownMemberError, match="unknown member.s. b; fleet has: a") as e:
        engine.per_sample(np.zeros((1, 1, 28, 28), np.float32), ["b"])
    assert isinstance(e.value, UserError) and isinstance(e.value, KeyError)

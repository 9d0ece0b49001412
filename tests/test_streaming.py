"""`simex score` streams an uncompressed npz block by block: the same answer as loading it whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simex_ray import data
from simex_ray.cli import main


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = (data.load("digits").x[:700, 0] * 255).astype(np.uint8)
    x[::7] = rng.integers(0, 256, x[::7].shape, dtype=np.uint8)  # some noise images
    y = np.arange(700) % 10
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    np.save(tmp_path / "bare.npy", x)
    return tmp_path


def test_stream_blocks_equal_the_whole_load(files):
    for name in ("plain.npz", "bare.npy"):
        st = data.stream(f"npz:{files / name}")
        assert st is not None and len(st) == 700
        np.testing.assert_array_equal(np.concatenate(list(st.blocks(128))), data.load(f"npz:{files / name}").x)
    assert data.stream(f"npz:{files / 'plain.npz'}").y.tolist() == (np.arange(700) % 10).tolist()
    # compressed, a variant or a class selector: not streamable, loaded whole instead
    for spec in (f"npz:{files / 'packed.npz'}", f"rotated:npz:{files / 'plain.npz'}", f"npz:{files / 'plain.npz'}#3"):
        assert data.stream(spec) is None


def test_a_truncated_stream_is_a_one_line_error(files, capsys, tiny_fleet):
    raw = (files / "plain.npz").read_bytes()
    st = data.stream(f"npz:{files / 'plain.npz'}")
    cut = files / "cut.npz"
    cut.write_bytes(raw[: st.offset + 300 * 784])  # the zip directory is gone too
    assert main(["score", "--fleet", str(tiny_fleet), "--data", f"npz:{cut}"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_score_streams_and_matches_the_compressed_file(files, tiny_fleet, capsys):
    out = {}
    for name in ("plain.npz", "packed.npz"):
        assert main(["score", "--fleet", str(tiny_fleet), "--data", f"npz:{files / name}", "--json",
                     "--per-sample", str(files / f"{name}.parquet")]) == 0
        out[name] = json.loads(capsys.readouterr().out)
    a, b = out["plain.npz"], out["packed.npz"]
    assert a["n"] == b["n"] == 700
    for key in ("delta", "delta_calibrated", "composition"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    import pandas as pd

    pa, pb = (pd.read_parquet(files / f"{n}.parquet") for n in ("plain.npz", "packed.npz"))
    assert pa["label"].tolist() == pb["label"].tolist() == (np.arange(700) % 10).tolist()

"""The one results writer: JSON, Parquet and PNG, each whole or not at all (Ray-free)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from simex_ray import storage
from simex_ray.plots import pyplot
from simex_ray.results import write_figure, write_json, write_table


def test_each_kind_round_trips_into_a_new_folder(tmp_path):
    out = tmp_path / "new" / "study"
    assert json.loads(write_json(out / "r.json", {"a": [1, 2]}).read_text()) == {"a": [1, 2]}
    table = pd.read_parquet(write_table(out / "r.parquet", [{"x": 1, "y": "a"}, {"x": 2, "y": "b"}]))
    assert table.to_dict("list") == {"x": [1, 2], "y": ["a", "b"]}
    fig = pyplot().figure()
    assert write_figure(out / "r.png", fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pyplot().close(fig)


def test_an_interrupted_write_leaves_the_previous_result_whole(tmp_path, monkeypatch):
    path = write_json(tmp_path / "r.json", {"run": 1})

    def fail(f, data):
        f.write(data[:3])
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_stream", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"run": 2, "padding": "x" * 1000})
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left

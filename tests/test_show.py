"""Seeing why (the paper's Fig. 1a): unknown images and their reconstructions by the top references,
each labelled with the engine's own per-sample δ; grey 1x28x28 (lenet) and colour 3x32x32 (mlp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.fleet import Fleet, Member
from simex_ray.fleet.show import (draw_reconstructions, reconstruction_grid, sample_images, show_matrix, show_path,
                                  show_reconstructions)
from simex_ray.formats import ImageFormat
from simex_ray.losses import per_sample_delta
from simex_ray.models import create_autoencoder

COLOUR = ImageFormat(3, 32, 32)


@pytest.fixture(scope="module")
def grey(tiny_fleet):
    """The trained 1x28x28 lenet fleet (digits, bgrand:digits) and 120 held-out rotated digits."""
    _, test = data.prepare("rotated:digits", samples=720, seed=0)
    return Fleet.load(tiny_fleet), test.x


@pytest.fixture(scope="module")
def colour():
    """Three untrained 3x32x32 mlp members (seeds 0..2) and 50 tinted digits in 3x32x32."""
    members, models = {}, {}
    for s in range(3):
        name = f"ref{s}"
        members[name] = Member(name=name, spec=name, fingerprint="f",
                               config={"loss": "mse", "architecture": "mlp", "image_format": str(COLOUR)})
        torch.manual_seed(s)
        models[name] = create_autoencoder("mlp", COLOUR).eval()
    _, test = data.prepare("digits", samples=300, seed=0, fmt=COLOUR)
    tint = np.array([1.0, 0.6, 0.2], np.float32)[None, :, None, None]
    return Fleet(members, models), test.x * tint


def read_png(path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)  # (height, width, RGBA) floats


def png_size(path) -> tuple[int, int, int]:
    return read_png(path).shape


def row_of(result, name: str) -> int:
    return list(result.delta).index(name)  # per_sample rows follow the scored members' order


@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_grey_labels_are_the_engines_per_sample_delta(grey, loss):
    fleet, x = grey
    result = fleet.score(x, loss=loss, per_sample=True)
    grid = reconstruction_grid(fleet, x, result, k=6, top=3, seed=1)
    assert grid.references == result.ranking  # two members: top 3 shows both, most similar first
    assert grid.inputs.shape == (6, 1, 28, 28) and grid.reconstructions.shape == (2, 6, 1, 28, 28)
    np.testing.assert_array_equal(grid.inputs, x[grid.index])
    expected = np.stack([result.per_sample[row_of(result, n), grid.index] for n in grid.references])
    np.testing.assert_allclose(grid.delta, expected, rtol=1e-5, atol=1e-7)
    labels = grid.cell_labels()
    assert [[float(t.removeprefix("δ=")) for t in row] for row in labels] == pytest.approx(expected, rel=1e-3)
    # the label belongs to the image drawn: δ of the drawn reconstruction is the label's
    for r, name in enumerate(grid.references):
        drawn = per_sample_delta(torch.from_numpy(grid.inputs), torch.from_numpy(grid.reconstructions[r]), loss)
        np.testing.assert_allclose(drawn.numpy(), grid.delta[r], rtol=1e-4, atol=1e-6)
    assert grid.dataset_delta.tolist() == [result.delta[n] for n in grid.references]


def test_colour_labels_are_the_engines_per_sample_delta(colour):
    fleet, x = colour
    result = fleet.score(x, per_sample=True)
    grid = reconstruction_grid(fleet, x, result, k=5, top=2, seed=0)
    assert grid.references == result.ranking[:2]
    assert grid.inputs.shape == (5, 3, 32, 32) and grid.reconstructions.shape == (2, 5, 3, 32, 32)
    expected = np.stack([result.per_sample[row_of(result, n), grid.index] for n in grid.references])
    np.testing.assert_allclose(grid.delta, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        own = fleet.models[grid.references[0]](torch.from_numpy(grid.inputs)).numpy()
    np.testing.assert_allclose(grid.reconstructions[0], own, rtol=1e-6, atol=1e-6)


def test_the_references_follow_the_ranking_in_use(grey):
    fleet, x = grey
    for method in ("raw", "calibrated", "in_distribution", "typicality"):
        result = fleet.score(x, method=method)
        grid = reconstruction_grid(fleet, x, result, k=2, top=1)
        assert grid.references == result.ranking[:1] and grid.method == result.method
        if result.method != "raw":
            assert result.method in grid.row_labels()[1]


def test_grey_png_is_written_at_a_sane_size(grey, tmp_path):
    fleet, x = grey
    result = fleet.score(x)
    path = show_reconstructions(fleet, x, result, tmp_path / "sub" / "show.png", k=8, top=3)
    assert path == tmp_path / "sub" / "show.png" and path.stat().st_size > 5000
    h, w, _ = png_size(path)
    assert 700 <= w <= 2000 and 250 <= h <= 1000  # 8 columns, 3 rows (inputs + 2 references)


def test_colour_png_is_drawn_in_colour(colour, tmp_path):
    fleet, x = colour
    result = fleet.score(x)
    grid = reconstruction_grid(fleet, x, result, k=4, top=3)
    path = draw_reconstructions(grid, tmp_path / "colour.png", title="tinted digits")
    h, w, _ = png_size(path)
    assert 500 <= w <= 1500 and 350 <= h <= 1200  # 4 columns, 4 rows
    img = read_png(path)
    assert np.abs(img[..., 0] - img[..., 2]).max() > 0.3  # red and blue differ somewhere: RGB, not grey


def test_a_streamed_unknown_samples_the_same_images_as_an_array(grey):
    _, x = grey
    index, images = sample_images(x, 7, seed=3)
    assert len(index) == 7 and (np.diff(index) > 0).all()
    blocks = (x[s:s + 17] for s in range(0, len(x), 17))
    s_index, s_images = sample_images(blocks, 7, seed=3)
    np.testing.assert_array_equal(s_index, index)
    np.testing.assert_array_equal(s_images, images)
    assert not np.array_equal(sample_images(x, 7, seed=4)[0], index)
    assert len(sample_images(x[:3], 8)[0]) == 3  # fewer images than k: all of them


def test_show_matrix_writes_one_png_per_unknown(grey, tmp_path):
    fleet, x = grey
    _, own = data.prepare("digits", samples=300, seed=0)
    given = fleet.score(own.x)
    paths = show_matrix(fleet, {"rotated:digits": x, "digits": own.x}, tmp_path / "show", results={"digits": given},
                        k=4, top=2)
    assert list(paths) == ["rotated:digits", "digits"]
    assert paths["digits"] == show_path(tmp_path / "show", "digits") and paths["digits"].name.startswith("digits-")
    assert paths["rotated:digits"].name.startswith("rotated_digits-")
    assert all(p.is_file() and png_size(p)[1] > 300 for p in paths.values())

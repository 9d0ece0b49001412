"""Image formats: the value, the one conversion rule, native reading, and where a fleet records and checks it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simex_ray import data
from simex_ray.fleet import Fleet
from simex_ray.fleet.build import build_fleet_local
from simex_ray.fleet.plan import conversions, resolve_format
from simex_ray.formats import LEGACY, FormatError, ImageFormat, conversion, convert
from simex_ray.models import create_autoencoder, default_architecture
from simex_ray.training import TrainConfig


def test_image_format_parses_prints_and_refuses_in_one_line():
    f = ImageFormat.parse(" 3 X 32×64 ")
    assert (f.channels, f.height, f.width, str(f), f.pixels) == (3, 32, 64, "3x32x64", 3 * 32 * 64)
    assert ImageFormat.parse(f) is f and LEGACY == ImageFormat(1, 28, 28)
    for bad in ("32x32", "3x32", "rgb", "2x32x32", "3x0x32", "3x32x4096"):
        with pytest.raises(FormatError) as e:
            ImageFormat.parse(bad)
        assert "\n" not in str(e.value)


def test_the_rule_luminance_replication_area_and_bilinear():
    rng = np.random.default_rng(0)
    rgb = rng.random((2, 3, 8, 8), dtype=np.float32)
    grey = convert(rgb, ImageFormat(1, 8, 8))
    np.testing.assert_allclose(grey[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], atol=1e-6)
    back = convert(grey, ImageFormat(3, 8, 8))
    assert back.shape == (2, 3, 8, 8) and all(np.array_equal(back[:, c], grey[:, 0]) for c in range(3))
    # shrinking by 2 is the mean of each 2x2 block (area)
    half = convert(rgb, ImageFormat(3, 4, 4))
    np.testing.assert_allclose(half, rgb.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5)), atol=1e-6)
    # growing is bilinear with half-pixel centres, as torch's align_corners=False
    torch = pytest.importorskip("torch")
    grown = convert(rgb, ImageFormat(3, 16, 12))
    ref = torch.nn.functional.interpolate(torch.from_numpy(rgb), size=(16, 12), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(grown, ref.numpy(), atol=1e-5)
    assert convert(rgb, ImageFormat(3, 8, 8)) is rgb  # nothing to do: the same array
    assert conversion(ImageFormat(3, 64, 64), LEGACY) == (
        "3x64x64 -> 1x28x28: RGB -> luminance, height 64 -> 28 (area), width 64 -> 28 (area)")
    assert conversion(LEGACY, LEGACY) is None


def test_strict_refuses_any_conversion_in_one_line():
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(FormatError) as e:
        convert(x, LEGACY, strict=True, name="npz:x.npz")
    msg = str(e.value)
    assert "\n" not in msg and "3x32x32" in msg and "1x28x28" in msg and "--strict-format" in msg


def test_sources_read_natively_and_load_converts(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = (rng.random((6, 20, 24, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "c.npz", x=nhwc, y=np.arange(6) % 2)
    spec = f"npz:{tmp_path / 'c.npz'}"
    native = data.load(spec, fmt=None)
    assert native.format == ImageFormat(3, 20, 24)
    np.testing.assert_allclose(native.x, np.moveaxis(nhwc, -1, 1) / 255.0, atol=1e-7)
    assert data.native_format(spec) == ImageFormat(3, 20, 24)
    assert data.load(spec).format == LEGACY  # the default stays the paper's format
    assert data.load(spec, fmt=ImageFormat(3, 32, 32)).x.shape == (6, 3, 32, 32)
    with pytest.raises(data.SpecError, match="strict-format"):
        data.load(spec, fmt=LEGACY, strict=True)
    # RGBA composites over black; grey + alpha stays grey
    rgba = np.concatenate([np.full((1, 4, 4, 3), 200, np.uint8), np.full((1, 4, 4, 1), 51, np.uint8)], -1)
    out = data.to_unit_images(rgba, fmt=None)
    assert out.shape == (1, 3, 4, 4) and np.allclose(out, 200 / 255 * 51 / 255)
    assert data.to_unit_images(rgba[..., [0, 3]], fmt=None).shape == (1, 1, 4, 4)


def test_architectures_follow_the_format():
    assert default_architecture(LEGACY) == "lenet" and default_architecture("3x32x32") == "conv"
    with pytest.raises(FormatError) as e:
        create_autoencoder("lenet", "3x32x32")
    assert "\n" not in str(e.value) and "--arch conv" in str(e.value)
    torch = pytest.importorskip("torch")
    m = create_autoencoder("mlp", "3x16x12")
    assert m(torch.rand(2, 3, 16, 12)).shape == (2, 3, 16, 12)


def test_config_records_a_format_and_legacy_records_stay_as_they_were():
    legacy = TrainConfig()
    assert "image_format" not in legacy.to_dict()  # a 28x28 manifest is byte-for-byte what it was
    assert TrainConfig.from_dict(legacy.to_dict()).format == LEGACY
    colour = TrainConfig(architecture="mlp", image_format="3X32X32")
    assert colour.to_dict()["image_format"] == "3x32x32"
    with pytest.raises(ValueError, match="lenet"):
        TrainConfig(architecture="lenet", image_format="3x32x32")


def _colour_npz(path, n=60, size=16, seed=0, tint=(1.0, 0.3, 0.2)):
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 1)) * np.asarray(tint)
    np.savez(path, x=(x * 255).astype(np.uint8), y=np.arange(n) % 3)
    return f"npz:{path}"


def test_resolve_format_auto_and_mixed_references(tmp_path):
    a, b = _colour_npz(tmp_path / "a.npz"), _colour_npz(tmp_path / "b.npz", seed=1)
    assert resolve_format([a, b]) == ImageFormat(3, 16, 16)
    assert resolve_format([a, "digits"], "1x28x28") == LEGACY
    with pytest.raises(FormatError) as e:
        resolve_format([a, "digits"])
    assert "\n" not in str(e.value) and "1x28x28: digits" in str(e.value) and "3x16x16" in str(e.value)
    assert set(conversions([a, "digits"], LEGACY)) == {a}


def test_a_colour_fleet_records_its_format_and_legacy_fleets_read_as_28(tmp_path):
    a, b = _colour_npz(tmp_path / "a.npz"), _colour_npz(tmp_path / "b.npz", seed=1, tint=(0.1, 0.5, 1.0))
    cfg = TrainConfig(architecture="mlp", epochs=1, image_format="3x16x16")
    build_fleet_local([a, b], tmp_path / "F", cfg)
    fleet = Fleet.load(tmp_path / "F")
    assert fleet.image_format == ImageFormat(3, 16, 16)
    manifest = json.loads((tmp_path / "F" / "manifest.json").read_text())
    assert {m["config"]["image_format"] for m in manifest["members"]} == {"3x16x16"}
    assert fleet.score(data.load(a, fmt=fleet.image_format).x).n == 60
    build_fleet_local(["digits"], tmp_path / "L", TrainConfig(epochs=1), samples=60)
    legacy = json.loads((tmp_path / "L" / "manifest.json").read_text())
    assert "image_format" not in legacy["members"][0]["config"]
    assert Fleet.load(tmp_path / "L").image_format == LEGACY


def test_cli_refuses_mixed_references_converts_on_score_and_strict_refuses(tmp_path, monkeypatch, simex_here):
    """In this process (`simex train` and `score` run as processes in tests/test_cli.py), from ``tmp_path``."""
    a = _colour_npz(tmp_path / "a.npz")
    monkeypatch.chdir(tmp_path)
    r = simex_here("train", "--refs", f"{a},digits", "--out", "F", "--no-ray", "--epochs", "1", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--image-format" in r.stderr
    r = simex_here("train", "--refs", "digits,rotated:digits", "--out", "F", "--no-ray", "--epochs", "1",
                   "--samples", "60", check=False)
    assert r.returncode == 0, r.stderr
    assert "image format 1x28x28 (the references' native format), architecture lenet" in r.stderr
    r = simex_here("score", "--fleet", "F", "--data", a, "--json", check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["image_format"] == "1x28x28" and out["conversion"].startswith("3x16x16 -> 1x28x28: RGB -> luminance")
    r = simex_here("score", "--fleet", "F", "--data", a, "--strict-format", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "3x16x16" in r.stderr

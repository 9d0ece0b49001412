"""The scoring API at every image format: arrays in the fleet's format as they are, image files converted by
the one rule, and a 422 naming the expected shapes otherwise. The request rules without Ray, then one colour
fleet on a real local Ray Serve through real HTTP."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import requests

from simex_ray.api import JSON, MULTIPART, NPY, ApiError, Limits, expected_shapes, parse_score_request
from simex_ray.client import encode_files
from simex_ray.data import decode_image
from simex_ray.formats import LEGACY, ImageFormat, conversion, convert

COLOUR = ImageFormat(3, 32, 32)


def png(a: np.ndarray, kind: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=kind)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def parse(body: bytes, content_type: str, fmt: ImageFormat, **kw):
    return parse_score_request(body, content_type, kw.pop("limits", Limits()), fmt, **kw)


def refusal(body: bytes, content_type: str, fmt: ImageFormat, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, content_type, fmt, **kw)
    assert "\n" not in e.value.message
    return e.value


def some_files(rng) -> list[tuple[str, bytes]]:
    """A colour PNG in 3x32x32 already, a grey 28x28 PNG, an RGBA 64x40 PNG and a colour JPEG of 20x24."""
    return [("rgb.png", png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))),
            ("grey.png", png(rng.integers(0, 256, (28, 28), dtype=np.uint8))),
            ("rgba.png", png(rng.integers(0, 256, (64, 40, 4), dtype=np.uint8))),
            ("photo.jpg", png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "JPEG"))]


@pytest.mark.parametrize("fmt", [COLOUR, LEGACY, ImageFormat(1, 16, 24)], ids=str)
def test_arrays_in_the_fleets_format_are_taken_as_they_are(fmt):
    """(N,C,H,W), (N,H,W,C) and, for grey, (N,H,W): the same images, never resampled, as JSON and .npy."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (3, *fmt.shape))  # (N, C, H, W)
    nhwc = u8.transpose(0, 2, 3, 1)
    layouts = [u8, nhwc] + ([u8[:, 0]] if fmt.channels == 1 else [])
    for a in layouts:
        for body, kind in ((json.dumps({"images": a.tolist()}).encode(), JSON), (npy(a.astype(np.uint8)), NPY)):
            x, members, converted = parse(body, kind, fmt)
            assert converted is None  # arrays come in the fleet's format or are refused
            assert x.dtype == np.float32 and x.shape == (3, *fmt.shape) and members is None
            np.testing.assert_array_equal(x, (u8 / np.float32(255)).astype(np.float32))
    unit = rng.random((2, *fmt.shape))
    x, _, _ = parse(npy(unit.transpose(0, 2, 3, 1)), NPY, fmt)
    np.testing.assert_array_equal(x, unit.astype(np.float32))


@pytest.mark.parametrize("fmt, shape", [(COLOUR, (2, 28, 28)), (COLOUR, (2, 1, 32, 32)), (COLOUR, (2, 32, 32)),
                                        (COLOUR, (2, 3, 28, 28)), (COLOUR, (2, 3072)), (LEGACY, (2, 32, 32)),
                                        (LEGACY, (2, 3, 28, 28)), (LEGACY, (2, 784))], ids=str)
def test_an_array_of_another_shape_is_a_422_naming_the_expected_shapes(fmt, shape):
    for body, kind in ((json.dumps({"images": np.zeros(shape).tolist()}).encode(), JSON),
                       (npy(np.zeros(shape, np.float32)), NPY)):
        e = refusal(body, kind, fmt)
        assert e.status == 422 and expected_shapes(fmt) in e.message and str(shape) in e.message
        assert str(fmt) in e.message and MULTIPART in e.message  # the way to have images converted
    assert expected_shapes(COLOUR) == "(N,3,32,32) or (N,32,32,3)"
    assert expected_shapes(LEGACY) == "(N,1,28,28), (N,28,28,1) or (N,28,28)"


def test_image_files_are_decoded_and_converted_by_the_rule():
    rng = np.random.default_rng(1)
    files = some_files(rng)
    body, kind = encode_files(files, members=["a", "b"])
    assert kind.startswith(MULTIPART)
    x, members, converted = parse(body, kind, COLOUR)
    assert members == ["a", "b"] and x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    # the answer's envelope says what the rule did, per kind of file, in file order (rgb.png is 3x32x32 already)
    assert converted == "; ".join(f"{conversion(ImageFormat.parse(f), COLOUR)} (1 of 4 files)"
                                  for f in ("1x28x28", "3x64x40", "3x20x24"))
    # each file as decode_image reads it, then the one conversion rule: what `simex score` does with a folder
    expected = np.concatenate([convert(decode_image(content, name), COLOUR) for name, content in files])
    np.testing.assert_array_equal(x, expected)
    # a file already in the fleet's format is not converted: its pixels / 255, exactly
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(files[0][1]))).transpose(2, 0, 1) / np.float32(255)
    np.testing.assert_array_equal(x[0], pixels.astype(np.float32))
    grey, _, _ = parse(body, kind, LEGACY)  # the same files for a 1x28x28 fleet: luminance, resized
    assert grey.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(grey[1], decode_image(files[1][1], "g")[0])


def test_image_files_refused_in_one_line():
    rng = np.random.default_rng(2)
    files = some_files(rng)
    body, kind = encode_files(files)
    strict = refusal(body, kind, COLOUR, strict=True)  # ?strict_format=true
    assert strict.status == 422 and "grey.png" in strict.message and "1x28x28" in strict.message \
        and "3x32x32" in strict.message
    ok, _, converted = parse(*encode_files(files[:1]), COLOUR, strict=True)
    assert converted is None  # already in the format: accepted
    assert ok.shape == (1, 3, 32, 32)
    assert refusal(body, kind, COLOUR, limits=Limits(max_images=3)).status == 413
    assert refusal(body, kind, COLOUR, limits=Limits(max_body_bytes=len(body) - 1)).status == 413
    big = png(np.zeros((5000, 5000), np.uint8))  # ~25 kB that would decode to 25 million pixels
    e = refusal(*encode_files([("big.png", big)]), COLOUR)
    assert e.status == 413 and "5000x5000" in e.message
    e = refusal(*encode_files([("notes.txt", b"not an image")]), COLOUR)
    assert e.status == 422 and "notes.txt" in e.message and "decode" in e.message
    form = requests.Request("POST", "http://x", files={"members": (None, "a")}).prepare()  # text fields only
    e = refusal(form.body, form.headers["content-type"], COLOUR)
    assert e.status == 422 and "no image files" in e.message
    assert refusal(body[:-20], kind, COLOUR).status == 400  # cut before the closing boundary
    assert refusal(body, MULTIPART, COLOUR).status == 400  # no boundary
    assert refusal(b"\x00garbage", kind, COLOUR).status == 400
    assert refusal(b"1,2", "text/csv", COLOUR).status == 415


def test_a_service_has_one_format_and_its_library_takes_it():
    from types import SimpleNamespace

    from simex_ray.distributed.serving.app import check_library, served_format
    from simex_ray.fleet import FleetError

    grey = {"name": "a", "spec": "a", "fingerprint": "0", "config": {}}  # from before formats: 1x28x28
    colour = {"name": "b", "spec": "b", "fingerprint": "0", "config": {"image_format": "3x32x32"}}
    assert served_format([grey]) == LEGACY and served_format([colour, dict(colour, name="c")]) == COLOUR
    with pytest.raises(FleetError, match="mixes image formats.*1x28x28: a; 3x32x32: b"):
        served_format([grey, colour])
    formats = {"lenet-a": LEGACY, "lenet-b": COLOUR}
    library = SimpleNamespace(names=list(formats), image_format=formats.get)
    with pytest.raises(FleetError, match=r"lenet-b \(3x32x32\).*fleet \(1x28x28\).*--image-format 1x28x28"):
        check_library(library, LEGACY)
    check_library(SimpleNamespace(names=["lenet-b"], image_format=formats.get), COLOUR)


# --------------------------------------------------------------------------- a colour fleet on Ray Serve


@pytest.fixture(scope="module")
def colour_service(ray_cluster, tmp_path_factory):
    """Two colour references (red- and blue-tinted noise, 32x32 RGB) as a 3x32x32 mlp fleet, served on a
    local Ray Serve of its own port."""
    from ray import serve

    from simex_ray.distributed.serving.deploy import ServeSettings, deploy, undeploy
    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig
    from tests.conftest import free_port

    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        x = (rng.random((60, 32, 32, 3)) * 80).astype(np.uint8)
        x[..., channel] += 150
        np.savez(root / f"{name}.npz", x=x, y=np.arange(60) % 2)
    refs = [f"npz:{root / 'red.npz'}", f"npz:{root / 'blue.npz'}"]
    config = TrainConfig(architecture="mlp", image_format=str(COLOUR), epochs=1)
    train_fleet_local(plan_fleet(refs, config, seed=0), root / "fleet")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(root / "fleet", ServeSettings(cpus_per_replica=0.1, limits=Limits(max_images=64, max_body_bytes=4 << 20)))

    class Service:
        url = f"http://127.0.0.1:{port}"
        fleet = root / "fleet"
        data = root

    yield Service()
    undeploy()
    serve.shutdown()


def assert_same(answer: dict, expected) -> None:
    assert answer["ranking"] == expected.ranking and answer["n"] == expected.n
    for name, d in expected.delta.items():
        assert answer["delta"][name] == pytest.approx(d, rel=1e-5, abs=1e-7), name


@pytest.mark.ray
def test_a_colour_fleet_over_http(colour_service):
    """JSON NCHW and NHWC, .npy, and PNG uploads answer as Fleet.score in process on the same (decoded)
    images; a wrong shape is a 422 naming the expected ones; /v1/members and the OpenAPI text name the
    format; `simex query` sends --data converted to it, and --files as they are."""
    from simex_ray import data
    from simex_ray.fleet import Fleet

    url, fleet = colour_service.url, Fleet.load(colour_service.fleet)
    assert fleet.image_format == COLOUR
    x = data.load(f"npz:{colour_service.data / 'red.npz'}", fmt=COLOUR).x[:12]  # (12, 3, 32, 32)
    expected = fleet.score(x)
    score = url + "/v1/score"
    for r in (requests.post(score, json={"images": x.tolist()}, timeout=60),
              requests.post(score, json={"images": x.transpose(0, 2, 3, 1).tolist()}, timeout=60),
              requests.post(score, data=npy(x), headers={"content-type": NPY}, timeout=60)):
        assert r.status_code == 200, r.text
        assert_same(r.json(), expected)

    rng = np.random.default_rng(3)
    files = some_files(rng)
    body, kind = encode_files(files)
    r = requests.post(score, data=body, headers={"content-type": kind}, timeout=60)
    assert r.status_code == 200, r.text
    decoded = np.concatenate([decode_image(content, name, fmt=COLOUR) for name, content in files])
    assert_same(r.json(), fleet.score(decoded))
    strict = requests.post(score, data=body, headers={"content-type": kind}, params={"strict_format": "true"},
                           timeout=60)
    assert strict.status_code == 422 and "3x32x32" in strict.json()["error"]

    wrong = requests.post(score, json={"images": np.zeros((2, 28, 28)).tolist()}, timeout=60)
    assert wrong.status_code == 422 and "(N,3,32,32) or (N,32,32,3)" in wrong.json()["error"]

    members = requests.get(url + "/v1/members", timeout=30).json()
    assert members["image_format"] == "3x32x32"
    assert {m["image_format"] for m in members["members"]} == {"3x32x32"}
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    body_text = json.dumps(spec["paths"]["/v1/score"]["post"]["requestBody"])
    assert "(N,3,32,32) or (N,32,32,3)" in body_text and MULTIPART in body_text and "28" not in body_text
    assert requests.get(url + "/docs", timeout=30).status_code == 200

    paths = []
    for name, content in files:
        (colour_service.data / name).write_bytes(content)
        paths.append(str(colour_service.data / name))
    cli = [sys.executable, "-m", "simex_ray.cli", "query", "--url", url, "--json"]
    red = f"npz:{colour_service.data / 'red.npz'}"
    runs = [(subprocess.run(cli + ["--data", red, "--batch", "25"], capture_output=True, text=True, timeout=300),
             fleet.score(data.load(red, fmt=COLOUR).x)),
            (subprocess.run(cli + ["--files", *paths, "--batch", "3"], capture_output=True, text=True, timeout=300),
             fleet.score(decoded))]
    for proc, want in runs:
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["image_format"] == "3x32x32"
        assert_same(out, want)


def test_one_rule_names_a_fleets_format_and_loss():
    from simex_ray.fleet.manifest import Member, common_format, common_loss
    from simex_ray.fleet import FleetError

    def member(name, fmt, loss):
        return Member(name=name, spec=name, config={"loss": loss, "image_format": fmt}, fingerprint="")

    same = [member("a", "3x32x32", "mse"), member("b", "3x32x32", "mse")]
    assert common_format(same) == COLOUR and common_loss(same) == "mse"
    assert common_format([]) == LEGACY
    mixed = [member("a", "1x28x28", "mse"), member("b", "3x32x32", "issim")]
    assert common_loss(mixed) == "mixed"
    with pytest.raises(FleetError, match=r"mixes image formats \(1x28x28: a; 3x32x32: b\); do this"):
        common_format(mixed, "do this")

"""Colour data: the colour built-ins read from their on-disk layout, the colour variants, photos, and
colour images of several sizes through folder:/parquet: (native kept, converted by the rule, mixed
sizes brought to the most common format). Every built-in is tested offline on tiny fixtures written
in exactly the published file format under a temporary data dir."""

from __future__ import annotations

import io
import logging
import os
import pickle
import socket

import numpy as np
import pytest

from simex_ray import data as D
from simex_ray.data import safe_io, variants
from simex_ray.data.sources import photos as photo_src
from simex_ray.data.spec import variant
from simex_ray.formats import LEGACY, ImageFormat, convert, luminance

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the published files are protocol-2 pickles


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch pickled as the published files are: by Python 2 (protocol 2), keys and the array's
    bytes as ``str`` (BINSTRING), numpy's names as ``numpy.core.multiarray``."""
    P = pickle

    def s(b: bytes) -> bytes:
        return P.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256 else P.BINSTRING + len(b).to_bytes(4, "little") + b

    def i(v: int) -> bytes:
        return P.BININT + v.to_bytes(4, "little", signed=True)

    n, m = data.shape
    dtype = P.GLOBAL + b"numpy\ndtype\n" + s(b"u1") + i(0) + i(1) + P.TUPLE3 + P.REDUCE
    dtype += P.MARK + i(3) + s(b"|") + P.NONE * 3 + i(-1) + i(-1) + i(0) + P.TUPLE + P.BUILD
    array = (P.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + P.GLOBAL + b"numpy\nndarray\n"
             + i(0) + P.TUPLE1 + s(b"b") + P.TUPLE3 + P.REDUCE
             + P.MARK + i(1) + i(n) + i(m) + P.TUPLE2 + dtype + P.NEWFALSE + s(data.tobytes()) + P.TUPLE + P.BUILD)
    lab = P.EMPTY_LIST + P.MARK + b"".join(i(v) for v in labels) + P.APPENDS
    return (P.PROTO + b"\x02" + P.EMPTY_DICT + P.MARK + s(b"data") + array + s(b"labels") + lab
            + s(b"batch_label") + s(b"training batch 1 of 5") + P.SETITEMS + P.STOP)


def _u8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A data dir holding tiny cifar10 / cifar100 / svhn / stl10 in their published on-disk layouts,
    and the arrays written, in the order the built-in reads them."""
    import scipy.io

    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("simex-data")
    want: dict = {"dir": d}

    # CIFAR-10: five train batches and a test batch, dicts with bytes keys (the first with Python 2's
    # str keys), rows R|G|B planes.
    rows, labels = [], []
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        data, lab = _u8(rng, n, 3072), [int(v) for v in rng.integers(0, 10, n)]
        _dump(d / "cifar-10-batches-py" / name, {b"batch_label": name.encode(), b"labels": lab, b"data": data,
                                                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]})
        if name == "data_batch_1":  # one written as Python 2 wrote them
            (d / "cifar-10-batches-py" / name).write_bytes(_py2_batch(data, lab))
        rows.append(data)
        labels += lab
    _dump(d / "cifar-10-batches-py" / "batches.meta",
          {b"num_cases_per_batch": 2, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    want["cifar10"] = (np.concatenate(rows), np.asarray(labels))

    # CIFAR-100: one train and one test file; str keys, as Python 2's pickles read under latin-1.
    rows, labels = [], []
    for name, n in (("train", 4), ("test", 2)):
        data, fine = _u8(rng, n, 3072), [int(v) for v in rng.integers(0, 100, n)]
        _dump(d / "cifar-100-python" / name, {"filenames": ["x"] * n, "batch_label": name, "fine_labels": fine,
                                              "coarse_labels": [v // 5 for v in fine], "data": data})
        rows.append(data)
        labels += fine
    _dump(d / "cifar-100-python" / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                            "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    want["cifar100"] = (np.concatenate(rows), np.asarray(labels))

    # SVHN: MATLAB files X (32, 32, 3, N), y (N, 1) in 1..10 where 10 is the digit 0.
    xs, ys = [], []
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        X = _u8(rng, 32, 32, 3, n)
        y = np.array([[10], [1], [9], [10], [3]][:n], dtype=np.uint8)
        scipy.io.savemat(d / name, {"X": X, "y": y})
        xs.append(X)
        ys.append(y)
    want["svhn"] = (np.concatenate(xs, axis=3), np.concatenate(ys)[:, 0])

    # STL-10: raw uint8, each image's planes stored column-major; labels 1..10; class names a line each.
    imgs, labs = [], []
    stl = d / "stl10_binary"
    stl.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        img, lab = _u8(rng, n, 3, 96, 96), rng.integers(1, 11, n).astype(np.uint8)
        (stl / f"{split}_X.bin").write_bytes(img.transpose(0, 1, 3, 2).tobytes())
        (stl / f"{split}_y.bin").write_bytes(lab.tobytes())
        imgs.append(img)
        labs.append(lab)
    (stl / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                    "monkey", "ship", "truck"]) + "\n")
    want["stl10"] = (np.concatenate(imgs), np.concatenate(labs))
    return want


# --------------------------------------------------------------------------- colour built-ins


def test_cifar10_reads_the_published_layout(root: dict) -> None:
    rows, labels = root["cifar10"]
    ds = D.load("cifar10", data_dir=root["dir"], fmt=None)
    assert ds.x.shape == (13, 3, 32, 32) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x, rows.reshape(-1, 3, 32, 32) / np.float32(255))  # R, G, B planes
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.classes == tuple(CIFAR10_NAMES) and ds.spec == "cifar10"
    assert D.native_format("cifar10", data_dir=root["dir"]) == ImageFormat(3, 32, 32)
    cats = D.load("cifar10#cat", data_dir=root["dir"], fmt=None)
    assert len(cats) == int((labels == 3).sum()) and (cats.y == 3).all()


def test_cifar100_fine_labels_and_str_keys(root: dict) -> None:
    rows, labels = root["cifar100"]
    ds = D.load("cifar100", data_dir=root["dir"], fmt=None)
    np.testing.assert_array_equal(ds.x, rows.reshape(-1, 3, 32, 32) / np.float32(255))
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.classes is not None and len(ds.classes) == 100 and ds.classes[7] == "fine7"


def test_svhn_reads_mat_files_and_maps_10_to_0(root: dict) -> None:
    X, y = root["svhn"]
    ds = D.load("svhn", data_dir=root["dir"], fmt=None)
    assert ds.x.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(ds.x, X.transpose(3, 2, 0, 1) / np.float32(255))  # x[n, c, h, w] = X[h, w, c, n]
    np.testing.assert_array_equal(ds.y, np.where(y == 10, 0, y))
    assert ds.classes is None


def test_stl10_reads_column_major_binaries(root: dict) -> None:
    imgs, labs = root["stl10"]
    ds = D.load("stl10", data_dir=root["dir"], fmt=None)
    assert ds.x.shape == (5, 3, 96, 96)
    np.testing.assert_array_equal(ds.x, imgs / np.float32(255))
    np.testing.assert_array_equal(ds.y, labs.astype(np.int64) - 1)
    assert ds.classes is not None and ds.classes[7] == "monkey"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_colour_builtins_convert_by_the_rule(root: dict, name: str) -> None:
    native = D.load(name, data_dir=root["dir"], fmt=None)
    legacy = D.load(name, data_dir=root["dir"])  # the default format: old callers unchanged
    np.testing.assert_array_equal(legacy.x, convert(native.x, LEGACY))
    with pytest.raises(D.SpecError, match="strict-format"):
        D.load(name, data_dir=root["dir"], fmt=LEGACY, strict=True)


@pytest.mark.parametrize("name,how", [("cifar10", "cifar-10-batches-py/"), ("cifar100", "cifar-100-python/"),
                                      ("svhn", "train_32x32.mat"), ("stl10", "stl10_binary/")])
def test_offline_is_one_line_saying_how_to_get_it(name: str, how: str, tmp_path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(D.DataUnavailable) as e:
        D.load(name, data_dir=tmp_path / "empty")
    msg = str(e.value)
    assert "\n" not in msg and f"'{name}'" in msg and how in msg and "SIMEX_DATA" in msg and "photos" in msg


def test_cifar_pickle_that_runs_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = {b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)}
    base = tmp_path / "cifar-10-batches-py"
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        _dump(base / name, good)
    _dump(base / "batches.meta", {b"label_names": [b"a"]})
    _dump(base / "data_batch_3", {b"labels": [0], b"data": Evil()})
    with pytest.raises(D.SpecError) as e:
        D.load("cifar10", data_dir=tmp_path)
    assert "refuses to unpickle" in str(e.value) and "data_batch_3" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    _dump(base / "data_batch_3", [np.zeros((1, 3072), np.uint8)])  # a list, not a CIFAR dict
    with pytest.raises(D.SpecError, match="not a CIFAR dict"):
        D.load("cifar10", data_dir=tmp_path)


def test_records_are_opt_in(tmp_path) -> None:
    # pkl: (MNIST pickles) still refuses dicts and strings; only the CIFAR reader asks for records.
    _dump(tmp_path / "d.pkl", {b"data": np.zeros((2, 4), np.uint8), b"names": [b"a", "b"]})
    with pytest.raises(safe_io.Refused, match="dict"):
        safe_io.load_pickle(tmp_path / "d.pkl")
    rec = safe_io.load_pickle(tmp_path / "d.pkl", records=True)
    assert rec[b"names"] == [b"a", "b"] and rec[b"data"].shape == (2, 4)
    shared = [np.zeros(1 << 16, np.uint8)] * 64  # 4 MiB through shared references
    _dump(tmp_path / "big.pkl", {b"data": [shared] * 64})
    with pytest.raises(safe_io.Refused, match="expand"):
        safe_io.load_pickle(tmp_path / "big.pkl", cap=64 << 20, records=True)


# --------------------------------------------------------------------------- photos


def test_photos_is_a_fixed_natural_colour_domain() -> None:
    a = D.load("photos", fmt=None)
    assert a.x.shape == (photo_src.PHOTOS_N, 3, photo_src.PHOTOS_SIDE, photo_src.PHOTOS_SIDE)
    assert a.x.dtype == np.float32 and a.x.min() >= 0 and a.x.max() <= 1
    b = D.load("photos", fmt=None, seed=7)  # a built-in, not a variant: the data seed does not change it
    np.testing.assert_array_equal(a.x, b.x)
    names = tuple(n for n, _ in photo_src.sample_photos(True))
    assert a.classes == names and names[:2] == ("china", "flower")
    assert set(np.unique(a.y)) == set(range(len(names)))  # every photo contributes
    assert (luminance(a.x).std(axis=(1, 2, 3)) >= photo_src.PHOTOS_MIN_STD).all()  # no flat patches
    assert np.abs(a.x[:, 0] - a.x[:, 1]).mean() > 0.02  # colour, not grey in three channels
    china = D.load("photos#china", fmt=None)
    assert (china.y == 0).all() and len(china) == int((a.y == 0).sum())


def test_photo_patches_are_crops_of_the_photos() -> None:
    rng = np.random.default_rng(3)
    levels = [L for _, L in photo_src.photo_pyramid(True, True, (1.0,))]
    patches, which = photo_src.random_patches(levels, 4, 9, 11, rng)
    for p, i in zip(patches, which):
        assert _find(p, levels[i]), "patch is not a crop of its photo"


def _find(patch: np.ndarray, photo: np.ndarray, atol: float = 0.0) -> bool:
    """Whether ``patch`` (C, h, w) occurs in ``photo`` (C, H, W) (exactly, or within ``atol``)."""
    c, h, w = patch.shape
    corner = np.abs(photo[:, : photo.shape[1] - h + 1, : photo.shape[2] - w + 1] - patch[:, :1, :1]) <= atol
    ys, xs = np.nonzero(corner.all(axis=0))
    return any(np.abs(photo[:, y : y + h, x : x + w] - patch).max() <= atol for y, x in zip(ys, xs))


# --------------------------------------------------------------------------- variants


def test_hue_rgb_known_answers() -> None:
    rgb = variants.hue_rgb(np.array([0.0, 1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6]))
    np.testing.assert_allclose(rgb, [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], atol=1e-6)
    any_hue = variants.hue_rgb(np.random.default_rng(0).random(1000))
    assert (any_hue.max(axis=1) == 1).all()  # full value: the brightest channel keeps the grey level


def test_colour_tints_the_grey_image() -> None:
    base = D.load("digits", fmt=None)
    col = D.load("colour:digits", fmt=None)
    assert col.x.shape == (1797, 3, 28, 28) and col.x.dtype == np.float32
    np.testing.assert_array_equal(col.x.max(axis=1), base.x[:, 0])  # grey * rgb(hue), max channel 1
    ink = base.x[:, 0] > 0.5
    ratios = np.stack([(col.x[:, c] * ink).sum((1, 2)) / (base.x[:, 0] * ink).sum((1, 2)) for c in range(3)], 1)
    assert len(np.unique(ratios.round(3), axis=0)) > 1000  # a hue per image
    np.testing.assert_array_equal(col.y, base.y)
    np.testing.assert_array_equal(col.x, D.load("colour:digits", fmt=None).x)
    assert not np.array_equal(col.x, D.load("colour:digits", fmt=None, seed=1).x)
    assert D.load("colour:digits").x.shape == (1797, 1, 28, 28)  # default format: converted back to grey


@pytest.mark.parametrize("name", ["colour", "mnistm"])
def test_colour_variants_of_a_colour_image_use_its_luminance(root: dict, name: str) -> None:
    native = D.load("cifar10", data_dir=root["dir"], fmt=None)
    apply = variant(name).apply
    a = apply(native.x, np.random.default_rng(2))
    np.testing.assert_array_equal(a, apply(luminance(native.x), np.random.default_rng(2)))
    ds = D.load(f"{name}:cifar10", data_dir=root["dir"], fmt=None)
    assert ds.x.shape == native.x.shape and ds.classes == native.classes


@pytest.mark.parametrize("fill", [0, 255])
def test_mnistm_is_photo_minus_digit(fill: int, tmp_path) -> None:
    # A blank image gives the photo crop itself, a full one its negative: |patch - grey| per channel,
    # the patch an exact crop of a photo at full resolution, like Ganin & Lempitsky's BSDS500 crops.
    np.savez(tmp_path / "flat.npz", x=np.full((6, 20, 24), fill, np.uint8))
    out = D.load(f"mnistm:npz:{tmp_path}/flat.npz", fmt=None).x
    assert out.shape == (6, 3, 20, 24)
    patches, atol = (out, 0.0) if fill == 0 else (1 - out, 1e-6)  # 1 - (1 - p) is p up to rounding
    photos = [np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
              for _, img in photo_src.sample_photos(True)]
    for p in patches:
        assert any(_find(p, ph, atol) for ph in photos)


def test_mnistm_of_digits() -> None:
    base = D.load("digits", fmt=None)
    m = D.load("mnistm:digits", fmt=None)
    assert m.x.shape == (1797, 3, 28, 28) and 0 <= m.x.min() and m.x.max() <= 1
    empty = np.broadcast_to(base.x == 0, m.x.shape)
    assert m.x[empty].mean() > 0.1  # the photo fills the background
    assert np.abs(m.x[:, 0] - m.x[:, 2]).mean() > 0.02  # in colour
    np.testing.assert_array_equal(m.x, D.load("mnistm:digits", fmt=None).x)
    assert not np.array_equal(m.x, D.load("mnistm:digits", fmt=None, seed=1).x)


def test_rotation_turns_all_channels_alike() -> None:
    grey = D.load("digits", fmt=None).x[:200]
    rgb = np.repeat(grey, 3, axis=1) * np.array([1.0, 0.5, 0.25], np.float32)[:, None, None]
    r1 = variants.rotate(grey, np.random.default_rng(5))
    r3 = variants.rotate(rgb, np.random.default_rng(5))
    np.testing.assert_array_equal(r3[:, 0], r1[:, 0])  # the same angle and taps for every channel
    np.testing.assert_allclose(r3[:, 2], r1[:, 0] * 0.25, atol=1e-6)


@pytest.mark.parametrize("spec", ["rotated", "bgimage", "bgrand", "colour", "mnistm"])
@pytest.mark.parametrize("shape", [(1, 20, 24), (3, 40, 48), (3, 96, 96)])
def test_variants_take_any_format(spec: str, shape: tuple[int, int, int], tmp_path) -> None:
    c, h, w = shape
    x = np.zeros((5, h, w, c), np.uint8)
    x[:, h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 200
    np.savez(tmp_path / "x.npz", x=x[..., 0] if c == 1 else x, y=np.arange(5))
    base = D.load(f"npz:{tmp_path}/x.npz", fmt=None)
    ds = D.load(f"{spec}:npz:{tmp_path}/x.npz", fmt=None)
    out_c = 3 if spec in ("colour", "mnistm") else c
    assert ds.x.shape == (5, out_c, h, w) and ds.x.dtype == np.float32
    assert 0 <= ds.x.min() and ds.x.max() <= 1 and not np.array_equal(ds.x[:, :1], base.x[:, :1])
    if spec in ("bgimage", "bgrand"):
        assert (ds.x >= base.x).all() and (ds.x[base.x == 0] > 0).mean() > 0.5  # max composite, filled
    if spec == "bgimage" and c == 3:
        assert np.abs(ds.x[:, 0] - ds.x[:, 1]).mean() > 0.01  # colour patches behind colour images
    if spec == "rotated":
        ratio = ds.x.sum() / base.x.sum()
        assert 0.8 < ratio < 1.2


# --------------------------------------------------------------------------- colour files of several sizes


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes, np.ndarray]]:
    """(class, encoded, pixels): four RGB PNG 3x32x32, one RGB JPEG 3x48x40, one grey PNG 1x32x32."""
    rng = np.random.default_rng(4)
    out = []
    for i in range(4):
        a = _u8(rng, 32, 32, 3)
        out.append(("a" if i < 2 else "b", _png(a), a))
    smooth = np.clip(np.linspace(0, 255, 48 * 40 * 3).reshape(48, 40, 3), 0, 255).astype(np.uint8)
    out.append(("b", _png(smooth, "JPEG"), smooth))
    grey = _u8(rng, 32, 32)
    out.append(("b", _png(grey), grey))
    return out


@pytest.fixture(params=["folder", "parquet"])
def colour_spec(request, images, tmp_path) -> str:
    if request.param == "folder":
        for i, (cls, raw, _) in enumerate(images):  # file names sort in the order written
            (tmp_path / cls).mkdir(exist_ok=True)
            ext = "jpg" if raw.startswith(b"\xff\xd8") else "png"
            (tmp_path / cls / f"{i}.{ext}").write_bytes(raw)
        return f"folder:{tmp_path}"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [raw for _, raw, _ in images], "label": [0, 0, 1, 1, 1, 1]}),
                   tmp_path / "x.parquet")
    return f"parquet:{tmp_path}/x.parquet"


def test_mixed_sizes_go_to_the_most_common_format(colour_spec: str, images, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="simex_ray.data"):
        ds = D.load(colour_spec, fmt=None)
    assert "3x32x32 (4), 3x48x40 (1), 1x32x32 (1)" in caplog.text and "converting them all to 3x32x32" in caplog.text
    assert ds.x.shape == (6, 3, 32, 32)
    for i in range(4):  # PNG is lossless: the pixels themselves
        np.testing.assert_array_equal(ds.x[i], images[i][2].transpose(2, 0, 1) / np.float32(255))
    jpeg = D.decode_image(images[4][1], "jpeg")
    assert jpeg.shape == (1, 3, 48, 40)
    np.testing.assert_array_equal(ds.x[4], convert(jpeg, ImageFormat(3, 32, 32))[0])  # area-shrunk
    np.testing.assert_array_equal(ds.x[5], np.repeat(images[5][2][None] / np.float32(255), 3, axis=0))  # grey -> RGB
    np.testing.assert_array_equal(ds.y, [0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("fmt", [ImageFormat(1, 28, 28), ImageFormat(3, 64, 64), ImageFormat(1, 16, 40)])
def test_colour_files_convert_by_the_rule(colour_spec: str, fmt: ImageFormat) -> None:
    native = D.load(colour_spec, fmt=None)
    ds = D.load(colour_spec, fmt=fmt)
    assert ds.format == fmt
    np.testing.assert_array_equal(ds.x, convert(native.x, fmt))


def test_one_colour_size_is_kept_native(images, tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(9)
    pix = [_u8(rng, 48, 40, 3) for _ in range(3)]
    (tmp_path / "k").mkdir()
    for i, a in enumerate(pix):
        Image.fromarray(a).save(tmp_path / "k" / f"{i}.png")
    spec = f"folder:{tmp_path}"
    assert D.native_format(spec) == ImageFormat(3, 48, 40)
    np.testing.assert_array_equal(D.load(spec, fmt=None).x, np.stack(pix).transpose(0, 3, 1, 2) / np.float32(255))
    with pytest.raises(D.SpecError, match="strict-format"):
        D.load(spec, fmt=ImageFormat(3, 32, 32), strict=True)

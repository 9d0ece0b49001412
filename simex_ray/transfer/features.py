"""A classifier's outputs on a dataset, computed once and kept on disk (Ray-free).

Every transferability estimator reads the frozen classifier B(Y)'s outputs on the unknown data X:
its features (the penultimate layer, or a named one), its softmax probabilities and its logits. They
are computed together, in batches, as one :class:`ClassifierOutputs` record, and kept in a
:class:`FeatureCache`::

    DIR/<weights sha256, 16 hex>-<sha256(weights sha256 | data fingerprint | layer)>.npz

keyed by the sha256 of the classifier's weight file (the library's record), the *data fingerprint*
(:func:`data_fingerprint`: the sha256 of the exact float32 images fed, after split, samples and format
conversion, built from one sha256 per image so that workers can hash their own slices) and the layer.
Every estimator and every re-run on the same images reuses the entry: a re-run computes no forward pass.

An entry is written atomically (:meth:`~simex_ray.storage.Location.write_bytes_atomic`), read with
``numpy.load(allow_pickle=False)`` and trusted only when its key, its arrays' shapes (N rows each,
as many as the images) and the sha256 of its arrays' bytes all check out; anything else (truncated,
corrupted, another key) is a miss and is computed again.

Cost: one forward pass per classifier (``Library.outputs``: features, probabilities and logits
together, so the outputs are exactly the library's); hashing is O(N C H W) at memory speed, and an
entry is O(N (D + 2K)) float64.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .. import storage
from ..errors import UserError, one_line

log = logging.getLogger(__name__)

__all__ = ["PENULTIMATE", "PIXEL_FEATURES", "ClassifierOutputs", "FeatureCache", "Outputs", "check_layer",
           "compute_outputs", "data_fingerprint", "default_cache_dir", "module_of", "pixel_features", "row_digests"]

PENULTIMATE = "penultimate"
DIGEST = 32  # bytes of one image's sha256
ENTRY_VERSION = 1


@dataclass(frozen=True)
class ClassifierOutputs:
    """B(Y)'s outputs on N images: ``features`` (N, D), ``probabilities`` (N, K) softmax, ``logits`` (N, K)
    pre-softmax, all float64; ``layer``: where the features come from."""

    features: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    layer: str = PENULTIMATE

    @property
    def n(self) -> int:
        return int(len(self.features))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"features": self.features, "probabilities": self.probabilities, "logits": self.logits}


def layer_name(layer: str | None) -> str:
    return layer or PENULTIMATE


def module_of(layer: str | None) -> str | None:
    """The module a ``--layer`` names, None for the default (each classifier's own features)."""
    return None if layer_name(layer) == PENULTIMATE else layer


# --------------------------------------------------------------------------- computing


def check_layer(library, name: str, layer: str | None) -> None:
    """A one-line :class:`~simex_ray.transfer.zoo.ZooError` naming close matches when classifier ``name`` has
    no module ``layer``."""
    if module_of(layer) is not None:
        library.layer_runner(name, layer)


def compute_outputs(library, name: str, x, *, layer: str | None = None, batch_size: int = 512) -> ClassifierOutputs:
    """Classifier ``name``'s outputs on images ``x`` (N, C, H, W) in its format: one forward pass of the
    library's (``Library.outputs``: preprocessing, features of its record's layer or of ``layer``, softmax
    and logits), ``batch_size`` images at a time, on the library's device."""
    feats, probs, logits = library.outputs(name, x, layer=module_of(layer), batch_size=batch_size)
    return ClassifierOutputs(feats, probs, logits, library.feature_layer(name, module_of(layer)))


# The no-transfer features (selection.no_transfer, learning.pixel_probe): raw pixels, at most this many values.
PIXEL_FEATURES = 1024


def pixel_features(x: np.ndarray) -> np.ndarray:
    """The raw pixels of ``x`` (N, C, H, W) as (N, D) float64 features, each image area-shrunk (aspect kept,
    by :func:`~simex_ray.formats.convert`'s rule) so that D <= :data:`PIXEL_FEATURES`: a bound on the
    estimators' O(D^3) cost at 224 px, not a tuned constant."""
    from ..formats import ImageFormat, convert

    n, c, h, w = x.shape
    if c * h * w > PIXEL_FEATURES:
        f = np.sqrt(PIXEL_FEATURES / (c * h * w))
        x = convert(np.asarray(x, dtype=np.float32), ImageFormat(c, max(1, int(h * f)), max(1, int(w * f))))
    return np.asarray(x, dtype=np.float64).reshape(n, -1)


# --------------------------------------------------------------------------- the data fingerprint


def row_digests(x) -> np.ndarray:
    """One sha256 per image of ``x`` (N, C, H, W), over its float32 bytes: (N, 32) uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((len(x), DIGEST), dtype=np.uint8)
    for i, row in enumerate(x):
        out[i] = np.frombuffer(hashlib.sha256(row.tobytes()).digest(), dtype=np.uint8)
    return out


def data_fingerprint(digests: np.ndarray, image_shape) -> str:
    """The sha256 of the exact images fed, from their :func:`row_digests` in row order and their (C, H, W):
    the same whether one process hashed them all or workers hashed slices."""
    h = hashlib.sha256()
    h.update(f"images{tuple(int(s) for s in image_shape)}n{len(digests)}".encode())
    h.update(np.ascontiguousarray(digests, dtype=np.uint8).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the cache


class FeatureCache:
    """Outputs on disk under ``root`` (a path or URI), one ``.npz`` per (weights sha256, data fingerprint, layer)."""

    def __init__(self, root: storage.PathLike):
        self.root = storage.resolve(root)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    @staticmethod
    def key(weights: str, data: str, layer: str | None) -> str:
        return hashlib.sha256(f"{weights}|{data}|{layer_name(layer)}".encode()).hexdigest()

    def entry(self, weights: str, data: str, layer: str | None) -> storage.Location:
        return self.root.join(f"{weights[:16]}-{self.key(weights, data, layer)}.npz")

    def may_have(self, weights: str) -> bool:
        """False when no entry of these weights exists (on any data): a lookup would miss, so the data need
        not be hashed before computing (one listing of the directory)."""
        try:
            return any(n.startswith(f"{weights[:16]}-") for n in self.root.listdir())
        except OSError:
            return True

    def get(self, weights: str, data: str, layer: str | None, n: int) -> ClassifierOutputs | None:
        """The entry, checked, or None (missing, unreadable, corrupt, of another key or size, or without the
        logits): a miss is computed again, never trusted."""
        loc = self.entry(weights, data, layer)
        try:
            if not loc.is_file():
                return None
            blob = loc.read_bytes()
        except (OSError, UserError) as e:
            log.warning("feature cache entry %s cannot be read (%s); computing it again", loc, one_line(e))
            return None
        why = None
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            why = _check(arrays, weights, data, layer_name(layer), n)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            why = f"unreadable ({type(e).__name__})"
        if why:
            log.warning("feature cache entry %s is %s; computing it again", loc, why)
            return None
        if "logits" not in arrays:  # an entry from before logits were kept
            return None
        return ClassifierOutputs(arrays["features"], arrays["probabilities"], arrays["logits"], layer_name(layer))

    def put(self, weights: str, data: str, outputs: ClassifierOutputs) -> storage.Location | None:
        """Write ``outputs`` atomically as the entry of (``weights``, ``data``, its layer); None (and a warning)
        when it cannot be written."""
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in outputs.arrays().items()}
        meta = {"version": np.array(ENTRY_VERSION), "weights": np.array(weights), "data": np.array(data),
                "layer": np.array(outputs.layer), "digest": np.array(_digest(arrays))}
        buf = io.BytesIO()
        np.savez(buf, **arrays, **meta)
        loc = self.entry(weights, data, outputs.layer)
        try:
            if self.root.is_local:
                self.root.makedirs()
            loc.write_bytes_atomic(buf.getvalue())
        except (OSError, UserError) as e:  # a cache that cannot be written costs a recomputation, not the answer
            log.warning("cannot write feature cache entry %s (%s); the outputs are used but not kept", loc,
                        one_line(e))
            return None
        return loc


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k], dtype=np.float64)
        h.update(f"{k}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check(arrays: dict[str, np.ndarray], weights: str, data: str, layer: str, n: int) -> str | None:
    """Why the entry cannot be trusted, or None."""
    if "version" not in arrays or int(arrays["version"]) != ENTRY_VERSION:
        return "of another format version"
    if (str(arrays.get("weights")), str(arrays.get("data")), str(arrays.get("layer"))) != (weights, data, layer):
        return "of another key"
    outs = {k: arrays[k] for k in ("features", "probabilities", "logits") if k in arrays}
    if "features" not in outs or "probabilities" not in outs:
        return "missing arrays"
    for k, a in outs.items():
        if a.dtype != np.float64 or a.ndim != 2 or len(a) != n:
            return f"of the wrong size ({k} {a.dtype} {a.shape}, expected {n} rows)"
    if "logits" in outs and outs["logits"].shape != outs["probabilities"].shape:
        return "of the wrong size (logits and probabilities differ)"
    if _digest(outs) != str(arrays.get("digest")):
        return "corrupted (sha256 mismatch)"
    return None


def default_cache_dir(library_path: storage.PathLike | None) -> storage.Location | None:
    """``features/`` inside the library when it is a writable local directory, else None (no cache)."""
    if library_path is None or (storage.is_uri(library_path) and not str(library_path).startswith("file://")):
        return None  # an object store: not resolved here (no network for a default)
    loc = storage.resolve(library_path)
    if not loc.is_local or not os.path.isdir(loc.path):
        return None
    target = loc.join("features")
    probe = target.path if os.path.isdir(target.path) else loc.path
    return target if os.access(probe, os.W_OK) else None


# --------------------------------------------------------------------------- in process, through the cache


class Outputs:
    """``outputs(name)``: classifier ``name``'s :class:`ClassifierOutputs` on images ``x`` (one array, or for a
    library of several formats ``{str(format): array}``, the same images in each), from ``cache`` when it
    has them, else computed in this process (and then cached). Each is computed at most once per object.

    ``report[name]``: ``{"cached": bool, "seconds": ..., "images_per_s": ...}`` (rate: computed ones only);
    ``on_progress(name, report)`` is called after each classifier."""

    where = "here"

    def __init__(self, library, x, *, cache: FeatureCache | None = None, layer: str | None = None,
                 batch_size: int = 512, on_progress: Callable[[str, dict[str, Any]], None] | None = None):
        self.library, self.x, self.cache, self.layer = library, x, cache, layer_name(layer)
        self.batch_size, self.on_progress = batch_size, on_progress
        self.done: dict[str, ClassifierOutputs] = {}
        self.report: dict[str, dict[str, Any]] = {}
        self._fingerprints: dict[str, str] = {}

    def images(self, name: str) -> np.ndarray:
        """The images classifier ``name`` reads (in its format)."""
        return self.x[str(self.library.image_format(name))] if isinstance(self.x, Mapping) else self.x

    def fingerprint_of(self, x: np.ndarray) -> str:
        key = "x".join(str(v) for v in np.shape(x)[1:])
        if key not in self._fingerprints:
            self._fingerprints[key] = data_fingerprint(row_digests(x), np.shape(x)[1:])
        return self._fingerprints[key]

    @property
    def fingerprint(self) -> str:
        """The data's fingerprint (of the first format's images, for a library of several)."""
        return self.fingerprint_of(next(iter(self.x.values())) if isinstance(self.x, Mapping) else self.x)

    def __call__(self, name: str) -> ClassifierOutputs:
        if name in self.done:
            return self.done[name]
        t0 = time.perf_counter()
        x = self.images(name)
        weights = self.library.classifiers[name].sha256
        chosen = module_of(self.layer)
        layer = self.library.feature_layer(name, chosen)  # the key names where the features come from
        got = None
        if self.cache is not None and weights:
            got = self.cache.get(weights, self.fingerprint_of(x), layer, len(x))
        cached = got is not None
        if got is None:
            got = compute_outputs(self.library, name, x, layer=chosen, batch_size=self.batch_size)
            if self.cache is not None and weights:
                self.cache.put(weights, self.fingerprint_of(x), got)
        seconds = time.perf_counter() - t0
        self.report[name] = {"cached": cached, "seconds": seconds,
                             "images_per_s": None if cached else len(x) / max(seconds, 1e-9)}
        self.done[name] = got
        if self.on_progress is not None:
            self.on_progress(name, self.report[name])
        return got

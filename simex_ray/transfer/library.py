"""A library of pretrained base classifiers B(Y), on disk beside the fleet (Ray-free).

The paper's first scenario (section 3.1): a provider keeps one classifier per reference dataset and a
customer asks which one to transfer from. The ground truth trains exactly these classifiers; a user adds
their own (any torchvision, timm or TorchScript classifier, :mod:`.zoo`). The library keeps them, with the
fleet's conventions::

    LIB/library.json                              kind, format, one record per classifier
    LIB/weights/<name>-<sha16>.<pt|pth|safetensors>  one weight file per classifier, named by its content

A record holds the reference spec (what the classifier was trained on; a classifier added without
``--source`` is its own reference), the classifier seed, the architecture string (``lenet5``,
``torchvision:<name>``, ``timm:<name>``, ``torchscript``), the image format it takes (``"1x28x28"`` for
records written before formats existed), the number of classes, the per-channel mean and std its inputs are
normalised with (none: used as given in [0, 1]), the module whose output are its features (none: the input
of its final Linear), where its weights came from, the fingerprint of its training split and its training
settings (for those trained here), its held-out accuracy and training time, and the sha256 of its weight
file. Writes are atomic, weights before the record that lists them; loading checks the sha256 of the bytes it
loads and reads state_dicts with ``torch.load(weights_only=True)`` or safetensors. Format 2 (these fields)
reads format 1 (LeNet-5 only) unchanged. LIB is a local path or a URI (``file://``, ``s3://``, ``gs://``), as
for fleets.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .. import storage
from ..errors import one_line
from ..fleet.manifest import FleetError, write_blob, write_state
from ..formats import LEGACY, FormatError, ImageFormat, format_of
from .classifiers import LeNet5
from .zoo import (LENET, ZooError, ZooModel, build_network, check_model, check_normalization, default_format,
                  default_normalization, parse_architecture, weight_suffix)

FILE = "library.json"
KIND = "simex-classifier-library"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: LeNet-5 records only, before classifiers could be added


class LibraryError(FleetError):
    """A classifier library that cannot be used; the message names the file and the fix (a FleetError: the
    CLI reports it in one line, exit status 1)."""


@dataclass
class Classifier:
    """One base classifier B(Y)'s record in ``library.json``."""

    name: str  # "<spec>@s<seed>" for those trained here; any name for those added
    spec: str  # the reference it was trained on (a classifier added without --source: its own name)
    seed: int
    n_classes: int
    fingerprint: str  # sha256 of the classifier's training split (data.fingerprint); "" when added
    architecture: str = LENET  # lenet5, torchvision:<name>, timm:<name>, torchscript
    image_format: str = str(LEGACY)  # the (C, H, W) it takes; records from before formats are 1x28x28
    data_seed: int | None = None
    samples: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # optimizer, lr, max_epochs, patience, batch_size
    accuracy: float = float("nan")  # on the reference's held-out test split
    val_accuracy: float = float("nan")
    seconds: float = float("nan")
    weights: str = ""  # relative to the library
    sha256: str = ""
    mean: list[float] | None = None  # per channel: the network sees (x - mean) / std; None: x as given
    std: list[float] | None = None
    layer: str | None = None  # the module whose output are the features; None: the input of the final Linear
    origin: str = ""  # where an added classifier's weights came from (path or URI)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Classifier":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def classifier_name(spec: str, seed: int) -> str:
    return f"{spec}@s{seed}"


def read_library(path: storage.PathLike) -> dict[str, Any]:
    """The parsed ``library.json`` of ``path``, checked for kind and format."""
    loc = storage.resolve(path)
    file = loc.join(FILE)
    try:
        text = file.read_bytes().decode() if file.is_file() else None
    except OSError as e:
        raise LibraryError(f"cannot read {file} ({one_line(e)}); check the path and its credentials") from None
    if text is None:
        raise LibraryError(f"{file} is missing; build a library with `simex train-bases --refs ... --out {path}`, "
                           f"`simex library add --library {path} ...` or `simex experiment transfer --out DIR` "
                           f"(its DIR/library)")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LibraryError(f"{file} is corrupted ({one_line(e)}); rebuild it with `simex train-bases`") from None
    if not isinstance(d, dict) or d.get("kind") != KIND:
        raise LibraryError(f"{file} is not a simex classifier library")
    if d.get("format") not in READABLE_VERSIONS:
        raise LibraryError(f"{file} has format {d.get('format')}, this simex reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade simex-ray")
    return d


class LibraryWriter:
    """Adds classifiers to a library, rewriting ``library.json`` each time (weights first).

    Records already in the library are kept, and so are the document's other keys (e.g. train-bases'
    ``refs``), so building it in several runs, or resuming one, never loses finished work; a record with the
    same name is replaced.
    """

    def __init__(self, out: storage.PathLike, extra: dict[str, Any] | None = None):
        self.out = storage.resolve(out)
        self.extra = extra or {}
        self._lock = threading.Lock()
        self.classifiers: dict[str, Classifier] = {}
        if self.out.join(FILE).exists():
            try:
                doc = read_library(self.out)
            except LibraryError:
                doc = {"classifiers": []}
            self.classifiers = {c["name"]: Classifier.from_json(c) for c in doc["classifiers"]}
            kept = {k: v for k, v in doc.items() if k not in ("kind", "format", "updated", "classifiers")}
            self.extra = {**kept, **self.extra}

    def has(self, name: str, fingerprint: str, config: dict[str, Any]) -> bool:
        """True when ``name`` is already trained on this data with this config, and its weights are intact."""
        c = self.classifiers.get(name)
        if c is None or c.fingerprint != fingerprint or c.config != config or not c.weights:
            return False
        path = self.out.join(c.weights)
        return path.is_file() and path.sha256() == c.sha256

    def add(self, record: Classifier, state: dict[str, torch.Tensor]) -> Classifier:
        """Keep a classifier trained here: its state_dict written as a ``.pt``, then its record."""
        record.weights, record.sha256 = write_state(self.out, record.name, state)  # the same bytes: not again
        return self.publish(record)

    def add_file(self, record: Classifier, blob: bytes, suffix: str) -> Classifier:
        """Keep an added classifier: the bytes of its weight file as they are, then its record."""
        record.weights, record.sha256 = write_blob(self.out, record.name, blob, suffix)
        return self.publish(record)

    def publish(self, record: Classifier) -> Classifier:
        with self._lock:
            self.classifiers[record.name] = record
            doc = {"kind": KIND, "format": FORMAT_VERSION,
                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.extra,
                   "classifiers": [c.to_json() for c in self.classifiers.values()]}
            self.out.join(FILE).write_bytes_atomic((json.dumps(doc, indent=2) + "\n").encode())
        return record


def add_classifier(library: storage.PathLike, *, arch: str, weights: storage.PathLike, n_classes: int,
                   name: str | None = None, image_format: ImageFormat | str | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   layer: str | None = None, source: str | None = None) -> Classifier:
    """Add a pretrained classifier to ``library`` (created when missing): its weight file (a path or URI)
    copied in, content-addressed, after the network is built from it and checked on two probe images.

    ``name`` defaults to the weight file's stem; ``image_format`` to 1x28x28 for lenet5, else 3x224x224;
    ``mean``/``std`` (both or neither) to ImageNet's for torchvision and timm networks, none otherwise;
    ``source``: the reference spec it was trained on (default: the
    classifier is its own reference). A head of another size than ``n_classes``, weights that do not fit
    ``arch``, a missing timm, an unknown ``layer`` are one-line :class:`~.zoo.ZooError` s.
    """
    parse_architecture(arch)
    if source is not None:
        from ..data import parse_spec

        parse_spec(source)  # a one-line SpecError for a spec that names no dataset: simex would miss it later
    src = storage.resolve(weights)
    try:
        blob = src.read_bytes() if src.is_file() else None
    except OSError as e:
        raise ZooError(f"cannot read the weight file {src} ({one_line(e)}); check the path and its credentials") \
            from None
    if blob is None:
        raise ZooError(f"weight file {src} not found; pass --weights a .pt, .pth or .safetensors file (path or URI)")
    suffix = weight_suffix(src.name, arch)
    fmt = ImageFormat.parse(image_format or default_format(arch))
    if mean is None and std is None:
        mean, std = default_normalization(arch)
    check_normalization(mean, std, fmt)
    network = build_network(arch, n_classes, fmt, blob, suffix)
    model = ZooModel(network, mean=mean, std=std, layer=layer, blob=blob)
    check_model(model, fmt, n_classes)
    name = name or src.name.rsplit(".", 1)[0]
    record = Classifier(name=name, spec=source or name, seed=0, n_classes=int(n_classes), fingerprint="",
                        architecture=arch.strip(), image_format=str(fmt),
                        mean=None if mean is None else [float(v) for v in mean],
                        std=None if std is None else [float(v) for v in std], layer=layer or None,
                        origin=str(weights))
    return LibraryWriter(library).add_file(record, blob, suffix)


class Library:
    """The classifiers of a library, loaded on demand; ``features``/``probabilities``/``logits`` need no Ray.

    >>> lib = Library.load("LIB")
    >>> lib.probabilities("mnist@s0", x)   # x: (N, C, H, W) in [0, 1], the classifier's format -> (N, K) softmax

    Each classifier runs batched, in eval mode, under ``torch.no_grad``, on ``device`` (default the CPU).
    """

    def __init__(self, path: storage.PathLike, classifiers: dict[str, Classifier],
                 device: torch.device | str = "cpu"):
        self.path, self.classifiers = path, classifiers
        self.device = torch.device(device)
        self._models: dict[str, ZooModel] = {}
        self._layers: dict[str, ZooModel] = {}  # (name, --layer) -> the same network giving that layer
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: storage.PathLike, device: torch.device | str = "cpu") -> "Library":
        records = {c["name"]: Classifier.from_json(c) for c in read_library(path)["classifiers"]}
        if not records:
            raise LibraryError(f"{storage.resolve(path).join(FILE)} lists no classifiers")
        return cls(path, records, device)

    @classmethod
    def in_memory(cls, bases: Iterable[tuple[Classifier, dict[str, torch.Tensor]]]) -> "Library":
        """A library of LeNet-5 classifiers just trained (records and state_dicts), not written anywhere."""
        lib = cls(None, {})
        for record, state in bases:
            model = LeNet5(record.n_classes, record.image_format)
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
            lib.classifiers[record.name], lib._models[record.name] = record, ZooModel(model.eval())
        return lib

    @property
    def names(self) -> list[str]:
        return list(self.classifiers)

    @property
    def references(self) -> list[str]:
        """The reference specs, each once, in library order."""
        return list(dict.fromkeys(c.spec for c in self.classifiers.values()))

    @property
    def formats(self) -> list[ImageFormat]:
        """The image formats the classifiers take, each once, in library order."""
        return list(dict.fromkeys(self.image_format(n) for n in self.names))

    def for_reference(self, spec: str, seed: int | None = None) -> Classifier:
        """The classifier of ``spec`` (its lowest seed unless ``seed``)."""
        found = sorted((c for c in self.classifiers.values() if c.spec == spec and (seed is None or c.seed == seed)),
                       key=lambda c: c.seed)
        if not found:
            raise LibraryError(f"the library has no classifier for '{spec}'; it has: {', '.join(self.references)}")
        return found[0]

    def record(self, name: str) -> Classifier:
        c = self.classifiers.get(name)
        if c is None:
            raise LibraryError(f"unknown classifier '{name}'; the library has: {', '.join(self.names)}")
        return c

    def weight_bytes(self, name: str) -> bytes:
        """The bytes of ``name``'s weight file, checked against the record's sha256."""
        c = self.record(name)
        path = storage.resolve(self.path).join(c.weights)
        try:
            blob = path.read_bytes() if c.weights and path.is_file() else None
        except OSError as e:
            raise LibraryError(f"weight file {path} of '{name}' cannot be read ({one_line(e)})") from None
        fix = "`simex train-bases` with the same --out" if c.fingerprint else "`simex library add` of it"
        if blob is None:
            raise LibraryError(f"weight file {path} of '{name}' is missing; re-run {fix} to rebuild it")
        if hashlib.sha256(blob).hexdigest() != c.sha256:
            raise LibraryError(f"weight file {path} of '{name}' is corrupted (sha256 mismatch); delete it and "
                               f"re-run {fix}")
        return blob

    def runner(self, name: str) -> ZooModel:
        """B(Y) by name as the library runs it (preprocessing, features, logits), its weight file checked
        against the record's sha256 (loaded once)."""
        with self._lock:
            if name not in self._models:
                self._models[name] = self._build(name)
            return self._models[name]

    def _build(self, name: str) -> ZooModel:
        c = self.record(name)
        blob = self.weight_bytes(name)
        where = f"'{name}' in {storage.resolve(self.path).join(FILE)}"
        try:
            fmt = ImageFormat.parse(c.image_format)
        except FormatError as e:
            raise LibraryError(f"{where} has a bad image format ({e})") from None
        try:
            parse_architecture(c.architecture)
        except ZooError as e:
            raise LibraryError(f"{where} has architecture '{c.architecture}' this simex cannot build ({e})") from None
        try:
            network = build_network(c.architecture, c.n_classes, fmt, blob, weight_suffix(c.weights, c.architecture))
            return ZooModel(network, mean=c.mean, std=c.std, layer=c.layer, blob=blob, device=self.device)
        except ZooError as e:
            path = storage.resolve(self.path).join(c.weights)
            raise LibraryError(f"weight file {path} of '{name}' cannot be loaded ({e})") from None

    def model(self, name: str) -> torch.nn.Module:
        """B(Y)'s network by name (its raw forward: no preprocessing), checked and loaded once."""
        return self.runner(name).network

    def image_format(self, name: str) -> ImageFormat:
        """The format classifier ``name`` takes."""
        return ImageFormat.parse(self.record(name).image_format)

    def check_images(self, name: str, x) -> None:
        """A one-line :class:`FormatError` when images ``x`` (N, C, H, W) are not in ``name``'s format."""
        found, want = format_of(x), self.image_format(name)
        if found != want:
            raise FormatError(f"images are {found} but classifier '{name}' takes {want}; load them in its format "
                              f"(--image-format {want}) or convert them with simex_ray.formats.convert")

    def outputs(self, name: str, x, *, features: bool = True, layer: str | None = None,
                batch_size: int = 512) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """One forward pass of B(Y) over images x (N, C, H, W) in [0, 1]: (its features (N, D) float64, or
        None without ``features``; its softmax (N, K) float64; its logits (N, K) float64). ``layer``: the
        features of that module instead of the record's (the input of the final Linear, or its ``layer``)."""
        self.check_images(name, x)
        runner = self.runner(name) if layer in (None, self.record(name).layer) else self.layer_runner(name, layer)
        feats, logits = runner.forward(x, batch_size=batch_size, features=features)
        return feats, F.softmax(logits, dim=1).double().numpy(), logits.double().numpy()

    def layer_runner(self, name: str, layer: str) -> ZooModel:
        """Classifier ``name`` giving the features of module ``layer`` (the same network, loaded once); a
        one-line :class:`~.zoo.ZooError` (a usage error) naming close matches when it has no such module."""
        key = f"{name}\0{layer}"
        if key not in self._layers:
            c, runner = self.record(name), self.runner(name)
            try:
                self._layers[key] = ZooModel(runner.network, mean=c.mean, std=c.std, layer=layer, device=self.device)
            except ZooError as e:
                raise ZooError(f"classifier '{name}': {e}") from None
        return self._layers[key]

    def feature_layer(self, name: str, layer: str | None = None) -> str:
        """Where ``name``'s features come from: ``layer``, else its record's layer, else "penultimate" (the
        input of its final Linear); part of the feature cache's key."""
        from .features import PENULTIMATE

        return layer or self.record(name).layer or PENULTIMATE

    def features(self, name: str, x, batch_size: int = 512) -> np.ndarray:
        """B(Y)'s features: the input of its final Linear (LeNet-5: the 84-dim FC layer after its activation),
        or its record's ``layer`` (global-average-pooled when 4-D): (N, D) float64."""
        self.check_images(name, x)
        return self.runner(name).forward(x, batch_size=batch_size)[0]

    def probabilities(self, name: str, x) -> np.ndarray:
        """B(Y)'s softmax over its own classes: (N, K) float64."""
        return self.outputs(name, x, features=False)[1]

    def logits(self, name: str, x) -> np.ndarray:
        """B(Y)'s raw output (before the softmax; what energy and MaNo read): (N, K) float64."""
        return self.outputs(name, x, features=False)[2]

    def select(self, names: Iterable[str]) -> "Library":
        names = list(names)
        unknown = [n for n in names if n not in self.classifiers]
        if unknown:
            raise LibraryError(f"unknown classifier(s) {', '.join(unknown)}; the library has: {', '.join(self.names)}")
        lib = Library(self.path, {n: self.classifiers[n] for n in names}, self.device)
        lib._models = {n: m for n, m in self._models.items() if n in lib.classifiers}
        return lib


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, x, batch_size: int = 512) -> np.ndarray:
    """The input of the last linear layer (after its activation): what a linear probe on B(Y) sees."""
    return ZooModel(model).forward(x, batch_size=batch_size)[0]

"""A library of pretrained base classifiers B(Y), on disk beside the fleet (Ray-free).

The paper's first scenario (section 3.1): a provider keeps one classifier per reference dataset and a
customer asks which one to transfer from. The ground truth trains exactly these classifiers; the
library keeps them, with the fleet's conventions::

    LIB/library.json                        kind, format, one record per classifier
    LIB/weights/<name>-<sha16>.pt           one state_dict per classifier, named by its content

A record holds the reference spec, the classifier seed, the architecture, the image format it takes
(``"1x28x28"`` for records written before formats existed), the number of classes, the
fingerprint of its training split, its training settings, its held-out accuracy and training time,
and the sha256 of its weight file. Writes are atomic, weights before the record that lists them;
loading checks the sha256 of the bytes it loads and uses ``torch.load(weights_only=True)``.
LIB is a local path or a URI (``file://``, ``s3://``, ``gs://``), as for fleets.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from .. import storage
from ..errors import one_line
from ..fleet.manifest import FleetError, write_state
from ..formats import LEGACY, FormatError, ImageFormat, format_of
from .classifiers import LeNet5, predict_proba

FILE = "library.json"
KIND = "simex-classifier-library"
FORMAT_VERSION = 1
ARCHITECTURES = ("lenet5",)


class LibraryError(FleetError):
    """A classifier library that cannot be used; the message names the file and the fix (a FleetError: the
    CLI reports it in one line, exit status 1)."""


@dataclass
class Classifier:
    """One base classifier B(Y)'s record in ``library.json``."""

    name: str  # "<spec>@s<seed>": one reference, one classifier seed
    spec: str
    seed: int
    n_classes: int
    fingerprint: str  # sha256 of the classifier's training split (data.fingerprint)
    architecture: str = "lenet5"
    image_format: str = str(LEGACY)  # the (C, H, W) it takes; records from before formats are 1x28x28
    data_seed: int | None = None
    samples: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # optimizer, lr, max_epochs, patience, batch_size
    accuracy: float = float("nan")  # on the reference's held-out test split
    val_accuracy: float = float("nan")
    seconds: float = float("nan")
    weights: str = ""  # relative to the library
    sha256: str = ""

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
        raise LibraryError(f"{file} is missing; build a library with `simex train-bases --refs ... --out {path}` "
                           f"or `simex experiment transfer --out DIR` (its DIR/library)")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LibraryError(f"{file} is corrupted ({one_line(e)}); rebuild it with `simex train-bases`") from None
    if not isinstance(d, dict) or d.get("kind") != KIND:
        raise LibraryError(f"{file} is not a simex classifier library")
    if d.get("format") != FORMAT_VERSION:
        raise LibraryError(f"{file} has format {d.get('format')}, this simex reads {FORMAT_VERSION}")
    return d


class LibraryWriter:
    """Adds finished classifiers to a library, rewriting ``library.json`` each time (weights first).

    Records already in the library are kept, so building it in several runs, or resuming one, never
    loses finished work; a record with the same name is replaced.
    """

    def __init__(self, out: storage.PathLike, extra: dict[str, Any] | None = None):
        self.out = storage.resolve(out)
        self.extra = extra or {}
        self._lock = threading.Lock()
        self.classifiers: dict[str, Classifier] = {}
        if self.out.join(FILE).exists():
            try:
                self.classifiers = {c["name"]: Classifier.from_json(c) for c in read_library(self.out)["classifiers"]}
            except LibraryError:
                self.classifiers = {}

    def has(self, name: str, fingerprint: str, config: dict[str, Any]) -> bool:
        """True when ``name`` is already trained on this data with this config, and its weights are intact."""
        c = self.classifiers.get(name)
        if c is None or c.fingerprint != fingerprint or c.config != config or not c.weights:
            return False
        path = self.out.join(c.weights)
        return path.is_file() and path.sha256() == c.sha256

    def add(self, record: Classifier, state: dict[str, torch.Tensor]) -> Classifier:
        record.weights, record.sha256 = write_state(self.out, record.name, state)  # the same bytes: not again
        with self._lock:
            self.classifiers[record.name] = record
            doc = {"kind": KIND, "format": FORMAT_VERSION,
                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.extra,
                   "classifiers": [c.to_json() for c in self.classifiers.values()]}
            self.out.join(FILE).write_bytes_atomic((json.dumps(doc, indent=2) + "\n").encode())
        return record


class Library:
    """The classifiers of a library, loaded on demand; ``features``/``probabilities`` need no Ray.

    >>> lib = Library.load("LIB")
    >>> lib.probabilities("mnist@s0", x)   # x: (N, C, H, W) in [0, 1], the classifier's format -> (N, K) softmax
    """

    def __init__(self, path: storage.PathLike, classifiers: dict[str, Classifier]):
        self.path, self.classifiers = path, classifiers
        self._models: dict[str, LeNet5] = {}

    @classmethod
    def load(cls, path: storage.PathLike) -> "Library":
        records = {c["name"]: Classifier.from_json(c) for c in read_library(path)["classifiers"]}
        if not records:
            raise LibraryError(f"{storage.resolve(path).join(FILE)} lists no classifiers")
        return cls(path, records)

    @classmethod
    def in_memory(cls, bases: Iterable[tuple[Classifier, dict[str, torch.Tensor]]]) -> "Library":
        """A library of classifiers just trained (records and state_dicts), not written anywhere."""
        lib = cls(None, {})
        for record, state in bases:
            model = LeNet5(record.n_classes, record.image_format)
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
            lib.classifiers[record.name], lib._models[record.name] = record, model.eval()
        return lib

    @property
    def names(self) -> list[str]:
        return list(self.classifiers)

    @property
    def references(self) -> list[str]:
        """The reference specs, each once, in library order."""
        return list(dict.fromkeys(c.spec for c in self.classifiers.values()))

    def for_reference(self, spec: str, seed: int | None = None) -> Classifier:
        """The classifier of ``spec`` (its lowest seed unless ``seed``)."""
        found = sorted((c for c in self.classifiers.values() if c.spec == spec and (seed is None or c.seed == seed)),
                       key=lambda c: c.seed)
        if not found:
            raise LibraryError(f"the library has no classifier for '{spec}'; it has: {', '.join(self.references)}")
        return found[0]

    def model(self, name: str) -> LeNet5:
        """B(Y) by name, its weight file checked against the record's sha256 (loaded once)."""
        if name not in self._models:
            c = self.classifiers.get(name)
            if c is None:
                raise LibraryError(f"unknown classifier '{name}'; the library has: {', '.join(self.names)}")
            path = storage.resolve(self.path).join(c.weights)
            try:
                blob = path.read_bytes() if c.weights and path.is_file() else None
            except OSError as e:
                raise LibraryError(f"weight file {path} of '{name}' cannot be read ({one_line(e)})") from None
            if blob is None:
                raise LibraryError(f"weight file {path} of '{name}' is missing; re-run `simex train-bases` with "
                                   f"the same --out to rebuild it")
            if hashlib.sha256(blob).hexdigest() != c.sha256:
                raise LibraryError(f"weight file {path} of '{name}' is corrupted (sha256 mismatch); delete it and "
                                   f"re-run `simex train-bases`")
            if c.architecture not in ARCHITECTURES:
                raise LibraryError(f"'{name}' has architecture '{c.architecture}'; this simex reads "
                                   f"{', '.join(ARCHITECTURES)}")
            try:
                model = LeNet5(c.n_classes, c.image_format)
            except FormatError as e:
                raise LibraryError(f"'{name}' in {storage.resolve(self.path).join(FILE)} has a bad image format "
                                   f"({e})") from None
            try:
                model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any failure here is a bad file
                raise LibraryError(f"weight file {path} of '{name}' cannot be loaded ({type(e).__name__})") from None
            self._models[name] = model.eval()
        return self._models[name]

    def image_format(self, name: str) -> ImageFormat:
        """The format classifier ``name`` takes."""
        c = self.classifiers.get(name)
        if c is None:
            raise LibraryError(f"unknown classifier '{name}'; the library has: {', '.join(self.names)}")
        return ImageFormat.parse(c.image_format)

    def check_images(self, name: str, x) -> None:
        """A one-line :class:`FormatError` when images ``x`` (N, C, H, W) are not in ``name``'s format."""
        found, want = format_of(x), self.image_format(name)
        if found != want:
            raise FormatError(f"images are {found} but classifier '{name}' takes {want}; load them in its format "
                              f"(--image-format {want}) or convert them with simex_ray.formats.convert")

    def features(self, name: str, x, batch_size: int = 512) -> np.ndarray:
        """B(Y)'s penultimate features (the 84-dim FC layer after its activation): (N, 84) float64."""
        self.check_images(name, x)
        return penultimate_features(self.model(name), x, batch_size)

    def probabilities(self, name: str, x) -> np.ndarray:
        """B(Y)'s softmax over its own classes: (N, K) float64."""
        self.check_images(name, x)
        return predict_proba(self.model(name), x)

    @torch.no_grad()
    def logits(self, name: str, x, batch_size: int = 512) -> np.ndarray:
        """B(Y)'s pre-softmax outputs over its own classes (what energy and MaNo read): (N, K) float64."""
        from ..training import as_tensor

        self.check_images(name, x)
        model = self.model(name).eval()
        x = as_tensor(x)
        if len(x) == 0:
            return np.zeros((0, self.classifiers[name].n_classes))
        return torch.cat([model(b) for b in torch.split(x, batch_size)]).double().numpy()

    def select(self, names: Iterable[str]) -> "Library":
        names = list(names)
        unknown = [n for n in names if n not in self.classifiers]
        if unknown:
            raise LibraryError(f"unknown classifier(s) {', '.join(unknown)}; the library has: {', '.join(self.names)}")
        lib = Library(self.path, {n: self.classifiers[n] for n in names})
        lib._models = {n: m for n, m in self._models.items() if n in lib.classifiers}
        return lib


@torch.no_grad()
def penultimate_features(model: LeNet5, x, batch_size: int = 512) -> np.ndarray:
    """The input of the last linear layer (after its activation): what a linear probe on B(Y) sees."""
    from ..training import as_tensor

    model.eval()
    x = as_tensor(x)
    body = model.head[:-1]  # Flatten, FC120, act, FC84, act
    if len(x) == 0:
        return np.zeros((0, model.head[-1].in_features))
    return torch.cat([body(model.forward_features(b)) for b in torch.split(x, batch_size)]).double().numpy()

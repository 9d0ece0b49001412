"""Pair the classes of an unknown dataset X with the classes of a reference Y (Ray-free).

The paper (arXiv 2001.04893, section 5.3) borrows samples for a small
training set class by class: each class c_i of X is paired with the class
c_k of Y that is most similar to it, and the pairs are fixed greedily:

1. compute the class-to-class distance matrix D[i, k];
2. take the smallest remaining D[i, k] and fix (i, k);
3. strike row i and column k; go on in increasing order of D.

Three distances, one matrix shape (rows: X's classes, columns: Y's classes):

* ``simex``: Δ(c_i^X | A(c_k^Y)), the mean reconstruction error of X's
  class-i samples through the per-class autoencoder of Y's class k;
* ``sample-mse``: mean per-pixel squared distance (MSE) between random pairs
  of samples, one from c_i^X and one from c_k^Y (the paper's sample-space
  baseline);
* ``embeddings``: distance between the codes of the two classes in the
  bottleneck of the whole-dataset autoencoder A(Y) (mean nearest-code
  distance, as :func:`simex_ray.distances.embedding_distance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .distances import embedding_codes, nearest_code_distance, sample_distance
from .choices import PAIRING_METHODS
from .errors import UserError

__all__ = ["METHODS", "Pairing", "class_matrix", "greedy_pairs", "per_class_reference"]

METHODS = PAIRING_METHODS


def greedy_pairs(matrix) -> list[tuple[int, int, float]]:
    """The paper's greedy pairing of a distance matrix (rows i, columns k), smallest first.

    Returns ``(i, k, D[i, k])`` in the order the pairs were fixed; each row and
    each column is used at most once, so there are min(rows, columns) pairs.
    Ties go to the smaller (i, k). NaN entries are never paired.
    """
    d = np.asarray(matrix, dtype=float)
    if d.ndim != 2:
        raise UserError(f"pairing needs a 2-d distance matrix, got shape {d.shape}")
    order = sorted(((float(d[i, k]), i, k) for i in range(d.shape[0]) for k in range(d.shape[1])
                    if math.isfinite(d[i, k])))
    used_i, used_k, pairs = set(), set(), []
    for value, i, k in order:
        if i in used_i or k in used_k:
            continue
        used_i.add(i)
        used_k.add(k)
        pairs.append((i, k, value))
    return pairs


@dataclass
class Pairing:
    """A class-to-class distance matrix and its greedy pairs."""

    method: str
    unknown_classes: list[str]  # rows
    reference_classes: list[str]  # columns
    matrix: np.ndarray  # (rows, columns), smaller = more similar
    reference: str = ""
    loss: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[int, int, float]]:
        return greedy_pairs(self.matrix)

    def mapping(self) -> dict[str, str]:
        """{unknown class: paired reference class}."""
        return {self.unknown_classes[i]: self.reference_classes[k] for i, k, _ in self.pairs}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "reference": self.reference, "loss": self.loss,
            "unknown_classes": self.unknown_classes, "reference_classes": self.reference_classes,
            "matrix": np.asarray(self.matrix, dtype=float).tolist(),
            "pairs": [{"order": n, "unknown": self.unknown_classes[i], "reference": self.reference_classes[k],
                       "distance": v} for n, (i, k, v) in enumerate(self.pairs, 1)],
            **self.info,
        }


def per_class_reference(members: Mapping[str, Any], reference: str | None = None) -> tuple[str, list[str], list[str]]:
    """(reference spec, member names, class names) of one per-class reference in a fleet, in class order.

    ``members``: the fleet's {name: Member}. A fleet holding per-class members of
    several references needs ``reference``; a fleet without per-class members,
    or an unknown ``reference``, is a one-line ``ValueError`` that names the fix.
    """
    by_spec: dict[str, list[Any]] = {}
    for m in members.values():
        if m.class_ is not None:
            by_spec.setdefault(m.spec, []).append(m)
    if not by_spec:
        raise UserError("the fleet is not per-class (no member selects a class); train one with "
                         "`simex train --per-class --refs SPEC --out DIR`")
    if reference is None:
        if len(by_spec) > 1:
            raise UserError(f"the fleet holds per-class members of several references ({', '.join(by_spec)}); "
                             f"choose one with --ref")
        reference = next(iter(by_spec))
    if reference not in by_spec:
        raise UserError(f"the fleet has no per-class members of '{reference}'; it has: {', '.join(by_spec)}")
    chosen = by_spec[reference]
    if len(chosen) < 2:
        raise UserError(f"the fleet has a single class of '{reference}'; pairing needs at least 2")
    return reference, [m.name for m in chosen], [m.class_ for m in chosen]


def class_matrix(method: str, unknown: Sequence[np.ndarray], *, engine=None, members: Sequence[str] = (),
                 loss: str | None = None, reference: Sequence[np.ndarray] = (), autoencoder=None,
                 n_pairs: int = 2000, max_samples: int = 1000, seed: int = 0) -> np.ndarray:
    """D[i, k] between unknown class i and reference class k (smaller = more similar).

    ``unknown``: one (N_i, 1, 28, 28) array per unknown class. ``simex`` needs
    ``engine`` (a :class:`~simex_ray.scoring.ScoringEngine`) and ``members``
    (the per-class members, in reference class order); ``sample-mse`` needs
    ``reference`` (one array per reference class); ``embeddings`` needs
    ``reference`` and ``autoencoder`` (A(Y), with ``encode``).
    """
    if method not in METHODS:
        raise UserError(f"unknown pairing method '{method}'; known: {', '.join(METHODS)}")
    for i, x in enumerate(unknown):
        if len(x) == 0:
            raise UserError(f"unknown class {i} has no samples")
    if method == "simex":
        if engine is None or not members:
            raise UserError("simex pairing needs the per-class fleet's engine and members")
        return np.stack([engine.per_sample(x, list(members), loss).mean(axis=1) for x in unknown])
    if not len(reference):
        raise UserError(f"{method} pairing needs the reference classes' samples")
    if method == "sample-mse":
        return np.array([[sample_distance(x, r, "mse", n_pairs=n_pairs, seed=seed) for r in reference]
                         for x in unknown])
    if autoencoder is None:
        raise UserError("embeddings pairing needs the whole-dataset autoencoder A(Y)")
    # Every class encoded once (not once per pair): the same numbers as embedding_distance per pair
    # whenever no set is over max_samples.
    codes_u = [embedding_codes(autoencoder, x, max_samples=max_samples, rng=np.random.default_rng(seed))
               for x in unknown]
    codes_r = [embedding_codes(autoencoder, r, max_samples=max_samples, rng=np.random.default_rng(seed + 1))
               for r in reference]
    return np.array([[nearest_code_distance(cu, cr) for cr in codes_r] for cu in codes_u])


def reference_class_samples(members: Mapping[str, Any], names: Sequence[str], *, samples: int | None,
                            data_seed: int | None, data_dir=None, cache: dict | None = None) -> list[np.ndarray]:
    """The training images of each per-class member in ``names``: the reference side of sample-space pairing.

    Re-derived with the per-class split the fleet was trained with (``samples``
    and ``data_seed`` from its manifest); a member whose images differ from
    what it was trained on (changed data under the same spec) is an error.
    """
    from . import data

    first = members[names[0]]
    seed = data_seed if data_seed is not None else (first.data_seed or 0)
    parts = {p.spec: p for p in data.prepare_by_class(first.spec, samples=samples, seed=seed, data_dir=data_dir,
                                                     cache=cache)}
    out = []
    for name in names:
        part = parts.get(name)
        if part is None:
            raise UserError(f"'{first.spec}' has no class for member '{name}' any more; its data changed")
        if members[name].fingerprint and data.fingerprint(part.train) != members[name].fingerprint:
            raise UserError(f"member '{name}' was trained on other images than '{first.spec}' gives now "
                             f"(samples {samples}, data seed {seed}); its data changed since training")
        out.append(part.train.x)
    return out


def pair(fleet, unknown: Sequence[np.ndarray], unknown_classes: Sequence[str], *, method: str = "simex",
         reference: str | None = None, loss: str | None = None, autoencoder=None,
         reference_samples: Sequence[np.ndarray] | None = None, seed: int = 0) -> Pairing:
    """Pair ``unknown`` classes with the per-class members of ``fleet`` (a :class:`~simex_ray.fleet.Fleet`).

    ``reference_samples`` (one array per reference class, class order) are
    needed by ``sample-mse`` and ``embeddings``; ``autoencoder`` (A(Y)) by
    ``embeddings``.
    """
    ref, names, classes = per_class_reference(fleet.members, reference)
    matrix = class_matrix(method, unknown, engine=fleet.engine, members=names, loss=loss,
                          reference=reference_samples or (), autoencoder=autoencoder, seed=seed)
    used_loss = (loss or fleet.members[names[0]].loss) if method == "simex" else None
    return Pairing(method, list(unknown_classes), classes, matrix, reference=ref, loss=used_loss,
                   info={"n_unknown": [int(len(x)) for x in unknown]})


def unknown_classes(ds, samples: int | None, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """One image array per class of ``ds`` (label order), each capped at ``samples`` (seeded)."""
    from . import data

    if ds.y is None:
        raise data.SpecError(f"'{ds.spec}' has no labels; pairing matches classes, so the unknown data must be "
                             f"labelled (npz key 'y', a 'label' column, or one folder per class)")
    if samples is not None and samples < 1:
        raise data.SpecError(f"--samples must be a positive integer, got {samples}")
    xs, names = [], data.classes_of(ds)
    if ds.classes and len(names) < len(ds.classes):
        empty = [c for c in ds.classes if c not in names]
        raise data.SpecError(f"'{ds.spec}': class(es) {', '.join(empty)} have no samples; every class needs at "
                             f"least one to be paired (remove the empty class or add samples)")
    for label in np.unique(ds.y).tolist():
        idx = np.nonzero(ds.y == label)[0]
        if samples is not None and len(idx) > samples:
            idx = np.sort(np.random.default_rng(seed).choice(idx, size=samples, replace=False))
        xs.append(ds.x[idx])
    return xs, names


def whole_dataset_autoencoder(path: str, reference: str, device):
    """A(Y) from the fleet at ``path``: its member named exactly ``reference`` (not per-class)."""
    from .fleet import Fleet, read_manifest

    names = [m["name"] for m in read_manifest(path)["members"]]
    if reference not in names:
        raise UserError(f"--ae {path} has no whole-dataset member '{reference}' (it has: {', '.join(names)}); "
                         f"train one with `simex train --refs {reference} --out DIR`")
    return Fleet.load(path, names=[reference], device=device).models[reference]

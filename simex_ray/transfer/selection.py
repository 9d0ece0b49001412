"""Which pretrained classifier should I transfer from? Every method scores every classifier of a library
for one dataset, higher = better (Ray-free).

``simex`` is label-free: -Δ(X | A(Y)) through the fleet member of the classifier's reference Y. The
transferability estimators of :mod:`.estimators` read the frozen classifier B(Y)'s penultimate features,
softmax or logits on X; most need X's labels (LogME, LEEP, NCE, H-score, GBC, k-NN, SFDA, NCTI, PARC,
TransRate, N-LEEP), five do not (entropy, nuclear norm, silhouette, energy, MaNo). Forward passes are
shared: each classifier runs over X once (``Library.outputs``: features, softmax and logits together),
whatever the number of methods. A score defined across candidates (NCTI) is combined over the
classifiers scored together, after all of them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .estimators import ESTIMATORS, combine_scores, raw_score
from .features import pixel_features
from .library import Library
from ..choices import SELECTION_METHODS
from ..errors import UserError

SIMEX = "simex"
METHODS = SELECTION_METHODS  # simex, then every estimator, in registry order (tests/test_cli.py checks)


def needs_labels(method: str) -> bool:
    return method != SIMEX and ESTIMATORS[method].needs_labels


def available_methods(*, labelled: bool, fleet: bool) -> list[str]:
    """Every method the data and the deployment allow: label-using ones only with labels, simex only
    with a fleet."""
    return [m for m in METHODS if (m != SIMEX or fleet) and (labelled or not needs_labels(m))]


def check_methods(methods: Sequence[str], *, labelled: bool, fleet: bool) -> list[str]:
    """The methods, validated: an unknown one, a label-using one without labels, or simex without a fleet
    is a one-line error naming the fix."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}, all")
    if not labelled and (using := [m for m in methods if needs_labels(m)]):
        free = [m for m in METHODS if not needs_labels(m)]
        raise UserError(f"method(s) {', '.join(using)} need the data's labels, and it has none; label it (npz key "
                         f"'y', a 'label' column, one folder per class) or use a label-free method: "
                         f"{', '.join(free)}")
    if SIMEX in methods and not fleet:
        raise UserError("method simex needs the fleet of autoencoders of the library's references: pass --fleet")
    return methods


@dataclass
class Selection:
    """Scores of every classifier under every method for one dataset; higher = better transfer."""

    scores: dict[str, dict[str, float]]  # method -> classifier -> score
    seconds: dict[str, float]  # method -> wall time for all classifiers (its share of forward passes included)
    n: int
    labelled: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def ranking(self, method: str) -> list[str]:
        s = self.scores[method]
        return sorted(s, key=lambda c: (-s[c] if np.isfinite(s[c]) else np.inf, c))

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "labelled": self.labelled,
                "ranking": {m: self.ranking(m) for m in self.scores},
                "scores": {m: {c: (float(v) if np.isfinite(v) else None) for c, v in s.items()}
                           for m, s in self.scores.items()},
                "needs_labels": {m: needs_labels(m) for m in self.scores},
                "seconds": self.seconds, **self.extra}


def select(library: Library, x: np.ndarray | Mapping[str, np.ndarray] | None, y: np.ndarray | None = None, *,
           methods: Sequence[str] = METHODS, classifiers: Sequence[str] | None = None, fleet=None,
           loss: str | None = None, deltas: dict[str, float] | None = None,
           options: dict[str, dict[str, Any]] | None = None, outputs: Callable[[str], Any] | None = None,
           baseline: bool = True) -> Selection:
    """Score ``classifiers`` (default: every one in ``library``) for images ``x`` (N, C, H, W) with labels
    ``y`` (needed by the label-using methods). ``x``: one array in the classifiers' format, or, for a library
    of several formats, the same N images in each (``{str(format): array}``; the fleet's format too for
    ``simex``). ``fleet``: a :class:`~simex_ray.fleet.Fleet` whose members are named by the classifiers'
    reference specs (for ``simex``), or ``deltas``: Δ(X | A(spec)) already computed (e.g. by a Serve layout).
    ``options``: per-method keyword options. ``outputs``: classifier name -> its
    :class:`~simex_ray.transfer.features.ClassifierOutputs` on X (through the feature cache, or computed on
    Ray; ``x`` may then be None unless simex runs); default: one forward pass of each classifier here
    (features, softmax and logits), whatever the number of methods. ``baseline``: also score "no source
    model" (:func:`no_transfer`, which reads the pixels: only when ``x`` is given) and say, per method,
    whether any classifier beats it."""
    methods = check_methods(methods, labelled=y is not None, fleet=fleet is not None or deltas is not None)
    names = list(classifiers) if classifiers is not None else library.names
    options = options or {}
    scores = {m: {} for m in methods}
    seconds = {m: 0.0 for m in methods}
    estimators = [m for m in methods if m != SIMEX]
    images = (lambda fmt: x[str(fmt)]) if isinstance(x, Mapping) else (lambda fmt: x)
    n = (outputs(names[0]).n if x is None else len(next(iter(x.values()))) if isinstance(x, Mapping)
         else len(x))
    if SIMEX in methods:
        t0 = time.perf_counter()
        specs = list(dict.fromkeys(library.classifiers[c].spec for c in names))
        missing = [s for s in specs if s not in (fleet.members if fleet is not None else deltas)]
        own = [s for s in missing if s in library.classifiers]  # added without --source: its own reference
        if own:
            raise UserError(f"classifier(s) {', '.join(own)} have no reference dataset for simex; add them again "
                             f"with `simex library add ... --source SPEC`, or leave simex out of --method")
        if missing:
            raise UserError(f"the fleet has no member for {', '.join(missing)}; train one with "
                             f"`simex train --refs {','.join(missing)}`")
        if fleet is not None:
            by_spec = dict(zip(specs, fleet.engine.per_sample(images(fleet.image_format), specs, loss).mean(axis=1)))
        else:
            by_spec = {s: deltas[s] for s in specs}
        scores[SIMEX] = {c: -float(by_spec[library.classifiers[c].spec]) for c in names}
        seconds[SIMEX] = time.perf_counter() - t0
    needs = {ESTIMATORS[m].needs for m in estimators}
    for c in names:
        if not estimators:
            break
        t0 = time.perf_counter()
        if outputs is not None:
            record = outputs(c)
            feats, probs, logits = record.features, record.probabilities, record.logits
        else:
            feats, probs, logits = library.outputs(c, images(library.image_format(c)), features="features" in needs)
        forward = time.perf_counter() - t0
        for m in estimators:
            t1 = time.perf_counter()
            scores[m][c] = raw_score(m, features=feats, probs=probs, logits=logits, labels=y, **options.get(m, {}))
            seconds[m] += time.perf_counter() - t1 + forward
    for m in estimators:  # scores defined across the candidates (NCTI) once every classifier has its terms
        t1 = time.perf_counter()
        scores[m] = combine_scores(m, scores[m])
        seconds[m] += time.perf_counter() - t1
    selection = Selection(scores, seconds, int(n), y is not None)
    if baseline and estimators and x is not None:
        selection.extra["no_transfer"] = no_transfer(selection, images(library.image_format(names[0])), y, options)
    return selection


def top_references(library: Library, ranking: Sequence[str], k: int) -> list[str]:
    """The best-ranked classifier of each of the first ``k`` references in ``ranking`` (best first): what
    ``--verify K`` transfers, so that K seeds or variants of one reference never fill the K places."""
    best: dict[str, str] = {}
    for name in ranking:
        best.setdefault(library.classifiers[name].spec, name)
        if len(best) == k:
            break
    return list(best.values())


def verify(library: Library, candidates: Sequence[str], spec: str, *, samples: int | None, data_seed: int,
           data_dir=None, protocol=None, tl_configs: Sequence[str] | None = None, map_fn=None,
           on_progress=None, baseline: bool = True) -> dict[str, Any]:
    """The ground truth on demand: transfer each candidate classifier to ``spec`` for real.

    Each candidate B(Y) is transferred under the protocol's transfer settings (default: the ``default``
    preset, every TL config of it) with its classifier seed, on ``spec``'s labelled splits read in the
    candidate's image format; the score is the mean held-out accuracy. A LeNet-5 takes the paper's
    protocol (:func:`~.learning.transfer`); any other network gets a fresh final Linear for X's classes
    trained on its frozen features (:func:`~.learning.transfer_head`, the same optimizer, epochs, patience
    and batch size). ``map_fn`` runs the transfers (e.g. as Ray tasks). ``baseline``: also train the same
    head on the raw pixels (:func:`~.learning.pixel_probe`, the first candidate's format): no transfer.
    Returns ``{"accuracy": {classifier: acc}, "ranking": best first, "best": ..., "protocol": ..., "seconds":
    ..., "no_transfer_accuracy": ..., "transfer_helped": best accuracy > no_transfer_accuracy}``.
    """
    from ..protocol import DEFAULT, load_splits, run_units
    from .learning import pixel_probe, tl_config, transfer, transfer_head
    from .zoo import LENET, weight_suffix

    protocol = protocol or DEFAULT
    t0 = time.perf_counter()
    splits: dict[str, Any] = {}
    configs = list(tl_configs or protocol.tl_configs)
    units: dict[Any, list[tuple[str, dict[str, Any]]]] = {transfer: [], transfer_head: []}  # fn -> (name, kwargs)
    for name in candidates:
        c = library.classifiers[name]
        fmt = str(library.image_format(name))
        if fmt not in splits:
            splits[fmt] = load_splits(spec, samples=samples, data_seed=data_seed, data_dir=data_dir,
                                      protocol=dataclasses.replace(protocol, image_format=fmt))
        data = splits[fmt].clf_kwargs(protocol.transfer_samples)
        common = dict(**data, max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
                      batch_size=protocol.clf_batch_size, seed=c.seed)
        if c.architecture == LENET:  # one unit per TL config, the paper's protocol
            state = {k: v.detach().clone().cpu() for k, v in library.model(name).state_dict().items()}
            units[transfer] += [(name, dict(base_state=state, config=tl_config(cfg), fc_init=protocol.fc_init,
                                            fc_layers=protocol.fc_layers, **common)) for cfg in configs]
        else:  # one unit for every TL config: the frozen network's features are read once
            base = {"architecture": c.architecture, "n_classes": c.n_classes, "image_format": fmt,
                    "weights": library.weight_bytes(name), "suffix": weight_suffix(c.weights, c.architecture),
                    "mean": c.mean, "std": c.std, "layer": c.layer}
            units[transfer_head].append((name, dict(base=base, configs=configs, **common)))
    if baseline:  # no source model: the head on the pixels of the first candidate's format, once
        first = splits[str(library.image_format(candidates[0]))].clf_kwargs(protocol.transfer_samples)
        units[pixel_probe] = [(None, dict(**first, configs=configs, max_epochs=protocol.clf_max_epochs,
                                          patience=protocol.clf_patience, batch_size=protocol.clf_batch_size))]
    accuracy: dict[str, float] = {name: 0.0 for name in candidates}
    extra: dict[str, Any] = {}
    for fn, todo in units.items():
        if not todo:
            continue
        results = run_units(fn, [kw for _, kw in todo], stage="verify", map_fn=map_fn, on_progress=on_progress)
        for (name, _), r in zip(todo, results):  # transfer: one config's accuracy; transfer_head: their mean
            if fn is pixel_probe:
                extra["no_transfer_accuracy"] = r["accuracy"]
                continue
            accuracy[name] += r["accuracy"] / (len(configs) if fn is transfer else 1)
    ranking = sorted(accuracy, key=lambda n: (-accuracy[n], n))
    if extra:
        extra["transfer_helped"] = accuracy[ranking[0]] > extra["no_transfer_accuracy"]
    return {"accuracy": accuracy, "ranking": ranking, "best": ranking[0], "tl_configs": configs,
            "transfer_samples": protocol.transfer_samples, "seconds": time.perf_counter() - t0, **extra}


# --- "should I transfer at all?" -------------------------------------------------------------------

def no_transfer(selection: Selection, x: np.ndarray, y: np.ndarray | None,
                options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The score of "no source model" under each estimator of ``selection``, computed the same way, and
    whether any classifier beats it.

    No source model means: features = the raw pixels (:func:`pixel_features`), and source predictions that
    say nothing (one constant source class, so LEEP and NCE give -H(Y)). Estimators that read only the
    source's predictions without labels (entropy, nuclear norm, energy, MaNo), and those scored across the
    candidates (NCTI), have no such baseline (None). ``transfer_helps`` is the verdict of the first method
    of the selection that has one: False when no classifier scores above the baseline, which is the
    warning "transfer may not help; a network trained from scratch may do as well".
    """
    options = options or {}
    feats = pixel_features(x)
    constant = np.ones((len(x), 1))
    scores: dict[str, float | None] = {}
    beaten: dict[str, bool | None] = {}
    for m in selection.scores:
        est = ESTIMATORS.get(m)
        if est is None or est.combine is not None or (est.needs != "features" and not est.needs_labels):
            scores[m] = beaten[m] = None
            continue
        value = raw_score(m, features=feats if est.needs == "features" else None,
                          probs=constant if est.needs != "features" else None, labels=y, **options.get(m, {}))
        scores[m] = float(value)
        beaten[m] = any(np.isfinite(v) and v > value for v in selection.scores[m].values())
    decided = [m for m in selection.scores if beaten.get(m) is not None]
    return {"features": f"raw pixels ({feats.shape[1]} values per image)", "scores": scores, "beaten": beaten,
            "method": decided[0] if decided else None,
            "transfer_helps": beaten[decided[0]] if decided else None}

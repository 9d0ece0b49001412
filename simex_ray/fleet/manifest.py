"""The fleet on disk: the manifest, content-addressed weight files, their integrity, and collection.

Directory layout::

    FLEET/manifest.json                   members, configs, fingerprints, metrics, sha256
    FLEET/weights/<member>-<sha16>.pt     one state_dict per member (torch.save), named by its content
    FLEET/weights/<member>_latent-<sha16>.pt  its latent moments (μ, P: :mod:`.latent`), named the same way
    FLEET/checkpoints/                    per-epoch training checkpoints (resume)

FLEET is a local path or a URI (``file://``, ``s3://``, ``gs://``): every read and write goes
through :mod:`simex_ray.storage` (``pyarrow.fs``). Writes are atomic on every filesystem
(local: temporary file + fsync + ``os.replace``; object stores: temporary key, then moved),
weights are written before the manifest that lists them, and loading verifies every weight
file's sha256 and uses ``torch.load(weights_only=True)``.

Retraining in place. A weight file's name carries the first 16 hex digits of its sha256, so a
retrained member gets a new file and never overwrites the one an older manifest lists: a reader
holding that manifest finds the bytes it expects, or no file at all, never different bytes. The
same weights get the same name and are not written again.

Collection, one generation of grace. After :func:`write_manifest` publishes a manifest it deletes
the weight files under ``weights/`` that neither the new manifest nor the one it replaced lists, so
a reader that read the previous manifest still finds its files. A reader further behind finds a file
gone; :meth:`Fleet.load` then re-reads the manifest and loads that member's current record (a few
times at most, and only while the manifest keeps changing), or fails with one line when the manifest
still lists the missing file or no longer has the member. Only names this module writes are
collected: ``<slug>-<sha16>.pt``, and the older ``<slug>.pt`` of a member either manifest has;
anything else (temporary files of writes in flight, a user's files) is kept. Weights written by this
process and not yet listed in a manifest are kept too (threads adding members), and nothing is
collected when the previous manifest cannot be read. Collection assumes one writing process per
fleet at a time, as the manifest itself does (it is rewritten whole).

Fleets whose manifest lists ``weights/<slug>.pt`` (written before content-hashed names) load as
before: the manifest holds each path. The format stays 1: the ``weights`` field is still a path
relative to the fleet, which readers without this change read the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import storage
from ..errors import FleetError, one_line
from ..formats import LEGACY, ImageFormat

log = logging.getLogger("simex_ray.fleet")

MANIFEST = "manifest.json"
WEIGHTS = "weights"
FORMAT_VERSION = 1
HASH_CHARS = 16  # of the sha256 in a weight file's name
RELOADS = 3  # re-reads of the manifest while loading a member whose file was collected

_HASHED = re.compile(rf"^[A-Za-z0-9_-][A-Za-z0-9._-]*-[0-9a-f]{{8}}-[0-9a-f]{{{HASH_CHARS}}}\.pt$")
_manifest_lock = threading.Lock()
_unpublished: set[str] = set()  # weight files this process wrote that no manifest lists yet


class StaleWeightsError(FleetError):
    """A member's weight file is missing or differs from the manifest's sha256: the fleet may have
    been retrained since the manifest was read (:meth:`Fleet.load` reads it again)."""


@dataclass
class Member:
    """One reference part and its trained autoencoder's record in the manifest."""

    name: str  # the reference spec, with '#class' for per-class members
    spec: str  # the reference spec without the class selector
    config: dict[str, Any]  # resolved TrainConfig
    fingerprint: str  # sha256 of the reference training data
    weights: str = ""  # path relative to the fleet directory
    sha256: str = ""
    class_: str | None = None
    data_seed: int | None = None  # drew the member's samples, split and variant images (config["seed"]: the model's)
    n_train: int = 0
    n_test: int = 0
    # the 5:1 train/test rule (docs/specs.md): "row-hash" (a whole dataset) or "stratified" (a --samples draw,
    # a per-class part, and every member of a fleet trained before the rule was recorded)
    split: str = "stratified"
    metrics: dict[str, float] = field(default_factory=dict)  # train_delta, test_delta, ref_mean_l2, ...
    history: list[dict] = field(default_factory=list)
    # The member's own held-out δ distribution: {"quantiles": 101 values at 0%, 1%, ..., 100%,
    # "mean": Δ(Y_test | A(Y)), "n": test images}; empty for fleets trained before it existed.
    calibration: dict[str, Any] = field(default_factory=dict)
    # The member's latent moments (:mod:`.latent`): {"file": the content-addressed file of μ and P beside
    # the weights, "sha256", "dim": D, "n_fit": training codes fitted, "own_mean": mean z of its own held-out
    # split, "n": held-out images, "estimator"}; empty for fleets trained before it existed.
    latent: dict[str, Any] = field(default_factory=dict)
    # The member's cross sketch (:func:`~.mixture.cross_sketches`): every reference's held-out δ through it, on a
    # grid, for the composition by distribution matching: {"grid", "cdf": {reference: ...}, "nearest":
    # {reference: ...}}; computed once the fleet's member set is final; empty before (the nearest rule).
    cross_sketch: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return self.config["loss"]

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def image_format(self) -> ImageFormat:
        """The member's format; a record that names none (a fleet from before formats) is 1×28×28."""
        return record_format({"config": self.config})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["class"] = d.pop("class_")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Member":
        """A manifest record; keys that are not Member fields (added by a caller) are ignored."""
        d = dict(d)
        d["class_"] = d.pop("class", None)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def common_format(members: Iterable[Member | dict], hint: str = "score each format's members on their own with "
                                                                  "--members") -> ImageFormat:
    """The one image format of ``members`` (Members or manifest records; none: 1x28x28); a one-line FleetError
    naming each format's members, and ``hint``, when they mix formats. The one rule of `simex score`, Serve and
    batch scoring."""
    formats: dict[ImageFormat, list[str]] = {}
    for m in members:
        name, fmt = (m["name"], record_format(m)) if isinstance(m, dict) else (m.name, m.image_format)
        formats.setdefault(fmt, []).append(name)
    if len(formats) > 1:
        found = "; ".join(f"{f}: {', '.join(names)}" for f, names in sorted(formats.items(), key=lambda kv: str(kv[0])))
        raise FleetError(f"the fleet mixes image formats ({found}); {hint}")
    return next(iter(formats), LEGACY)


def common_loss(members: Iterable[Member]) -> str:
    """The one loss of ``members``, or "mixed" (each member then scores with its own)."""
    losses = sorted({m.loss for m in members})
    return losses[0] if len(losses) == 1 else "mixed"


def record_format(record: dict) -> ImageFormat:
    """The image format of a manifest record (only its config is read); none recorded: 1×28×28."""
    return ImageFormat.parse((record.get("config") or {}).get("image_format", LEGACY))


def slug(name: str) -> str:
    """A file-system-safe, unique file stem for a member name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-60:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def sha256_file(path: storage.PathLike) -> str:
    """sha256 of a file: a local path, a URI or a :class:`~simex_ray.storage.Location`."""
    return storage.resolve(path).sha256()


def atomic_write_bytes(path: storage.PathLike, data: bytes) -> None:
    """Replace a file (a local path, a URI or a Location) atomically on its filesystem."""
    storage.resolve(path).write_bytes_atomic(data)


def write_state(directory: storage.PathLike, name: str, state_dict: dict[str, torch.Tensor],
                on_path=None) -> tuple[str, str]:
    """Write a state_dict atomically under ``directory/weights``, named by its sha256: (relative path,
    sha256). A file of that name and size already holds these bytes, so it is not written again.
    ``on_path(location)`` is called before the file exists (fleets register it against collection).
    The one content-addressed write of fleets and classifier libraries."""
    buf = io.BytesIO()
    torch.save({k: torch.as_tensor(v).detach().cpu() for k, v in state_dict.items()}, buf)
    return write_blob(directory, name, buf.getvalue(), on_path=on_path)


def write_blob(directory: storage.PathLike, name: str, blob: bytes, suffix: str = ".pt",
               on_path=None) -> tuple[str, str]:
    """Write the bytes of a weight file atomically as ``directory/weights/<slug>-<sha16><suffix>``: (relative
    path, sha256); not again when a file of that name and size is there (:func:`write_state`'s rule)."""
    digest = hashlib.sha256(blob).hexdigest()
    rel = f"{WEIGHTS}/{slug(name)}-{digest[:HASH_CHARS]}{suffix}"
    path = storage.resolve(directory).join(rel)
    if on_path is not None:
        on_path(path)
    if path.size() != len(blob):  # None when there is no such file
        path.write_bytes_atomic(blob)
    return rel, digest


def save_weights(fleet_dir: storage.PathLike, member: Member, state_dict: dict[str, torch.Tensor]) -> Member:
    """Write one member's weights (:func:`write_state`); fills ``member.weights`` and ``sha256``.

    Publish the manifest that lists them (:func:`write_manifest`) only after this returns.
    """
    def unpublished(path):
        with _manifest_lock:  # before the file exists, so a collection in another thread keeps it
            _unpublished.add(path.path)

    member.weights, member.sha256 = write_state(fleet_dir, member.name, state_dict, on_path=unpublished)
    return member


def save_moments(fleet_dir: storage.PathLike, member: Member, mean, precision) -> Member:
    """Write one member's latent moments (μ (D,), P (D, D)) as a content-addressed file beside its weights
    (:func:`write_state`, name ``<member>#latent``); fills ``member.latent``'s ``file`` and ``sha256``.
    Publish the manifest only after this returns (as with :func:`save_weights`)."""
    def unpublished(path):
        with _manifest_lock:
            _unpublished.add(path.path)

    state = {"mean": torch.as_tensor(mean, dtype=torch.float64),
             "precision": torch.as_tensor(precision, dtype=torch.float64)}
    member.latent["file"], member.latent["sha256"] = write_state(fleet_dir, f"{member.name}#latent", state,
                                                                 on_path=unpublished)
    return member


def read_moments(fleet_dir: storage.PathLike, member: Member) -> tuple[Any, Any] | None:
    """(μ, P) of a member's latent moments as float64 numpy arrays, checked against the record's sha256
    (:class:`StaleWeightsError` when the file is missing or differs); None for a member without them."""
    if not member.latent.get("file"):
        return None
    blob = read_weights(fleet_dir, _moments_record(member))
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        return state["mean"].numpy(), state["precision"].numpy()
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        path = storage.resolve(fleet_dir).join(member.latent["file"])
        raise FleetError(f"latent moments {path} of member '{member.name}' cannot be loaded ({type(e).__name__}); "
                         f"delete it and re-run `simex train`") from None


def _moments_record(member: Member) -> Member:
    """``member`` with its moments file as its weights: the one integrity check of both files."""
    return Member(name=member.name, spec=member.spec, config=member.config, fingerprint=member.fingerprint,
                  weights=member.latent["file"], sha256=member.latent.get("sha256", ""))


def member_files(record: dict[str, Any]) -> list[str]:
    """The files a manifest record lists, relative to the fleet: its weights and its latent moments."""
    latent = record.get("latent") or {}
    return [f for f in (record.get("weights"), latent.get("file")) if f]


def _stale(path: storage.Location, member: Member, missing: bool) -> StaleWeightsError:
    if missing:
        return StaleWeightsError(f"weight file {path} of member '{member.name}' is missing; "
                                 f"re-run `simex train` with the same --out to rebuild it")
    return StaleWeightsError(f"weight file {path} of member '{member.name}' is corrupted (sha256 mismatch); "
                             f"delete it and re-run `simex train` with the same --out")


def _unreadable(path: storage.Location, member: Member, e: OSError) -> FleetError:
    return FleetError(f"weight file {path} of member '{member.name}' cannot be read ({one_line(e)}); "
                      f"check the path and its credentials")


def read_weights(fleet_dir: storage.PathLike, member: Member) -> bytes:
    """The bytes of ``member``'s weight file, checked against the record's sha256 in the same read (the
    bytes checked are the bytes returned); :class:`StaleWeightsError` when missing or different."""
    path = storage.resolve(fleet_dir).join(member.weights)
    try:
        blob = path.read_bytes() if member.weights and path.is_file() else None
    except FileNotFoundError:  # collected between the check and the read
        blob = None
    except OSError as e:
        raise _unreadable(path, member, e) from None
    if blob is None:
        raise _stale(path, member, missing=True)
    if hashlib.sha256(blob).hexdigest() != member.sha256:
        raise _stale(path, member, missing=False)
    return blob


def verify_weights(fleet_dir: storage.PathLike, member: Member) -> None:
    """Check that ``member``'s weight file exists and matches its sha256, hashing it as a stream (no
    model built, the file never held whole); raises like :func:`read_weights`."""
    path = storage.resolve(fleet_dir).join(member.weights)
    try:
        digest = path.sha256() if member.weights and path.is_file() else None
    except FileNotFoundError:
        digest = None
    except OSError as e:
        raise _unreadable(path, member, e) from None
    if digest is None:
        raise _stale(path, member, missing=True)
    if digest != member.sha256:
        raise _stale(path, member, missing=False)


def verify_fleet(fleet_dir: storage.PathLike) -> dict[str, Any]:
    """Read the manifest once and check every weight file it lists (present, sha256 equal; bytes hashed,
    no model built): the manifest a deployment hands on as it is, so what is served is what was checked.

    When a file was collected because the fleet was retrained meanwhile, the new manifest is read and
    checked instead (a few times at most, only while it keeps changing)."""
    loc = storage.resolve(fleet_dir)
    for attempt in range(RELOADS + 1):
        manifest = read_manifest(loc)
        if not manifest["members"]:
            raise FleetError(f"{loc.join(MANIFEST)} lists no members; train some with `simex train`")
        try:
            for record in manifest["members"]:
                member = Member.from_json(record)
                verify_weights(loc, member)
                if member.latent.get("file"):
                    verify_weights(loc, _moments_record(member))
            return manifest
        except StaleWeightsError:
            if attempt == RELOADS or read_manifest(loc) == manifest:
                raise  # the manifest still lists that very file: it is missing or damaged
    raise AssertionError("unreachable")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def read_manifest(fleet_dir: storage.PathLike) -> dict[str, Any]:
    loc = storage.resolve(fleet_dir)
    path = loc.join(MANIFEST)
    try:
        if not loc.is_dir():
            raise FleetError(f"fleet directory {loc} does not exist; create one with `simex train --out {loc}`")
        if not path.is_file():
            raise FleetError(f"{path} is missing; {loc} is not a fleet (create one with `simex train`)")
        text = path.read_text()
        for _ in range(3 if not loc.is_local else 0):  # a read torn by a concurrent publish: read again
            if _parses(text):
                break
            time.sleep(0.05)
            text = path.read_text()
    except OSError as e:  # unreachable store, no permission, ...
        raise FleetError(f"cannot read {path} ({one_line(e)}); check the path and its credentials") \
            from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FleetError(f"{path} is corrupted ({e}); re-run `simex train` to rewrite it") from None
    if not isinstance(manifest, dict) or "members" not in manifest:
        raise FleetError(f"{path} has no 'members'; re-run `simex train` to rewrite it")
    version = manifest.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FleetError(f"{path} has format {version}, newer than this simex reads ({FORMAT_VERSION}); "
                         f"upgrade simex-ray, or retrain the fleet with this version")
    return manifest


def write_manifest(fleet_dir: storage.PathLike, members: Iterable[Member], **extra: Any) -> Path | str:
    """Publish the manifest atomically: call it after every weight file it lists is written.

    Then collects the weight files neither it nor the manifest it replaced lists (module docstring).
    Returns its path (a Path for a local fleet, the URI otherwise)."""
    members = list(members)
    manifest = {
        "format": FORMAT_VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loss": common_loss(members),
        "members": [m.to_json() for m in members],
        **extra,
    }
    fleet = storage.resolve(fleet_dir)
    loc = fleet.join(MANIFEST)
    with _manifest_lock:
        previous = _previous_members(fleet)
        loc.write_bytes_atomic((json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
        listed = [m.to_json() for m in members]
        _unpublished.difference_update(fleet.join(f).path for m in listed for f in member_files(m))
        if previous is not None:
            collect_weights(fleet, listed + previous)
    return loc.user_path


def _previous_members(fleet: storage.Location) -> list[dict[str, Any]] | None:
    """The members of the manifest about to be replaced ([] when there is none); None when it
    cannot be read, so nothing is collected."""
    try:
        if not fleet.join(MANIFEST).exists():
            return []
        return list(read_manifest(fleet)["members"])
    except (FleetError, OSError) as e:
        log.warning("%s; weight files are not collected this time", one_line(e))
        return None


def collect_weights(fleet_dir: storage.PathLike, members: Iterable[dict[str, Any]]) -> list[str]:
    """Delete the weight files under ``weights/`` that no record in ``members`` (manifest records)
    lists, that this process is not about to publish, and whose name this module writes; returns
    their relative paths. A failed deletion is logged, never raised: the manifest is published."""
    fleet = storage.resolve(fleet_dir)
    members = list(members)
    listed = {posixpath.normpath(f) for m in members for f in member_files(m)}
    legacy = {f"{slug(m['name'])}.pt" for m in members if "name" in m}  # weights/<slug>.pt, older fleets
    removed = []
    try:
        names = fleet.join(WEIGHTS).listdir()
    except OSError as e:
        log.warning("cannot list %s (%s); weight files are not collected", fleet.join(WEIGHTS),
                    one_line(e))
        return removed
    for name in names:
        rel = f"{WEIGHTS}/{name}"
        path = fleet.join(rel)
        if rel in listed or path.path in _unpublished or not (_HASHED.match(name) or name in legacy):
            continue
        try:
            if path.is_file():
                path.remove()
                removed.append(rel)
        except OSError as e:
            log.warning("cannot remove unused weight file %s (%s)", path, one_line(e))
    if removed:
        log.info("%s: removed %d unused weight file(s)", fleet, len(removed))
    return removed


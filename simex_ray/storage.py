"""Where fleets live: a local path or a URI that pyarrow's filesystems understand (Ray-free).

``resolve("runs/f")``, ``resolve("file:///shared/f")``, ``resolve("s3://bucket/f")`` and
``resolve("gs://bucket/f")`` all give a :class:`Location` (a ``pyarrow.fs`` filesystem and a path
on it); every read and write of a fleet goes through it, so there is one code path for all of them
(a local path is ``LocalFileSystem``). Credentials and endpoints are pyarrow's: the usual
``AWS_*`` / ``GOOGLE_*`` environment variables, or query parameters in the URI
(``s3://bucket/f?endpoint_override=host:9000&scheme=http&region=us-east-1``).

Writes are atomic on every filesystem. Local: a temporary file in the same directory, fsync,
``os.replace``. Elsewhere (object stores): the bytes go to a temporary key next to the final one,
which is then moved (copied) onto the final key, so a reader sees the old object, the new one or
none, never a partial one. Whoever publishes several files (a fleet: weights, then the manifest
that lists them with their sha256) writes the index last.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pyarrow.fs as pafs

from .errors import one_line, UserError

TORN_READ_ATTEMPTS = 5  # reads of an object that keeps changing size before giving up


class TornReadError(OSError):
    """An object changed under every read of it (a concurrent overwrite): never returned half-old, half-new."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CHUNK = 1 << 20

# File system types (as /proc/mounts names them) whose files every node of a cluster can see.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "efs", "lustre", "cephfs", "ceph", "glusterfs", "beegfs", "gpfs", "cifs", "smb3",
    "smbfs", "afs", "ocfs2", "gfs2", "panfs", "wekafs", "orangefs", "pvfs2", "quobyte",
})


def is_uri(path_or_uri) -> bool:
    """True for ``scheme://...`` strings (``file://`` included), False for plain paths."""
    return isinstance(path_or_uri, str) and _SCHEME.match(path_or_uri) is not None


@dataclass(frozen=True)
class Location:
    """A file or directory on a ``pyarrow.fs`` filesystem.

    ``path``: the filesystem's own path (absolute for local files, ``bucket/key`` for object
    stores); ``display``: how messages name it (the path as the user gave it, or the URI without
    its query, which may hold credentials).
    """

    fs: pafs.FileSystem
    path: str
    display: str

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"Location({self.display!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def user_path(self) -> Path | str:
        """A Path for a plain local path (as given), else the URI (without its query)."""
        return Path(self.display) if self.is_local and not is_uri(self.display) else self.display

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, *parts: str) -> "Location":
        rel = posixpath.join(*[str(p) for p in parts])
        return Location(self.fs, posixpath.join(self.path, rel),
                        posixpath.join(self.display, rel) if self.display else rel)

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")),
                        posixpath.dirname(self.display.rstrip("/")))

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int | None:
        return self.info().size

    def listdir(self) -> list[str]:
        """Names in this directory, sorted; [] when it does not exist."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(selector))

    def read_bytes(self) -> bytes:
        """The whole object. On an object store a read is a size request then ranged GETs, so a
        concurrent overwrite can tear it: the size is checked again after reading and the read
        repeated (a manifest is replaced in place while members land)."""
        sizes = []
        for attempt in range(TORN_READ_ATTEMPTS):
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
            if self.is_local or (size := self.fs.get_file_info(self.path).size) == len(data):
                return data
            sizes.append(f"{len(data)} of {size}")
            time.sleep(0.05 * (attempt + 1))
        raise TornReadError(f"{self.display}: changed while it was read, {len(sizes)} times (bytes read vs size: "
                            f"{', '.join(sizes)}); is something rewriting it? read it again once it is still")

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def makedirs(self) -> None:
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
        else:  # object stores have no directories; a marker makes the prefix show up as one
            self.fs.create_dir(self.path, recursive=True)

    def remove(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def write_bytes_atomic(self, data: bytes) -> None:
        """Replace this file's content with ``data``; readers see the old content or all of the new."""
        data = bytes(data)
        if self.is_local:
            _write_local(self.path, data)
        else:
            _write_object(self.fs, self.path, data)


PathLike = Union[str, os.PathLike, Location]


def resolve(path_or_uri: PathLike, filesystem: pafs.FileSystem | None = None) -> Location:
    """A :class:`Location` for a local path, a ``file://`` / ``s3://`` / ``gs://`` (any pyarrow) URI,
    or (with ``filesystem``) a path on that filesystem."""
    if isinstance(path_or_uri, Location):
        return path_or_uri
    if filesystem is not None:
        return Location(filesystem, str(path_or_uri), str(path_or_uri))
    if is_uri(path_or_uri):
        try:
            fs, path = pafs.FileSystem.from_uri(path_or_uri)
        except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
            raise UserError(f"cannot open '{_without_query(path_or_uri)}': {one_line(e)}") from None
        scheme = _SCHEME.match(path_or_uri).group(1).lower()
        return Location(fs, path, f"{scheme}://{path}")
    given = os.fspath(path_or_uri)
    return Location(pafs.LocalFileSystem(), os.path.abspath(given), given)


def normalize(path_or_uri: PathLike) -> str:
    """The string to hand to other processes or nodes: an absolute path, or the URI as given."""
    if isinstance(path_or_uri, Location):
        return path_or_uri.path if path_or_uri.is_local else path_or_uri.display
    if is_uri(path_or_uri):
        return path_or_uri
    return str(Path(path_or_uri).resolve())


def write_bytes_atomic(path_or_uri: PathLike, data: bytes) -> None:
    resolve(path_or_uri).write_bytes_atomic(data)


def read_bytes(path_or_uri: PathLike) -> bytes:
    return resolve(path_or_uri).read_bytes()


def sha256(path_or_uri: PathLike) -> str:
    return resolve(path_or_uri).sha256()


def write_stream(f, data: bytes) -> None:
    """Write ``data`` to an open stream in chunks. Every atomic write goes through here: the seam at
    which a test interrupts a write midway."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        f.write(view[start:start + CHUNK])


def _write_local(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_stream(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_object(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            write_stream(f, data)
        move(fs, tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001 - already moved, or never created
            pass
        raise
    size = fs.get_file_info(path).size
    if size != len(data):
        raise OSError(f"{path}: wrote {len(data)} bytes but the store holds {size}; write it again")


def move(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` within one store (copy then delete where the store has no server-side
    move). The step that publishes an object write: the seam at which a test watches the order."""
    try:
        fs.move(src, dst)
    except NotImplementedError:  # a store without a server-side move
        fs.copy_file(src, dst)
        fs.delete_file(src)


# --- multi-node clusters ---------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_fstype(path: str, mounts: str | None = None) -> str | None:
    """The file system type of the mount holding ``path`` (the longest matching mount point in
    ``mounts``, the text of /proc/mounts; read from the system when None); None when unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    real = os.path.realpath(path)
    best, fstype = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def is_shared_fstype(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse."))


def check_shared(path_or_uri: PathLike, n_nodes: int, *, mounts: str | None = None, flag: str = "--out") -> None:
    """Refuse a node-local path when the cluster has more than one node.

    URIs pass (``s3://``, ``gs://``; ``file://`` is the user's word that the path is shared); a plain
    path passes when it lies on a network file system (NFS, EFS, Lustre, CephFS, FUSE, ...).
    ``mounts``: the text of /proc/mounts (read from the system when None).
    """
    if n_nodes <= 1:
        return
    if isinstance(path_or_uri, Location):
        if not path_or_uri.is_local or is_uri(path_or_uri.display):
            return
        shown, path = path_or_uri.display, path_or_uri.path
    elif is_uri(path_or_uri):
        return
    else:
        shown = path = os.fspath(path_or_uri)
    if is_shared_fstype(mount_fstype(os.path.abspath(path), mounts)):
        return
    raise UserError(f"{flag} {shown} is a node-local path but the cluster has {n_nodes} nodes; use a path on "
                     f"shared storage (NFS/EFS mount) or a URI: file:///shared/... if this path is shared, "
                     f"s3://bucket/..., gs://...")


def _without_query(uri: str) -> str:
    return uri.split("?", 1)[0]

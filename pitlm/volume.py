"""The volume: one root directory (PITLM_HOME) holding everything that must outlive a job.

Layout: corpus/ market/ world/ models/ embeddings/ runs/. Every write goes through `atomic_write_*` or
`atomic_dir` (temp + fsync + rename) so a killed job never leaves a half-written file visible under its
final name. Manifests record what was made, from which inputs, payload hashes, the resolved config, package
versions and wall time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pitlm import __version__
from pitlm.errors import NotPersistentError, PitlmError

SUBDIRS = ("corpus", "market", "world", "models", "embeddings", "runs")
DEFAULT_HOME = "~/.cache/pitlm"
# Filesystems whose contents vanish with the pod/VM. overlay is a container's writable layer.
EPHEMERAL_FSTYPES = {"tmpfs", "ramfs", "overlay", "overlayfs", "devtmpfs", "aufs", "squashfs"}
TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "numpy", "pandas",
                    "pyarrow", "scikit-learn", "triton")


# ----------------------------------------------------------------------------- atomic writes

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems (object-storage FUSE) do not support dir fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a shared volume wants the usual umask permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is fsynced and renamed onto `path`.

    For writers that want a filename (pandas.to_parquet, np.save, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory; on success it is renamed onto `path` (whole-directory atomicity).

    On failure the temp directory is removed and `path` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PitlmError(f"{path} already exists; pass --overwrite (or remove it) to rebuild")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifests

def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "pitlm": __version__}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_manifest(what: str, *, inputs: dict[str, Any] | None = None, payload: list[str | Path] | None = None,
                   root: str | Path | None = None, config: Any = None, wall_seconds: float | None = None,
                   **extra: Any) -> dict[str, Any]:
    """A manifest dict: what was made, from which inputs, sha256 + size of each payload file, resolved config,
    package versions, wall time. Payload paths are stored relative to `root` when given."""
    files = []
    for p in payload or []:
        p = Path(p)
        rel = str(p.relative_to(root)) if root else str(p)
        files.append({"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size})
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return {
        "what": what,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "inputs": inputs or {},
        "payload": files,
        "config": config,
        "versions": package_versions(),
        "wall_seconds": wall_seconds,
        **extra,
    }


def write_manifest(directory: str | Path, manifest: dict[str, Any], name: str = "manifest.json") -> Path:
    return atomic_write_json(Path(directory) / name, manifest)


def read_manifest(directory: str | Path, name: str = "manifest.json") -> dict[str, Any]:
    path = Path(directory) / name
    if not path.is_file():
        raise PitlmError(f"no manifest at {path}; build it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PitlmError(f"manifest {path} is not valid JSON ({e}); rebuild it") from e


# ----------------------------------------------------------------------------- persistence guard

@dataclass(frozen=True)
class Persistence:
    persistent: bool
    fstype: str
    mountpoint: str
    reason: str


def _mounts() -> list[tuple[str, str]]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def in_container() -> bool:
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists() or os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    try:
        cgroup = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return any(k in cgroup for k in ("docker", "kubepods", "containerd", "libpod"))


def check_persistence(path: str | Path, mounts: list[tuple[str, str]] | None = None,
                      container: bool | None = None) -> Persistence:
    """Classify where `path` lives: tmpfs/overlay, or a container's root filesystem, is ephemeral."""
    path = Path(path).expanduser().resolve()
    mounts = _mounts() if mounts is None else mounts
    best = ("/", "unknown")
    for mnt, fstype in mounts:
        if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    mnt, fstype = best
    if fstype in EPHEMERAL_FSTYPES:
        return Persistence(False, fstype, mnt, f"{path} is on {fstype} at {mnt}, which is lost when the machine/pod ends")
    container = in_container() if container is None else container
    if container and mnt == "/":
        return Persistence(False, fstype, mnt,
                           f"{path} is on the container's root filesystem, which is lost when the pod ends")
    return Persistence(True, fstype, mnt, f"{path} is on {fstype} at {mnt}")


# ----------------------------------------------------------------------------- the volume

_HELD: set[str] = set()  # lock paths this process holds
HELD_LOCKS_ENV = "PITLM_HELD_LOCKS"  # lock paths a parent process holds on behalf of its children


def held_locks_env(*paths: str | Path) -> dict[str, str]:
    """Environment for child processes that write under locks this process holds."""
    held = [p for p in os.environ.get(HELD_LOCKS_ENV, "").split(os.pathsep) if p]
    return {HELD_LOCKS_ENV: os.pathsep.join([*held, *(str(p) for p in paths)])}


class LockedError(PitlmError):
    """Another process holds the write lock of a volume entry."""


def _acquire(path: Path, busy: Exception, opener=open):
    """Open and lock `path`, retrying when the file locked is no longer the one at `path`: a holder unlinks the
    lock file on release, so a process that opened it just before that would lock an orphaned inode while a third
    process creates and locks a new file at the same path (both would "hold" the lock)."""
    for _ in range(100):
        f = opener(path, "a")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise busy from None
        try:
            current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return f
        f.close()  # the previous holder released and unlinked it between our open and our lock: open again
    raise busy


@contextlib.contextmanager
def write_lock(path: str | Path, what: str) -> Iterator[None]:
    """One writer of a volume entry at a time. A POSIX record lock: released by the kernel when the holder dies
    (a killed run never leaves a stale lock behind), and not inherited by forked workers. The second process
    gets one line and exit 2 before it touches anything."""
    path = Path(path)
    if str(path) in os.environ.get(HELD_LOCKS_ENV, "").split(os.pathsep):
        yield  # a parent process (e.g. `pitlm train --nproc N` around its torchrun ranks) holds it for us
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    busy = LockedError(f"another pitlm process is writing {what} (lock {path}); wait for it to finish or stop it")
    key = str(path.resolve())
    if key in _HELD:  # POSIX record locks do not exclude their own process (a notebook, threads, in-process CLIs)
        raise busy
    with _acquire(path, busy):
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


ENTRY_LABELS = {"models": "run", "embeddings": "embedding"}


def check_entry_name(kind: str, name: str) -> str:
    """A volume entry's name must be a plain directory name (no '/', not hidden, not '..')."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise PitlmError(f"{kind} name '{name}' must be a plain directory name (no '/', not starting with '.')")
    return name


class Volume:
    """The cache root. `Volume.resolve(home)` honours --home, then PITLM_HOME, then ~/.cache/pitlm."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> Volume:
        return cls(home or os.environ.get("PITLM_HOME") or DEFAULT_HOME)

    def ensure(self) -> Volume:
        try:
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PitlmError(f"cannot create PITLM_HOME at {self.root} ({e.strerror}); pass --home to a writable dir") from e
        return self

    def path(self, kind: str, *parts: str) -> Path:
        """PITLM_HOME/kind/parts...; a part that climbs out of kind/ (`..`, an absolute path) is refused, so no
        name given on the command line, input or output, reads or writes outside its place on the volume."""
        assert kind in SUBDIRS, kind
        base = self.root / kind
        out = base.joinpath(*parts)
        norm = Path(os.path.normpath(out))
        if parts and (norm == base or not norm.is_relative_to(base)):
            raise PitlmError(f"name '{'/'.join(parts)}' points outside PITLM_HOME/{kind}/; use a plain name "
                             "(letters, digits, '.', '_', '-')")
        return out

    def entry(self, kind: str, name: str, *rest: str) -> Path:
        """The volume entry `kind/name` for a name a user gave (`world:NAME`, `pit:NAME`, `--world NAME`, ...):
        a plain directory name, checked the same way as the names of outputs."""
        check_entry_name(ENTRY_LABELS.get(kind, kind), name)
        return self.path(kind, name, *rest)

    def lock(self, kind: str, name: str) -> contextlib.AbstractContextManager[None]:
        """The write lock of `kind/name` (e.g. world/demo, market/jpx, models/run): `with vol.lock(...)` around
        every stage that writes that entry, so two concurrent runs cannot both publish (the second one fails)."""
        return write_lock(self.lock_path(kind, name), f"{kind.rstrip('s') if kind != 'corpus' else kind} '{name}'")

    def lock_path(self, kind: str, name: str) -> Path:
        return self.path(kind, f".{name}.lock")

    def persistence(self) -> Persistence:
        self.root.mkdir(parents=True, exist_ok=True)
        return check_persistence(self.root)

    def guard(self, require: bool | None = None, stage: str = "this stage") -> Persistence:
        """Warn (or, when required, refuse before any work) when the volume is ephemeral."""
        if require is None:
            require = os.environ.get("PITLM_REQUIRE_PERSISTENT", "") not in ("", "0", "false", "no")
        verdict = self.persistence()
        if not verdict.persistent:
            msg = (f"PITLM_HOME is not persistent: {verdict.reason}. Mount a volume and point --home/PITLM_HOME "
                   f"at it")
            if require:
                raise NotPersistentError(msg + f"; refusing to start {stage} (--require-persistent)")
            logging.getLogger("pitlm").warning(msg + f"; {stage} outputs may be lost")
        return verdict

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

"""Object storage: one interface over a local folder and S3 (``s3_store.py``), one key layout.

Keys are relative ``/``-separated names checked by :func:`check_key` on every call, so nothing a
request carries can address anything outside the store root. Writes are atomic per object: a reader
sees the old object or the new one, never a partial one. Listings skip anything that is not a valid
key (temp files, foreign objects), so what ``list`` returns can always be read back.
"""

import contextlib
import hashlib
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from musetalk_ops import config, keys
from musetalk_ops.errors import InputError, StoreError
from musetalk_ops.files import TEMP_SUFFIX, temp_path, write_atomic
from musetalk_ops.ids import validate_id
from musetalk_ops.settings import load_settings

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255  # a file name on common file systems: keys behave the same on both backends
_KEY_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_MD5 = re.compile(r"[0-9a-f]{32}")


def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_key(key: object) -> str:
    """Return ``key`` if it is a safe object key, else raise InputError.

    Safe: 1-1024 characters of ``A-Z a-z 0-9 . _ - /``, relative, segments non-empty, not ``.`` or
    ``..`` and at most 255 characters. This excludes traversal, absolute paths, backslashes, control
    characters and unicode look-alikes on every backend.
    """
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or not _KEY_CHARS.fullmatch(key):
        raise InputError(
            f"invalid object key {shown(key)}: use 1-{MAX_KEY_LENGTH} characters of A-Z a-z 0-9 . _ - /"
        )
    if any(seg in ("", ".", "..") or len(seg) > MAX_SEGMENT_LENGTH for seg in key.split("/")):
        raise InputError(
            f"invalid object key {shown(key)}: '/'-separated names must be non-empty, not '.' or '..', "
            f"and at most {MAX_SEGMENT_LENGTH} characters"
        )
    return key


def is_key(key: str) -> bool:
    try:
        check_key(key)
    except InputError:
        return False
    return True


def check_prefix(prefix: object) -> str:
    """A listing prefix is ``""`` (everything), a key, or a key followed by ``/``."""
    if not isinstance(prefix, str):
        raise InputError(f"invalid object key prefix {shown(prefix)}")
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``etag`` is an opaque token that changes whenever the content changes."""

    key: str
    size: int
    etag: str
    modified: datetime


def local_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    return path


class Store(ABC):
    """Object store interface shared by the CLI, the Dagster resources and the sensors."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Content of ``key``; StoreError("object not found: <uri>") if there is none."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` atomically."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download ``key`` to the local ``path`` (parents created; it appears complete or not at all)."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload the local file ``path`` to ``key`` atomically."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object has that key, atomically (one of two racing writers wins);
        returns whether this call created it."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix, as on S3), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing object is not an error (as on S3)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every listed object under ``prefix``; returns how many were removed."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (replacing ``dst``); StoreError if ``src`` is missing."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where ``key`` (or a prefix such as ``templates/``) lives, for messages and metadata."""


class LocalStore(Store):
    """A folder as object store: ``<root>/<key>``; the embedded default for one machine.

    The etag is ``<size>-<mtime_ns>-<inode>`` (hex), not a content hash: listing never reads file
    contents, so listing renders or requests stays cheap. Every write through the store renames a new
    file (new inode) into place, and an edit in place changes the mtime, so changed content always
    changes the etag; rewriting identical content changes it too.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def uri(self, key: str) -> str:
        base = self.root.as_uri()  # "file:///" for the root directory itself
        return f"{base}{'' if base.endswith('/') else '/'}{check_prefix(key)}"

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def _path(self, key: str) -> Path:
        """Local path of ``key``, refused if it resolves outside the root (a symlink pointing out)."""
        path = self.root / check_key(key)
        if not self._inside(path):
            raise StoreError(f"object key {key!r} resolves outside the store root {self.root} (symlink?)")
        return path

    @contextlib.contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """OSError → one-line StoreError; a missing file on read is "object not found"."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            if action == "read":
                raise StoreError(f"object not found: {self.uri(key)}") from None
            raise StoreError(f"cannot {action} {self.uri(key)}: {e.strerror}") from None
        except OSError as e:
            raise StoreError(f"cannot {action} {self.uri(key)}: {e.strerror or e}") from None

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key, "read"):
            return path.read_bytes()

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._errors(key, "write"):
            write_atomic(path, lambda f: f.write(data), fsync=True)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        src = self._path(key)
        with contextlib.ExitStack() as stack:
            with self._errors(key, "read"):  # only opening the object means "object not found"
                source = stack.enter_context(open(src, "rb"))
            write_atomic(Path(path), lambda f: shutil.copyfileobj(source, f, 1 << 20), fsync=True)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        dest = self._path(key)
        with open(local_file(path), "rb") as s, self._errors(key, "write"):
            write_atomic(dest, lambda f: shutil.copyfileobj(s, f, 1 << 20), fsync=True)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._errors(key, "write"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(path)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
                os.link(tmp, path)  # fails if the key exists: the file appears complete or not at all
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _start(self, prefix: str) -> Path | None:
        """Directory to walk for ``prefix`` (its last complete segment), if it lies inside the root."""
        start = self.root / check_prefix(prefix).rpartition("/")[0]
        return start if self._inside(start) else None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        start = self._start(prefix)
        if start is None:
            return []
        found = []
        for dirpath, _dirs, files in os.walk(start):  # does not descend into symlinked directories
            for name in files:
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix) or not is_key(key) or not self._inside(path):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted while listing
                    continue
                modified = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=timezone.utc)
                etag = f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
                found.append(ObjectInfo(key, st.st_size, etag, modified))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key, "delete"):
            if not path.is_dir():
                path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many. Temporaries that a killed writer left
        in directories under the prefix (``*~tmp``, never objects) go too: deleting a prefix means
        nothing under it is still being written (the merge deletes ``work/<id>/`` after every chunk)."""
        objects = self.list(prefix)
        for info in objects:
            self.delete(info.key)
        start = self._start(prefix)
        if start is not None:  # prune emptied directories under the prefix, never above it
            for dirpath, _dirs, files in os.walk(start, topdown=False):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                if rel != "." and f"{rel}/".startswith(prefix):
                    for name in files:
                        if name.endswith(TEMP_SUFFIX):
                            Path(dirpath, name).unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        return len(objects)

    def move(self, src: str, dst: str) -> None:
        source, dest = self._path(src), self._path(dst)
        if not source.is_file():
            raise StoreError(f"object not found: {self.uri(src)}")
        with self._errors(dst, "write"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)


def open_store(root: str | os.PathLike | None = None) -> Store:
    """``$MUSETALK_S3_BUCKET`` set: S3 (``$MUSETALK_S3_PREFIX``, ``$AWS_ENDPOINT_URL_S3``); else a LocalStore
    at ``root``, ``$MUSETALK_STORE`` or ``./.musetalk/store``."""
    bucket = os.environ.get("MUSETALK_S3_BUCKET")
    if bucket:
        from musetalk_ops.s3_store import S3Store  # boto3 only where S3 is used

        prefix, endpoint = os.environ.get("MUSETALK_S3_PREFIX", ""), os.environ.get("AWS_ENDPOINT_URL_S3")
        return S3Store(bucket, prefix, endpoint or None)
    return LocalStore(config.store_dir(root))


def _template_files(repo_dir: Path) -> dict[str, dict[str, Path]]:
    """``{template id: {key: local file}}`` for every template directory; validated before any upload."""
    if not repo_dir.is_dir():
        raise InputError(f"templates directory not found: {repo_dir}")
    plan = {}
    for folder in sorted(p for p in repo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        tid = validate_id(folder.name, f"template id (directory {folder})")
        settings_file = folder / "settings.yaml"
        welcome = load_settings(settings_file).welcome_audio if settings_file.is_file() else None
        files, sources = {}, []
        for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            if path.name == "settings.yaml" and path.is_file():
                files[keys.template_settings(tid)] = path
            elif path.stem == "source" and path.is_file():
                sources.append(path)
            elif path.name == welcome and path.is_file():
                files[check_key(keys.template_prefix(tid) + welcome)] = path
            else:
                raise InputError(
                    f"unexpected {path}: a template holds source.<ext>, settings.yaml and the "
                    "welcome_audio file its settings name"
                )
        if welcome is not None and keys.template_prefix(tid) + welcome not in files:
            raise InputError(f"{settings_file}: welcome_audio {welcome!r} is not in {folder}")
        if len(sources) != 1:
            raise InputError(
                f"{folder}: expected exactly one source.<ext> "
                f"({', '.join(keys.SOURCE_EXTS)}), found {len(sources)}"
            )
        try:
            files[keys.template_source(tid, sources[0].suffix)] = sources[0]
        except InputError as e:
            raise InputError(f"{sources[0]}: {e}") from None
        plan[tid] = files
    if not plan:
        raise InputError(f"no template directories (<id>/source.<ext>) in {repo_dir}")
    return plan


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _unchanged(store: Store, info: ObjectInfo, path: Path) -> bool:
    """Same content? Sizes first, then S3's md5 etag (single-part uploads), else compare the bytes."""
    if info.size != path.stat().st_size:
        return False
    if _MD5.fullmatch(info.etag) and info.etag == _md5(path):
        return True
    return store.get_bytes(info.key) == path.read_bytes()


def push_templates(repo_dir: str | os.PathLike, store: Store) -> list[str]:
    """Upload ``<repo_dir>/<id>/source.<ext>`` and optional ``settings.yaml`` to the same store keys.

    Unchanged objects are not rewritten, so their etags stay and template_sensor does not re-run them.
    Afterwards the store holds exactly the repository's inputs for each pushed template: a stored
    source with another extension, or a settings.yaml removed from the repository, is deleted.
    Templates that are not in ``repo_dir`` are left alone. Returns the keys written.
    """
    written = []
    for tid, files in _template_files(Path(repo_dir)).items():
        stored = {info.key: info for info in store.list(keys.template_prefix(tid))}
        for key, path in files.items():
            if key not in stored or not _unchanged(store, stored[key], path):
                store.put_file(key, path)
                written.append(key)
        for key in sorted(stored.keys() - files.keys()):
            name = key.removeprefix(keys.template_prefix(tid))
            if name == "settings.yaml" or name.startswith("source."):
                store.delete(key)
                log.info("deleted stale %s", store.uri(key))
    return written

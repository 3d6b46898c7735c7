"""Template caches between the object store and the local disk, and which cache is current.

Upload writes ``manifest.json`` last, so a cache is visible in the store only when complete; the
local copy under ``$MUSETALK_CACHE/templates/<id>/<fingerprint>/`` appears by one rename, so
concurrent steps on one machine download it at most a few times and never read half of it. The
pointer ``cache/templates/<id>/current.json`` (written after the cache) lets workers and clients
find a template's current cache without asking Dagster.
"""

import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from musetalk_ops import config, keys
from musetalk_ops.errors import CacheError, InputError, StoreError
from musetalk_ops.keys import MANIFEST
from musetalk_ops.store import Store

if TYPE_CHECKING:
    from musetalk_ops.template_cache import Template


@dataclass(frozen=True)
class CacheRef:
    """One template cache in the store: the template, the fingerprint of its inputs, its weights kind."""

    template: str
    fingerprint: str
    weights: str

    @property
    def prefix(self) -> str:
        return keys.cache_prefix(self.template, self.fingerprint)

    @property
    def manifest(self) -> str:
        return keys.cache_manifest(self.template, self.fingerprint)


def write_pointer(store: Store, ref: CacheRef) -> None:
    """Make ``ref`` the template's current cache (after its manifest: never pointing at a partial one)."""
    store.put_bytes(keys.template_pointer(ref.template), json.dumps(asdict(ref), indent=1).encode())


def prepared_templates(store: Store) -> list[str]:
    """Every template id whose current-cache pointer is in the store."""
    ids = []
    for info in store.list(keys.TEMPLATE_CACHES):
        parts = info.key.removeprefix(keys.TEMPLATE_CACHES).split("/")
        if len(parts) == 2 and parts[1] == keys.POINTER:
            ids.append(parts[0])
    return sorted(ids)


def current_cache(store: Store, tid: str) -> CacheRef:
    """The current cache of template ``tid`` (its pointer); InputError if it was never prepared."""
    key = keys.template_pointer(tid)
    try:
        data = json.loads(store.get_bytes(key))
        ref = CacheRef(tid, keys.validate_fingerprint(data["fingerprint"]), str(data["weights"]))
    except StoreError:
        if store.exists(key):
            raise
        raise InputError(
            f"template {tid!r} is unknown or not prepared (the store has no {key}): "
            "materialize its template_cache partition"
        ) from None
    except (ValueError, KeyError, TypeError, InputError):
        raise CacheError(
            f"template pointer {key} is damaged: re-materialize template_cache partition {tid}"
        ) from None
    return ref


def stored_manifest(store: Store, ref: CacheRef) -> dict | None:
    """The manifest of ``ref`` in the store, or None if it is not a readable JSON object."""
    try:
        manifest = json.loads(store.get_bytes(ref.manifest))
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def upload_cache(store: Store, local: Path, prefix: str) -> list[str]:
    """Upload every file of the cache directory ``local`` under ``prefix``; returns the keys."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    if not any(p.name == MANIFEST for p in files):
        raise CacheError(f"partial cache {local} (no {MANIFEST}): nothing uploaded")
    files.sort(key=lambda p: p.name == MANIFEST)  # manifest last
    written = []
    for path in files:
        key = prefix + path.relative_to(local).as_posix()
        store.put_file(key, path)
        written.append(key)
    return written


def download_cache(store: Store, ref: CacheRef, dest: Path) -> Path:
    """Copy the cache ``ref`` from the store into the new directory ``dest`` (atomically, and only
    if the copy loads: CacheError names the damaged store prefix otherwise)."""
    objects = store.list(ref.prefix)
    if not any(info.key == ref.manifest for info in objects):
        raise CacheError(
            f"template cache {store.uri(ref.prefix)} is missing or partial (no {MANIFEST}): "
            f"re-materialize template_cache partition {ref.template}"
        )
    from musetalk_ops.template_cache import read_cache

    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        for info in objects:
            store.get_file(info.key, tmp / info.key.removeprefix(ref.prefix))
        try:  # a copy is kept only if it loads: a cache damaged in the store is never used or cached
            read_cache(tmp)
        except CacheError as e:
            raise CacheError(
                f"template cache {store.uri(ref.prefix)} is damaged "
                f"({str(e).replace(str(tmp), 'the downloaded copy')}): "
                f"re-materialize template_cache partition {ref.template}"
            ) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    except OSError:
        if not (dest / MANIFEST).is_file():  # lost a race with another process: theirs is as good
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_cache(store: Store, ref: CacheRef) -> Path:
    """The local copy of ``ref``, downloaded on first use (content-addressed: never stale)."""
    dest = config.cache_dir() / "templates" / ref.template / ref.fingerprint
    if (dest / MANIFEST).is_file():
        return dest
    return download_cache(store, ref, dest)


@lru_cache(maxsize=2)
def _read(path: str) -> "Template":
    from musetalk_ops.template_cache import read_cache

    return read_cache(Path(path))


def load_cached_template(store: Store, ref: CacheRef) -> "Template":
    """The template of ``ref``, read once per process (in-process runs render every chunk from it)."""
    return _read(str(local_cache(store, ref)))

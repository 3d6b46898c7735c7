"""Files written whole or not at all, and content hashes: one implementation for every module.

Every output (videos, caches, features, weights, store objects, JSON) is written to a temporary name
in its destination directory and renamed over the final name, so a reader sees the old file, or the
new one, never half of one; a failure removes the temporary file.
"""

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = "~tmp"  # '~' is not a store key character: a leftover can never be taken for an object


def temp_path(path: str | os.PathLike) -> Path:
    """A unique hidden name beside ``path`` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through (for libraries that write by name);
    on success it is renamed over ``path``, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, fill: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
    """Write ``path`` by calling ``fill`` on a new binary file object, atomically."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        fill(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, data: object) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex of a file's content, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()

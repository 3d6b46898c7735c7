"""What the store records about a request id: who claimed it, the render record, the failure record.

The store is the record of every render, whichever path made it (a Dagster run or a warm worker):

* ``claims/<id>.json``: written once, atomically, by whoever takes the id first (``musetalk submit``, the
  request sensor, a worker), so two paths never render one id;
* ``renders/<id>.json``: written after ``renders/<id>.mp4``, so it marks the video complete; its
  ``source`` says which path made it;
* ``renders/failed/<id>.json``: a render that failed on a worker (the runs' failures are in Dagster).
"""

import json
import os
import socket
import time
from collections.abc import Callable, Iterator

from musetalk_ops import keys
from musetalk_ops.errors import StoreError
from musetalk_ops.ids import ID_PATTERN
from musetalk_ops.store import Store
from musetalk_ops.timings import Timings

SOURCES = ("run", "worker")  # the ``source`` of a render record
CLAIMANTS = ("request", "worker")  # who may claim an id: a request object's path, or a worker


def claim_id(store: Store, rid: str, by: str, *, worker: str = "", template: str = "") -> bool:
    """Claim ``rid`` for ``by`` (one of ``CLAIMANTS``); False if it was claimed before."""
    if by not in CLAIMANTS:
        raise ValueError(f"claimant {by!r}: expected one of {CLAIMANTS}")
    record = {"id": rid, "by": by, "worker": worker, "template": template, "host": socket.gethostname()}
    record["pid"] = os.getpid()
    return store.create(keys.claim(rid), json.dumps({**record, "at": time.time()}).encode())


def read_claim(store: Store, rid: str) -> dict | None:
    """The claim of ``rid``, or None if nobody claimed it."""
    key = keys.claim(rid)
    return json.loads(store.get_bytes(key)) if store.exists(key) else None


def taken_by(store: Store, rid: str) -> str | None:
    """What already uses ``rid`` (a render, a request, a failed render, a claim), or None if it is free."""
    for key, what in (
        (keys.render_timings(rid), "a finished render"),
        (keys.failed_render(rid), "a failed render"),
        (keys.request(rid), "a render request"),
        (keys.rejected_request(rid), "a rejected request"),
        (keys.claim(rid), "a render in progress"),
    ):
        if store.exists(key):
            return what
    return None


def render_record(
    timings: Timings, *, rid: str, template: str, fingerprint: str, source: str, **more
) -> dict:
    """The content of ``renders/<id>.json`` (docs/timings.md §2)."""
    if source not in SOURCES:
        raise ValueError(f"render source {source!r}: expected one of {SOURCES}")
    return {
        **timings.to_dict(),
        "id": rid,
        "template": template,
        "fingerprint": fingerprint,
        "source": source,
        **more,
    }


def write_render_record(store: Store, record: dict) -> None:
    """Publish the render record (after the video it describes)."""
    store.put_bytes(keys.render_timings(record["id"]), json.dumps(record, indent=1).encode())


def write_failure(store: Store, rid: str, *, template: str, error: str, worker: str) -> None:
    """Record that the worker ``worker`` failed to render ``rid`` (counted by ``musetalk stats``)."""
    record = {"id": rid, "template": template, "error": error, "source": "worker", "worker": worker}
    store.put_bytes(keys.failed_render(rid), json.dumps({**record, "at": time.time()}, indent=1).encode())


def worker_records(
    store: Store, skip: set[str], on_skip: Callable[[str, Exception], None] | None = None
) -> Iterator[dict]:
    """The render records of warm workers (``source: worker``) under ``renders/``, but those of ids in
    ``skip``, which are not read; an object that cannot be read is passed to ``on_skip`` and left out."""
    for info in store.list(keys.RENDERS):
        rid = info.key.removeprefix(keys.RENDERS).removesuffix(".json")
        if not info.key.endswith(".json") or not ID_PATTERN.fullmatch(rid) or rid in skip:
            continue
        try:
            record = json.loads(store.get_bytes(info.key))
        except (StoreError, ValueError) as e:  # removed since the listing, or not JSON
            if on_skip is not None:
                on_skip(info.key, e)
            continue
        if isinstance(record, dict) and record.get("source") == "worker":
            yield {**record, "id": rid}


def read_records(store: Store, prefix: str) -> list[dict]:
    """The JSON records directly under ``prefix`` (``keys.RENDERS`` or ``keys.FAILED``), by key."""
    records = []
    for info in store.list(prefix):
        name = info.key.removeprefix(prefix)
        if "/" in name or not name.endswith(".json"):
            continue
        try:
            record = json.loads(store.get_bytes(info.key))
        except ValueError:
            continue  # not a record of ours: never let one object hide the others
        if isinstance(record, dict):
            records.append(record)
    return records

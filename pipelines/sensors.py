"""Triggers from the object store: templates to prepare, render requests to run, and direct renders
of warm workers to record.

The sensors only list and read small objects; the work happens in the runs they request.
"""

import hashlib
import json
from datetime import datetime, timezone

import dagster as dg

from musetalk_ops import PREPARATION_VERSION, keys
from musetalk_ops.errors import InputError, StoreError
from musetalk_ops.ids import ID_PATTERN
from musetalk_ops.render_records import claim_id, read_claim, worker_records
from musetalk_ops.store import ObjectInfo, Store
from pipelines.catalog import RENDERED_VIDEO, TEMPLATE_CACHE, latest_cache, render_events
from pipelines.partitions import render_requests, templates
from pipelines.request import MAX_REQUEST_BYTES, TEMPLATE_TAG, parse_request
from pipelines.resources import StoreResource

# A request whose audio is not there yet may still be uploading (clients should upload it first).
AUDIO_GRACE_SECONDS = 60


def _template_inputs(objects: list[ObjectInfo]) -> dict[str, str]:
    """``{template id: signature}`` for every ``templates/<id>/`` holding a ``source.<ext>``; the
    signature changes whenever the source or settings.yaml changes (their etags)."""
    parts: dict[str, list[str]] = {}
    for info in objects:
        segments = info.key.split("/")
        if len(segments) != 3 or not ID_PATTERN.fullmatch(segments[1]):
            continue
        name = segments[2]
        if name == "settings.yaml" or name.startswith("source."):
            parts.setdefault(segments[1], []).append(f"{name}={info.etag}")
    return {
        tid: hashlib.sha256("\n".join(sorted(p)).encode()).hexdigest()[:16]
        for tid, p in parts.items()
        if any(x.startswith("source.") for x in p)
    }


def _read_cursor(cursor: str | None) -> tuple[dict[str, str], int | None]:
    """(signatures seen, the preparation version they were checked under) from the sensor's cursor; a
    cursor of the older format (signatures only) was checked under no known version."""
    data = json.loads(cursor) if cursor else {}
    if isinstance(data.get("signatures"), dict):
        return data["signatures"], data.get("preparation_version")
    return data, None


def _made_by_other_preparation(instance: dg.DagsterInstance, tid: str) -> bool:
    """Whether the current cache of ``tid`` (its latest materialization) was made by another preparation
    version than this one; materializations from before the version was recorded name none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=TEMPLATE_CACHE, asset_partitions=[tid]), limit=1
    ).records
    if not records:
        return False
    version = records[0].asset_materialization.metadata.get("preparation_version")
    return version is None or version.value != PREPARATION_VERSION


@dg.sensor(
    asset_selection=[TEMPLATE_CACHE],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps the templates partitions in step with the store's templates/ prefix and "
    "materializes template_cache for new or changed templates, and once for every template whose cache "
    "an older preparation version made.",
)
def template_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
    current = _template_inputs(store.get().list("templates/"))
    seen, checked_under = _read_cursor(context.cursor)
    known = set(context.instance.get_dynamic_partitions(templates.name))
    added = sorted(set(current) - known)
    removed = sorted(known - set(current))
    changed = [tid for tid in sorted(current) if seen.get(tid) != current[tid]]
    if checked_under != PREPARATION_VERSION:  # first tick of this preparation code: one query per template
        stale = [
            tid
            for tid in sorted(current)
            if tid not in changed and _made_by_other_preparation(context.instance, tid)
        ]
        if stale:
            context.log.info(f"caches made by an older preparation, preparing again: {', '.join(stale)}")
        changed = sorted(changed + stale)
    partition_requests = []
    if added:
        partition_requests.append(templates.build_add_request(added))
    if removed:
        context.log.info(f"templates removed from the store: {', '.join(removed)}")
        partition_requests.append(templates.build_delete_request(removed))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=tid, asset_selection=[TEMPLATE_CACHE]) for tid in changed],
        dynamic_partitions_requests=partition_requests,
        cursor=json.dumps(
            {"preparation_version": PREPARATION_VERSION, "signatures": current}, sort_keys=True
        ),
    )


def _reject(store: Store, info: ObjectInfo, reason: str, log: dg.DagsterLogManager) -> None:
    """Move the request aside with its reason (reason first: a crash in between retries the move)."""
    name = info.key.removeprefix(keys.REQUESTS)
    store.put_bytes(f"{keys.REJECTED}{name.removesuffix('.json')}.reason.txt", (reason + "\n").encode())
    store.move(info.key, f"{keys.REJECTED}{name}")
    log.warning(f"rejected {info.key}: {reason}")


def _check_request(
    store: Store, instance: dg.DagsterInstance, info: ObjectInfo, template_ok: dict[str, bool]
) -> tuple[str, str] | None:
    """``(request id, template id)`` of a runnable request; None while its audio may still arrive.
    InputError says why a request is refused."""
    rid = info.key.removeprefix(keys.REQUESTS).removesuffix(".json")
    if info.size > MAX_REQUEST_BYTES:  # refused without reading it
        raise InputError(f"request {rid}: {info.size} bytes, over the {MAX_REQUEST_BYTES} byte limit")
    request = parse_request(rid, store.get_bytes(info.key))
    tid = request.template
    if tid not in template_ok:
        template_ok[tid] = instance.has_dynamic_partition(templates.name, tid) and bool(
            latest_cache(instance, tid)
        )
    if not template_ok[tid]:
        raise InputError(
            f"request {rid}: unknown template {tid!r} (no materialized template_cache partition)"
        )
    if not store.exists(request.audio):
        age = (datetime.now(timezone.utc) - info.modified).total_seconds()
        if age < AUDIO_GRACE_SECONDS:
            return None
        raise InputError(f"request {rid}: audio object {request.audio} does not exist")
    if not claim_id(store, rid, "request", template=tid):  # claimed by its submit, or by a worker
        claim = read_claim(store, rid) or {}
        if claim.get("by") == "worker":
            worker = claim.get("worker")
            raise InputError(f"request {rid}: the id is taken by a direct render on worker {worker}")
    return rid, tid


@dg.sensor(
    job_name="render_video",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Validates new requests/<id>.json objects, refuses bad ones into requests/rejected/ "
    "with a reason, and runs render_video once per request id.",
)
def render_request_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
    client = store.get()
    known = set(context.instance.get_dynamic_partitions(render_requests.name))
    template_ok: dict[str, bool] = {}
    accepted: dict[str, str] = {}
    for info in client.list(keys.REQUESTS):
        name = info.key.removeprefix(keys.REQUESTS)
        if "/" in name or not name.endswith(".json") or name.removesuffix(".json") in known:
            continue
        try:
            found = _check_request(client, context.instance, info, template_ok)
        except InputError as e:
            _reject(client, info, str(e), context.log)
            continue
        except StoreError as e:  # removed or unreadable between listing and reading: next tick
            context.log.warning(f"skipped {info.key}: {e}")
            continue
        except Exception as e:  # a bug must not let one object block every other request
            context.log.error(f"skipped {info.key}: {type(e).__name__}: {e}")
            continue
        if found is not None:
            accepted[found[0]] = found[1]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=rid, run_key=rid, tags={TEMPLATE_TAG: tid})
            for rid, tid in accepted.items()
        ],
        dynamic_partitions_requests=[render_requests.build_add_request(sorted(accepted))] if accepted else [],
    )


# Records read per tick at most: a backlog (Dagster was down for a while) is recorded over a few ticks.
RECORDS_PER_TICK = 200


def _recorded(instance: dg.DagsterInstance, rid: str) -> bool:
    """Whether ``rid`` already has a rendered_video materialization (a tick that died after reporting)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RENDERED_VIDEO, asset_partitions=[rid]), limit=1
    ).records
    return bool(records)


@dg.sensor(
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records the direct renders of warm workers (renders/<id>.json with source worker) as "
    "rendered_video materializations of their request partitions, once each, also after Dagster was down.",
)
def direct_render_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
    client = store.get()
    known = set(context.instance.get_dynamic_partitions(render_requests.name))
    events: list = []
    added: list[str] = []

    def skipped(key: str, error: object) -> None:
        context.log.warning(f"skipped {key}: {error}")

    for record in worker_records(client, skip=known, on_skip=skipped):  # a run's record: its run reported it
        rid = record["id"]
        if not _recorded(context.instance, rid):
            try:
                events.extend(render_events(client, record, worker=str(record.get("worker", ""))))
            except (KeyError, TypeError, ValueError) as e:  # not a record a worker of ours wrote
                skipped(keys.render_timings(rid), f"not a render record ({type(e).__name__}: {e})")
                continue
        added.append(rid)
        if len(added) >= RECORDS_PER_TICK:
            break
    if added:
        context.log.info(f"recorded {len(added)} direct render(s): {', '.join(added[:10])}")
    return dg.SensorResult(
        asset_events=events,
        dynamic_partitions_requests=[render_requests.build_add_request(added)] if added else [],
    )

"""What the Dagster instance knows about templates (which cache is current), the asset keys renders
are reported to (by runs and, for warm workers, by the direct-render sensor), and how engine errors
fail a step."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from musetalk_ops import keys
from musetalk_ops.errors import GpuMemoryError, MuseTalkError, StoreError
from musetalk_ops.store import Store
from musetalk_ops.template_store import CacheRef
from musetalk_ops.timings import STAGES, Timings

TEMPLATE_CACHE = dg.AssetKey("template_cache")
RENDERED_VIDEO = dg.AssetKey("rendered_video")


def latest_cache(instance: dg.DagsterInstance, template_id: str) -> CacheRef | None:
    """The cache of the newest ``template_cache`` materialization of ``template_id``, if any."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=TEMPLATE_CACHE, asset_partitions=[template_id]), limit=1
    ).records
    if not records:
        return None
    metadata = records[0].asset_materialization.metadata
    return CacheRef(template_id, metadata["fingerprint"].value, metadata["weights"].value)


def render_events(
    store: Store, record: dict, **more: object
) -> list[dg.AssetMaterialization | dg.AssetObservation]:
    """The events that record a render (``record``: its ``renders/<id>.json``): the ``rendered_video``
    materialization of its request partition, and the use of its template cache. ``more``: metadata
    of the path that made it (run id, chunks; worker name)."""
    rid, tid, fingerprint = record["id"], record["template"], record["fingerprint"]
    timings = Timings.from_dict(record)
    materialization = dg.AssetMaterialization(
        asset_key=RENDERED_VIDEO,
        partition=rid,
        description=f"{timings.frames} frames of template {tid}",
        metadata={
            "uri": store.uri(keys.render_video(rid)),
            "timings_uri": store.uri(keys.render_timings(rid)),
            "template": tid,
            "cache_fingerprint": fingerprint,
            "source": record.get("source", "run"),
            "signed": bool(record.get("signer")),
            "signer": record.get("signer") or "unsigned",
            "weights": timings.weights,
            "mode": timings.mode,
            **more,
            "frames": timings.frames,
            "video_seconds": dg.MetadataValue.float(timings.video_seconds),
            **{
                f"{s}_seconds": dg.MetadataValue.float(round(getattr(timings, s), 4))
                for s in (*STAGES, "total")
            },
            "fps": dg.MetadataValue.float(round(timings.fps, 3)),
            "rtf": dg.MetadataValue.float(round(timings.rtf, 3)),
            "timings": dg.MetadataValue.json(record),
        },
    )
    observation = dg.AssetObservation(
        asset_key=TEMPLATE_CACHE,
        partition=tid,
        metadata={"used_by_request": rid, "cache_fingerprint": fingerprint, **more},
    )
    return [materialization, observation]


@contextmanager
def user_errors() -> Iterator[None]:
    """A MuseTalkError fails the step with its one-line message. Only store errors (network,
    throttling) and a full GPU (another pod may hold its memory) may be retried by a RetryPolicy;
    bad input or a damaged cache fails the same way twice."""
    try:
        yield
    except (StoreError, GpuMemoryError) as e:
        raise dg.Failure(description=str(e)) from None
    except MuseTalkError as e:
        raise dg.Failure(description=str(e), allow_retries=False) from None

"""What the Dagster instance knows about templates (which cache is current), the asset keys the
render job reports to, and how engine errors fail a step."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg

from musetalk_ops import keys
from musetalk_ops.errors import GpuMemoryError, MuseTalkError, StoreError

TEMPLATE_CACHE = dg.AssetKey("template_cache")
RENDERED_VIDEO = dg.AssetKey("rendered_video")


@dataclass(frozen=True)
class CacheRef:
    """The template cache a render uses, as recorded by the latest ``template_cache`` materialization."""

    template: str
    fingerprint: str
    weights: str

    @property
    def prefix(self) -> str:
        return keys.cache_prefix(self.template, self.fingerprint)

    @property
    def manifest(self) -> str:
        return keys.cache_manifest(self.template, self.fingerprint)


def latest_cache(instance: dg.DagsterInstance, template_id: str) -> CacheRef | None:
    """The cache of the newest ``template_cache`` materialization of ``template_id``, if any."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=TEMPLATE_CACHE, asset_partitions=[template_id]), limit=1
    ).records
    if not records:
        return None
    metadata = records[0].asset_materialization.metadata
    return CacheRef(template_id, metadata["fingerprint"].value, metadata["weights"].value)


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

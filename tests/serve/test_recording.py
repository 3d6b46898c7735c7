"""How Dagster records the renders of warm workers: the direct-render sensor (once each, also after
Dagster was down), ``musetalk stats`` over both paths, and claims shared with ``musetalk submit`` and
the request sensor."""

import dagster as dg
import pytest

from musetalk_ops import keys
from musetalk_ops.errors import InputError
from musetalk_ops.render_records import claim_id, write_failure
from musetalk_ops.serve.worker import Reply
from pipelines.graphql import GraphQLClient
from pipelines.resources import StoreResource
from pipelines.sensors import direct_render_sensor

UNREACHABLE = GraphQLClient("http://127.0.0.1:9", timeout=0.5)


def render_directly(worker, rid: str, audio) -> dict:
    """A reply rendered by the worker while no Dagster is running."""
    key = keys.audio(rid, "wav")
    worker.store.put_file(key, audio)
    return worker.submit(Reply(id=rid, template="astronaut", options={}, audio_key=key)).result(timeout=120)


def tick(instance, store_root, apply: bool = True) -> dg.SensorResult:
    """One evaluation of the sensor; ``apply``: what the daemon then does with its result."""
    resources = {"store": StoreResource(root=str(store_root))}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = direct_render_sensor(context)
    if apply:
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def materializations(instance) -> list[dg.AssetMaterialization]:
    records = instance.fetch_materializations(dg.AssetKey("rendered_video"), limit=100).records
    return [r.asset_materialization for r in records]


def test_direct_renders_are_recorded_once_each_with_lineage_even_after_dagster_was_down(
    instance, worker, store_root, short_speech
):
    first = render_directly(worker, "offline-1", short_speech)  # Dagster "down": nobody ticks
    render_directly(worker, "offline-2", short_speech)

    result = tick(instance, store_root, apply=False)  # the daemon dies after reporting, before partitions
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    assert sorted(e.partition for e in result.asset_events if isinstance(e, dg.AssetMaterialization)) == [
        "offline-1",
        "offline-2",
    ]
    again = tick(instance, store_root)
    assert again.asset_events == []  # already materialized: only the partitions are added now
    assert sorted(instance.get_dynamic_partitions("render_requests")) == ["offline-1", "offline-2"]
    assert tick(instance, store_root).asset_events == []
    assert tick(instance, store_root).dynamic_partitions_requests == []

    recorded = {m.partition: m for m in materializations(instance)}
    assert sorted(recorded) == ["offline-1", "offline-2"]
    meta = recorded["offline-1"].metadata
    assert meta["source"].value == "worker" and meta["worker"].value == "test-worker"
    assert meta["cache_fingerprint"].value == first["fingerprint"] and meta["template"].value == "astronaut"
    assert meta["unet_seconds"].value == pytest.approx(first["unet"], abs=1e-4)
    assert meta["timings"].value == first
    used = instance.fetch_observations(dg.AssetKey("template_cache"), limit=10).records
    assert sorted(r.asset_observation.metadata["used_by_request"].value for r in used) == [
        "offline-1",
        "offline-2",
    ]


def test_stats_count_direct_renders_apart_and_with_the_runs(instance, worker, store_root, short_speech):
    from pipelines.stats import collect_stats, format_stats

    render_directly(worker, "counted-1", short_speech)
    write_failure(worker.store, "counted-2", template="astronaut", error="boom", worker="test-worker")
    assert claim_id(worker.store, "counted-3", "worker", worker="test-worker", template="astronaut")
    tick(instance, store_root)
    stats = collect_stats(instance, worker.store, client=UNREACHABLE)
    worker_counts = stats["paths"]["worker"]
    finished = {k: worker_counts[k] for k in ("completed", "failed", "inProgress")}
    assert finished["completed"] >= 1 and finished["failed"] >= 1 and finished["inProgress"] >= 1
    assert stats["paths"]["run"]["total"] == 0  # the sensor's partitions are not runs never started
    assert stats["totalRequests"] == worker_counts["total"] and stats["notStartedRequests"] == 0
    assert stats["completedRequests"] == worker_counts["completed"]
    assert stats["templateUsage"]["astronaut"] == worker_counts["total"]
    assert "workers  " in format_stats(stats) and stats["renders"] >= 1


def test_an_id_claimed_by_a_worker_is_refused_by_submit_and_by_the_request_sensor(
    instance, worker, short_speech
):
    from pipelines.request import RenderRequest
    from pipelines.sensors import render_request_sensor
    from pipelines.submit import submit

    assert claim_id(worker.store, "direct-only", "worker", worker="test-worker", template="astronaut")

    class TemplateKnown:  # the GraphQL answers up to the claim: the template has a cache
        url = "http://127.0.0.1:9"

        def query(self, document, variables=None):
            return {
                "assetOrError": {"__typename": "Asset", "assetMaterializations": [{"partition": "astronaut"}]}
            }

    with pytest.raises(InputError, match="already exists"):
        submit(worker.store, "astronaut", short_speech, request_id="direct-only", client=TemplateKnown())
    assert not worker.store.exists("audio/direct-only.wav")

    instance.add_dynamic_partitions("templates", ["astronaut"])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "template_cache", partition="astronaut", metadata={"fingerprint": "0" * 16, "weights": "demo"}
        )
    )
    worker.store.put_file("audio/direct-only.wav", short_speech)
    request = RenderRequest("direct-only", "astronaut", "audio/direct-only.wav", {})
    worker.store.put_bytes(keys.request("direct-only"), request.to_json())
    resources = {"store": StoreResource(root=str(worker.store.root))}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        assert render_request_sensor(context).run_requests == []
    reason = worker.store.get_bytes(keys.rejected_reason("direct-only")).decode()
    assert "taken by a direct render on worker test-worker" in reason


def test_a_direct_render_is_signed_and_its_record_and_materialization_say_by_whom(
    instance, worker, store_root, short_speech, tmp_path, monkeypatch
):
    from musetalk_ops.credentials import CERT_ENV, KEY_ENV, verify_video, write_dev_certificate
    from pipelines.stats import collect_stats

    paths = write_dev_certificate(tmp_path / "credentials")
    monkeypatch.setenv(CERT_ENV, str(paths[CERT_ENV]))
    monkeypatch.setenv(KEY_ENV, str(paths[KEY_ENV]))
    record = render_directly(worker, "signed-1", short_speech)
    assert "CN=musetalk test signer" in record["signer"] and record["extra"]["sign"] > 0
    worker.store.get_file("renders/signed-1.mp4", tmp_path / "signed.mp4")
    found = verify_video(tmp_path / "signed.mp4")
    assert found.signed and found.provenance["request"] == "signed-1"
    assert found.provenance["cache_fingerprint"] == record["fingerprint"]
    monkeypatch.delenv(CERT_ENV)
    monkeypatch.delenv(KEY_ENV)
    render_directly(worker, "unsigned-1", short_speech)
    tick(instance, store_root)
    recorded = {m.partition: m.metadata for m in materializations(instance)}
    assert (
        recorded["signed-1"]["signed"].value is True
        and recorded["signed-1"]["signer"].value == record["signer"]
    )
    assert recorded["unsigned-1"]["signed"].value is False
    stats = collect_stats(instance, worker.store, client=UNREACHABLE)
    assert stats["unsignedRenders"] == stats["renders"] - 1

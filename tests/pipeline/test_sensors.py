"""Sensors against a real local store and a real (ephemeral) Dagster instance."""

import json
import os
import time

import dagster as dg
import pytest

from musetalk_ops import PREPARATION_VERSION
from musetalk_ops.store import LocalStore
from pipelines.resources import StoreResource
from pipelines.sensors import AUDIO_GRACE_SECONDS, _template_inputs, render_request_sensor, template_sensor


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def tick(sensor, instance, store, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"store": StoreResource(root=str(store.root))}
    ) as context:
        result = sensor(context)
    for request in result.dynamic_partitions_requests or []:  # what the daemon does before the runs
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def test_template_sensor_follows_the_store(instance, store):
    store.put_bytes("templates/alice/source.png", b"png-a")
    store.put_bytes("templates/bob/source.mp4", b"mp4-b")
    store.put_bytes("templates/bob/settings.yaml", b"extra_margin: 5\n")
    store.put_bytes("templates/carol/settings.yaml", b"fps: 25\n")  # no source yet: not a template
    store.put_bytes("templates/Bad_Id/source.png", b"png")  # not a valid id: ignored

    first = tick(template_sensor, instance, store)
    assert sorted(instance.get_dynamic_partitions("templates")) == ["alice", "bob"]
    assert sorted(r.partition_key for r in first.run_requests) == ["alice", "bob"]
    assert all(r.asset_selection == [dg.AssetKey("template_cache")] for r in first.run_requests)

    again = tick(template_sensor, instance, store, first.cursor)
    assert again.run_requests == []  # nothing changed

    time.sleep(0.01)
    store.put_bytes("templates/bob/settings.yaml", b"extra_margin: 6\n")
    store.put_bytes("templates/carol/source.jpg", b"jpg")
    store.delete("templates/alice/source.png")
    changed = tick(template_sensor, instance, store, again.cursor)
    assert sorted(r.partition_key for r in changed.run_requests) == ["bob", "carol"]
    assert sorted(instance.get_dynamic_partitions("templates")) == ["bob", "carol"]  # alice removed


def add_template(instance, tid: str, **metadata) -> None:
    """A template the instance knows: its partition plus a template_cache materialization."""
    instance.add_dynamic_partitions("templates", [tid])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="template_cache",
            partition=tid,
            metadata={"fingerprint": "0123456789abcdef", "weights": "demo", **metadata},
        )
    )


def test_template_sensor_prepares_again_what_an_older_preparation_made(instance, store):
    """After an upgrade that bumps PREPARATION_VERSION, the first tick requests every template whose
    current cache another preparation version made, once; nobody has to act."""
    for tid in ("alice", "bob", "carol", "dave"):
        store.put_bytes(f"templates/{tid}/source.png", tid.encode())
    add_template(instance, "alice")  # materialized before the version was recorded
    add_template(instance, "bob", preparation_version=PREPARATION_VERSION)
    add_template(instance, "carol", preparation_version=PREPARATION_VERSION - 1)
    instance.add_dynamic_partitions("templates", ["dave"])  # never materialized: nothing to redo
    older_cursor = json.dumps(_template_inputs(store.list("templates/")))  # what the previous code wrote

    upgraded = tick(template_sensor, instance, store, older_cursor)
    assert sorted(r.partition_key for r in upgraded.run_requests) == ["alice", "carol"]
    assert all(r.asset_selection == [dg.AssetKey("template_cache")] for r in upgraded.run_requests)
    # requested once: the next ticks wait for those runs instead of asking again
    assert tick(template_sensor, instance, store, upgraded.cursor).run_requests == []
    add_template(instance, "alice", preparation_version=PREPARATION_VERSION)
    assert tick(template_sensor, instance, store, upgraded.cursor).run_requests == []
    store.put_bytes("templates/bob/source.png", b"bob, new photo")  # inputs still count as before
    assert [
        r.partition_key for r in tick(template_sensor, instance, store, upgraded.cursor).run_requests
    ] == ["bob"]


def put_request(store, rid: str, body, audio: str | None = "wav", age: float = 0.0) -> None:
    if audio:
        store.put_bytes(f"audio/{rid}.{audio}", b"RIFF")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    store.put_bytes(f"requests/{rid}.json", data)
    if age:
        path = store.root / f"requests/{rid}.json"
        os.utime(path, (time.time() - age, time.time() - age))


def test_render_request_sensor_accepts_valid_and_rejects_bad_requests(instance, store):
    add_template(instance, "astro")
    instance.add_dynamic_partitions("templates", ["unprepared"])  # a partition without a cache
    put_request(store, "good", {"template": "astro", "audio": "audio/good.wav", "options": {"batch_size": 8}})
    put_request(store, "notjson", b"{template: astro")
    put_request(store, "shape", ["astro", "audio/shape.wav"])
    put_request(store, "unknown", {"template": "nobody", "audio": "audio/unknown.wav"})
    put_request(store, "cold", {"template": "unprepared", "audio": "audio/cold.wav"})
    put_request(store, "escape", {"template": "astro", "audio": "../../etc/passwd.wav"})
    put_request(store, "option", {"template": "astro", "audio": "audio/option.wav", "options": {"sh": "rm"}})
    put_request(
        store,
        "gone",
        {"template": "astro", "audio": "audio/gone.wav"},
        audio=None,
        age=AUDIO_GRACE_SECONDS + 5,
    )
    put_request(store, "uploading", {"template": "astro", "audio": "audio/uploading.wav"}, audio=None)
    put_request(store, "Upper", {"template": "astro", "audio": "audio/upper.wav"})

    result = tick(render_request_sensor, instance, store)

    assert [(r.partition_key, r.run_key, r.tags) for r in result.run_requests] == [
        ("good", "good", {"musetalk/template": "astro"})
    ]
    assert instance.get_dynamic_partitions("render_requests") == ["good"]
    reasons = {
        "notjson": "not valid JSON",
        "shape": "expected a JSON object",
        "unknown": "unknown template 'nobody'",
        "cold": "unknown template 'unprepared'",
        "escape": "audio",
        "option": "unknown option 'sh'",
        "gone": "audio object audio/gone.wav does not exist",
        "Upper": "invalid request id 'Upper'",
    }
    for rid, reason in reasons.items():
        assert not store.exists(f"requests/{rid}.json")
        assert store.exists(f"requests/rejected/{rid}.json")
        assert reason in store.get_bytes(f"requests/rejected/{rid}.reason.txt").decode(), rid
    assert store.exists("requests/good.json") and store.exists("requests/uploading.json")  # still waiting

    store.put_bytes("audio/uploading.wav", b"RIFF")
    later = tick(render_request_sensor, instance, store)
    assert [r.partition_key for r in later.run_requests] == ["uploading"]  # good is known: never again
    assert tick(render_request_sensor, instance, store).run_requests == []


def test_request_ids_reserved_through_the_api_are_not_run_by_the_sensor(instance, store):
    """``musetalk submit`` adds the partition before uploading: the sensor must leave it alone."""
    add_template(instance, "astro")
    instance.add_dynamic_partitions("render_requests", ["api1"])
    put_request(store, "api1", {"template": "astro", "audio": "audio/api1.wav"})
    assert tick(render_request_sensor, instance, store).run_requests == []
    assert store.exists("requests/api1.json")

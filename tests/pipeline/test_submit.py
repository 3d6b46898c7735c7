"""``musetalk submit`` refuses bad input locally, before it reserves an id or uploads anything."""

import pytest

from musetalk_ops.errors import InputError
from musetalk_ops.ids import new_request_id
from musetalk_ops.store import LocalStore
from pipelines.graphql import DagsterApiError, GraphQLClient
from pipelines.submit import latency, submit

UNREACHABLE = GraphQLClient("http://127.0.0.1:9", timeout=0.5)


def test_bad_input_is_refused_before_anything_happens(tmp_path, speech_wav):
    store = LocalStore(tmp_path / "store")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="invalid template id"):
        submit(store, "../x", speech_wav, client=UNREACHABLE)
    with pytest.raises(InputError, match="invalid request id"):
        submit(store, "astro", speech_wav, request_id="a/b", client=UNREACHABLE)
    with pytest.raises(InputError, match="unsupported audio type"):
        submit(store, "astro", tmp_path / "speech.exe", client=UNREACHABLE)
    with pytest.raises(InputError, match="empty"):
        submit(store, "astro", empty, client=UNREACHABLE)
    with pytest.raises(InputError, match="unknown option 'gpu'"):
        submit(store, "astro", speech_wav, options={"gpu": 3}, client=UNREACHABLE)
    with pytest.raises(DagsterApiError, match="unreachable"):  # valid input: only now the API is asked
        submit(store, "astro", speech_wav, client=UNREACHABLE)
    assert store.list("") == []


def test_request_ids_are_valid_and_unique():
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 24 and i.startswith("r") for i in ids)


def test_latency_breakdown_adds_up():
    run = {
        "stats": {"enqueuedTime": 100.5, "launchTime": 103.0, "startTime": 107.0, "endTime": 130.0},
        "stepStats": [
            {"stepKey": "load_request", "startTime": 108.0, "endTime": 108.5},
            {"stepKey": "audio_features", "startTime": 108.5, "endTime": 110.0},
            {"stepKey": "render_chunk[c0000]", "startTime": 110.0, "endTime": 125.0},
            {"stepKey": "render_chunk[c0001]", "startTime": 110.0, "endTime": 126.0},
            {"stepKey": "merge_video", "startTime": 126.5, "endTime": 127.5},
        ],
    }
    parts = latency(100.0, 131.0, run, {"load": 2.0})
    assert parts == {
        "submit": 0.5,
        "queue": 2.5,
        "launch": 4.0,
        "model_load": 2.0,
        "render": 16.0,
        "merge": 1.0,
        "total": 31.0,
        "overhead": 5.0,
    }


class ScriptedRuns:
    """A GraphQL client whose runs go through scripted states: {run id: [RUN_QUERY answers...]}
    (the last one repeats), and which finds no step failures."""

    def __init__(self, script: dict[str, list[tuple[str, dict]]]):
        self.script = script
        self.asked: list[str] = []

    def query(self, document: str, variables: dict | None = None) -> dict:
        if "logsForRun" in document:
            return {"logsForRun": {"events": []}}
        run_id = variables["runId"]
        self.asked.append(run_id)
        states = self.script[run_id]
        status, tags = states.pop(0) if len(states) > 1 else states[0]
        run = {
            "__typename": "Run",
            "status": status,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        return {"runOrError": {**run, "stats": {}, "stepStats": []}}


def test_wait_follows_an_automatic_retry_and_stops_at_a_final_failure(tmp_path, monkeypatch):
    import json

    from pipelines.submit import Submission, wait

    monkeypatch.setattr("pipelines.submit.time.sleep", lambda _s: None)
    store = LocalStore(tmp_path / "store")
    store.put_bytes("renders/r1.json", json.dumps({"frames": 15}).encode())
    will_retry = {"dagster/will_retry": "true"}
    client = ScriptedRuns(
        {
            "a": [
                ("STARTED", {}),
                ("FAILURE", will_retry),
                ("FAILURE", {**will_retry, "dagster/auto_retry_run_id": "b"}),
            ],
            "b": [("QUEUED", {}), ("SUCCESS", {})],
        }
    )
    done = wait(Submission("r1", "a", "http://x/runs/a", 0.0), store, client)
    assert (done.status, done.run_id, done.url) == ("SUCCESS", "b", "http://x/runs/b")
    assert done.result["failed_runs"] == ["a"] and done.result["timings"] == {"frames": 15}
    assert set(done.result["latency"]) == {"total"}

    final = ScriptedRuns({"c": [("FAILURE", {"dagster/will_retry": "false"})]})
    failed = wait(Submission("r2", "c", "http://x/runs/c", 0.0), store, final)
    assert (failed.status, failed.run_id, failed.result) == ("FAILURE", "c", {"errors": []})
    untagged = ScriptedRuns({"d": [("FAILURE", {})]})  # no run retries on the instance
    assert wait(Submission("r3", "d", "http://x/runs/d", 0.0), store, untagged).status == "FAILURE"
    assert untagged.asked == ["d", "d"]  # looked once more for the tag, then stopped

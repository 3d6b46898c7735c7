"""The worker's HTTP API on a real uvicorn server: direct renders, their records, and every refusal."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import requests
from helpers import decoded_frames, impatient_s3, post_reply, publish_template, serving, worker_settings

from musetalk_ops import keys
from musetalk_ops.render_records import claim_id
from musetalk_ops.video import probe

FPS = 25.0


def written(worker, rid: str) -> list[str]:
    """Every object of request ``rid`` in the store."""
    candidates = (keys.render_video(rid), keys.render_timings(rid), keys.failed_render(rid), keys.claim(rid))
    return sorted(key for key in candidates if worker.store.exists(key))


def test_a_direct_render_answers_with_the_video_its_record_and_timings(api, worker, short_speech, tmp_path):
    response = post_reply(api, "direct-1", short_speech)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "direct-1" and body["video"] == "renders/direct-1.mp4"
    assert body["uri"] == worker.store.uri("renders/direct-1.mp4")
    timings = body["timings"]
    frames = int(0.6 * FPS)
    assert timings["frames"] == frames and timings["source"] == "worker"
    assert timings["worker"] == "test-worker"
    assert timings["template"] == "astronaut" and timings["audio"] == "audio/direct-1.wav"
    assert timings["load"] == 0.0  # warm: models and template resident
    assert set(timings["extra"]) == {"queue", "store"} and timings["total"] > timings["unet"] > 0
    assert json.loads(worker.store.get_bytes("renders/direct-1.json")) == timings
    assert worker.store.exists("audio/direct-1.wav")

    video = requests.get(f"{api}/v1/renders/direct-1/video", timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content == worker.store.get_bytes("renders/direct-1.mp4")
    (tmp_path / "v.mp4").write_bytes(video.content)
    info = probe(tmp_path / "v.mp4")
    assert (info.width, info.height, info.frames, info.fps) == (512, 512, frames, FPS)
    assert info.video_codec == "h264" and info.audio_codec == "aac"

    status = requests.get(f"{api}/v1/renders/direct-1", timeout=10).json()
    assert status["status"] == "done" and status["timings"] == timings

    metrics = requests.get(f"{api}/metrics", timeout=10).text
    assert 'musetalk_requests_total{endpoint="/v1/renders",status="200"} 1.0' in metrics
    assert 'musetalk_stage_seconds_count{stage="unet"} 1.0' in metrics
    assert 'musetalk_renders_total{outcome="done"} 1.0' in metrics
    assert "musetalk_queue_depth 0.0" in metrics and "musetalk_ready 1.0" in metrics


def test_a_json_request_renders_an_audio_object_of_the_store(api, worker, short_speech):
    worker.store.put_file("audio/speech-7.wav", short_speech)
    body = {"template": "astronaut", "audio": "audio/speech-7.wav", "options": {"crf": 30}}
    response = requests.post(f"{api}/v1/renders", json=body, timeout=120)
    assert response.status_code == 200, response.text
    rid = response.json()["id"]
    assert rid.startswith("r") and len(rid) == 24  # the format of musetalk submit's ids
    assert response.json()["timings"]["audio"] == "audio/speech-7.wav"
    assert written(worker, rid) == sorted([keys.claim(rid), keys.render_video(rid), keys.render_timings(rid)])


@pytest.mark.parametrize(
    ("fields", "audio_name", "status", "message"),
    [
        ({"template": "nobody"}, None, 400, "template 'nobody' is unknown or not prepared"),
        ({}, "speech.txt", 400, "unsupported audio type '.txt'"),
        ({}, "broken.wav", 400, "audio of request refused-1: not a readable audio file"),
        ({"options": '{"crf": 99}'}, None, 400, "crf 99 is out of range (0-51)"),
        ({"options": '{"colour": 1}'}, None, 400, "unknown option 'colour'"),
        ({"options": '{"batch_size": 4}'}, None, 400, "cannot change it without rebuilding"),
        ({"options": "{"}, None, 400, "options: not valid JSON"),
        ({"id": "../x"}, None, 400, "invalid request id '../x'"),
    ],
)
def test_a_user_mistake_is_a_4xx_with_one_line_and_writes_nothing(
    api, worker, short_speech, tmp_path, fields, audio_name, status, message
):
    audio = short_speech
    if audio_name:
        audio = tmp_path / audio_name
        audio.write_bytes(b"not audio at all" * 100)
    response = post_reply(api, fields.pop("id", "refused-1"), audio, **fields)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and "\n" not in error and "/tmp" not in error
    assert written(worker, "refused-1") == [] and not worker.store.exists("audio/refused-1.wav")


def test_other_bodies_are_refused(api, worker):
    plain = requests.post(f"{api}/v1/renders", data=b"x", headers={"content-type": "text/plain"})
    assert plain.status_code == 415
    answer = requests.post(f"{api}/v1/renders", json={"template": "astronaut", "audio": "../../etc/passwd"})
    assert answer.status_code == 400 and "expected a key audio/<name>.<ext>" in answer.json()["error"]
    answer = requests.post(f"{api}/v1/renders", json={"template": "astronaut", "audio": "audio/none.wav"})
    assert answer.status_code == 400 and "does not exist" in answer.json()["error"]
    assert requests.get(f"{api}/v1/renders/nothing-here").status_code == 404
    assert requests.get(f"{api}/v1/renders/nothing-here/video").status_code == 404
    assert requests.get(f"{api}/docs").status_code == 404  # its assets would come from a CDN
    spec = requests.get(f"{api}/openapi.json").json()
    endpoints = {"/v1/renders", "/v1/renders/{rid}", "/v1/renders/{rid}/video", "/healthz", "/readyz"}
    assert endpoints | {"/metrics"} <= set(spec["paths"])


def test_an_id_already_taken_is_409(api, worker, short_speech):
    worker.store.put_bytes(keys.request("queued-elsewhere"), b"{}")
    assert claim_id(worker.store, "submitted-elsewhere", "request")
    taken = (("queued-elsewhere", "a render request"), ("submitted-elsewhere", "a render in progress"))
    for rid, by in taken:
        response = post_reply(api, rid, short_speech)
        assert response.status_code == 409 and by in response.json()["error"]
    assert post_reply(api, "once", short_speech).status_code == 200
    again = post_reply(api, "once", short_speech)
    assert again.status_code == 409 and "a finished render" in again.json()["error"]


def test_a_body_over_the_limit_is_413(worker, short_speech, monkeypatch):
    from musetalk_ops.config import Limits
    from musetalk_ops.serve.api import create_app

    monkeypatch.setattr(worker, "limits", Limits(max_upload_bytes=4096))
    with serving(create_app(worker)) as url:
        response = post_reply(url, "too-big", short_speech)
        assert response.status_code == 413 and "4096 byte limit" in response.json()["error"]
        chunks = (b"x" * 1024 for _ in range(16))  # no Content-Length: counted while read
        response = requests.post(
            f"{url}/v1/renders", data=chunks, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 413
    assert written(worker, "too-big") == []


def test_a_full_queue_is_429_with_retry_after_and_loses_nothing(api, worker, short_speech, monkeypatch):
    release, rendering = threading.Event(), threading.Event()
    original = type(worker)._render_reply

    def held(self, reply):  # a render that waits for the test: the queue fills behind it
        rendering.set()
        release.wait(60)
        return original(self, reply)

    monkeypatch.setattr(type(worker), "_render_reply", held)
    answers: dict[str, requests.Response] = {}
    threads = [
        threading.Thread(target=lambda rid=rid: answers.__setitem__(rid, post_reply(api, rid, short_speech)))
        for rid in ("queued-1", "queued-2")
    ]
    threads[0].start()
    assert rendering.wait(30)
    threads[1].start()
    while worker.pending < 2:
        threading.Event().wait(0.05)
    refused = post_reply(api, "queued-3", short_speech)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["error"]
    release.set()
    for thread in threads:
        thread.join(120)
    assert [answers[rid].status_code for rid in ("queued-1", "queued-2")] == [200, 200]
    assert written(worker, "queued-3") == []


def test_a_token_guards_everything_but_health_and_readiness(worker, short_speech):
    from musetalk_ops.serve.api import create_app

    with serving(create_app(worker, token="s3cret")) as url:
        assert requests.get(f"{url}/healthz").status_code == 200
        assert requests.get(f"{url}/readyz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            answer = requests.get(f"{url}/metrics", headers=headers)
            assert answer.status_code == 401 and answer.json() == {"error": "missing or wrong bearer token"}
        assert post_reply(url, None, short_speech).status_code == 401
        ok = requests.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and "musetalk_requests_total" in ok.text


def test_a_damaged_template_cache_is_refused_with_the_clis_message(
    api, worker, astronaut_cache, short_speech
):
    ref = publish_template(worker.store, astronaut_cache, "broken")
    worker.store.put_bytes(ref.prefix + "latents.safetensors", b"not a tensor file")
    response = post_reply(api, "on-broken", short_speech, template="broken")
    assert response.status_code == 422
    error = response.json()["error"]
    assert "is damaged" in error and "re-materialize template_cache partition broken" in error
    assert written(worker, "on-broken") == []


def test_a_store_that_stops_answering_is_a_503_and_nothing_is_half_written(
    moto_server, monkeypatch, astronaut_cache, demo_models, short_speech
):
    import boto3

    from musetalk_ops.s3_store import S3Store
    from musetalk_ops.serve.api import create_app
    from musetalk_ops.serve.worker import Worker

    proc, url = moto_server
    impatient_s3(monkeypatch, attempts=1)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="worker")
    store = S3Store("worker", endpoint_url=url)
    publish_template(store, astronaut_cache)
    worker = Worker(store, worker_settings(demo_models), name="s3-worker")
    worker.start(["astronaut"])
    with serving(create_app(worker)) as api:
        assert post_reply(api, "while-up", short_speech).status_code == 200
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            response = post_reply(api, "while-down", short_speech)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert response.status_code == 503
        assert response.json()["error"].startswith(f"object store unreachable at {url}")
        assert post_reply(api, "while-up-again", short_speech).status_code == 200
    worker.close()
    renders = sorted(i.key for i in store.list("renders/"))
    assert renders == sorted(
        f"renders/{r}.{e}" for r in ("while-up", "while-up-again") for e in ("json", "mp4")
    )
    assert not store.exists(keys.claim("while-down"))


def test_the_cli_renders_a_template_by_id_as_a_worker_does(
    worker, store_root, demo_models, short_speech, tmp_path
):
    """``musetalk render --template <id>`` finds the cache through the pointer, as workers do, and makes
    the same frames as a direct render."""
    from musetalk_ops.serve.worker import Reply

    key = "audio/same-frames.wav"
    worker.store.put_file(key, short_speech)
    worker.submit(Reply(id="same-frames", template="astronaut", options={}, audio_key=key)).result(
        timeout=120
    )
    worker.store.get_file("renders/same-frames.mp4", tmp_path / "direct.mp4")
    env = {**os.environ, "MUSETALK_STORE": str(store_root), "MUSETALK_CACHE": str(tmp_path / "cache")}
    argv = ["render", "--template", "astronaut", "--audio", short_speech, "--out", tmp_path / "cli.mp4"]
    argv += ["--models", demo_models, "--device", "cpu", "--batch-size", "8", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *map(str, argv)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (decoded_frames(tmp_path / "cli.mp4") == decoded_frames(tmp_path / "direct.mp4")).all()
    missing = subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *map(str, argv[:2]), "nobody", *map(str, argv[3:])],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "template 'nobody' is unknown or not prepared" in missing.stderr
